"""A tiny random-weight InternVL built from configs (tests), and a tokenizer with InternVL's special tokens.

The widths are toy-sized; the structure is the real one: InternViT with a [CLS] token and absolute
position embeddings, 2x2 pixel shuffle, GOT-OCR2 tiling (up to 6 tiles plus the thumbnail), a Qwen2
LM with grouped-query attention and qkv biases, `<img>...</img>` around each image's tokens.
"""

from __future__ import annotations

import torch

from tokendrop.processors import image_only
from tokendrop.tiny import bpe_tokenizer

INTERNVL_SPECIAL_TOKENS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                           "<video>"]


def tiny_internvl_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with InternVL's image tokens (named as `InternVLProcessor` reads them)."""
    return bpe_tokenizer(vocab_size, INTERNVL_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                               "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def tiny_internvl(tile: int = 56, vision_layers: int = 3, text_layers: int = 4, kv_heads: int = 2, seed: int = 0,
                  max_tiles: int = 6):
    """(model, processor): a random `InternVLForConditionalGeneration`, tiles of `tile` px (4x4 patches of 14 px,
    2x2 LLM tokens after the pixel shuffle)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = tiny_internvl_tokenizer()
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
                           image_size=[tile, tile], patch_size=[14, 14], use_absolute_position_embeddings=True,
                           layer_scale_init_value=1.0, attention_bias=True, initializer_range=0.2),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # the stock init zeroes [CLS] and the position table: give them values
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_()
        embeddings.position_embeddings.normal_(std=0.5)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    images = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, min_patches=1,  # the processor tiles by default
                                      max_patches=max_tiles)
    grid = tile // 14 // 2
    processor = image_only(InternVLProcessor)(image_processor=images, tokenizer=tok, video_processor=None, image_seq_length=grid * grid)
    processor.tokenizer.padding_side = "left"
    return model, processor
