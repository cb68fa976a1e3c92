"""Tiny random-weight LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision models built from configs (tests, `--model tiny`).

The widths are toy-sized; the structure (CLIP tower with [CLS] or SigLIP, anyres tiles, unpad,
newlines, Llama / Qwen2 LM, SDPA) is the real one.
"""

from __future__ import annotations

import torch

from tokendrop.processors import image_only
from tokendrop.tiny import tiny_tokenizer


def _vision_config(tile: int, layers: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=tile, patch_size=14, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=layers, num_attention_heads=4)


def _text_config(vocab: int, layers: int, kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                       pad_token_id=3, bos_token_id=1, eos_token_id=2)


def tiny_llava_next(tile: int = 112, vision_layers: int = 3, text_layers: int = 4, kv_heads: int = 4, seed: int = 0):
    """(model, processor): a random `LlavaNextForConditionalGeneration` with 5 pinpoints scaled to `tile`."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tiny_tokenizer()
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    config = LlavaNextConfig(vision_config=_vision_config(tile, vision_layers),
                             text_config=_text_config(len(tok), text_layers, kv_heads),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def tiny_llava(tile: int = 112, vision_layers: int = 3, text_layers: int = 4, kv_heads: int = 4, seed: int = 0):
    """(model, processor): a random LLaVA-1.5-style `LlavaForConditionalGeneration`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = tiny_tokenizer()
    config = LlavaConfig(vision_config=_vision_config(tile, vision_layers),
                         text_config=_text_config(len(tok), text_layers, kv_heads),
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def tiny_llava_onevision(tile: int = 56, vision_layers: int = 2, text_layers: int = 6, kv_heads: int = 2, seed: int = 0):
    """(model, processor): a random `LlavaOnevisionForConditionalGeneration`, SigLIP tower (no [CLS]),
    Qwen2 LM with grouped-query attention and qkv biases."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers import Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    tok = tiny_tokenizer()
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=tile, patch_size=14, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=vision_layers, num_attention_heads=4),
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                                num_attention_heads=4, num_key_value_heads=kv_heads, pad_token_id=3, bos_token_id=1,
                                eos_token_id=2),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    grid = tile // 14
    processor = image_only(LlavaOnevisionProcessor)(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                                    num_image_tokens=grid * grid, vision_feature_select_strategy="full")
    return model, processor
