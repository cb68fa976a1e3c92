"""Tiny random-weight LLaVA models built from configs, with a tokenizer trained in a second.

For tests and for trying the library without any download. The widths are toy-sized; the
structure (CLIP tower with [CLS], anyres tiles, unpad, newlines, Llama LM, SDPA) is the real one.
"""

from __future__ import annotations

import torch

from tokendrop.adapters.qwen_common import QWEN_CHAT_TEMPLATE, qwen_token_ids
from tokendrop.processors import image_only

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_CORPUS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT: A red circle and a blue square.",
    "Q: what colour is the triangle? A: green. Q: how many shapes are there? A: three.",
    "Is there a star in the picture? yes no maybe the digit seven is written on the box.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"()[]{}<>-_/\\",
]


def _bpe(vocab_size: int, special_tokens: list[str], **names):
    """A byte-level BPE tokenizer trained in a second on a few sentences, with `special_tokens`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **names)


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with LLaVA's special tokens."""
    return _bpe(vocab_size, SPECIAL_TOKENS, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                extra_special_tokens={"image_token": "<image>"})


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


# ---- Qwen-VL -------------------------------------------------------------------------------------
QWEN_SPECIAL_TOKENS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
def tiny_qwen_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen-VL's special tokens."""
    return _bpe(vocab_size, QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


def _qwen_text(tok, layers: int, kv_heads: int, mrope_section, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=kv_heads, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section}, **extra)


def _qwen_model(model_class: str, config, seed: int):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def _qwen_processor(processor_class: str, tok, patch: int, max_tokens: int):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch * 2  # 2x2 patches merge into one LLM token
    images = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=4 * factor * factor,
                                      max_pixels=max_tokens * factor * factor)
    processor = image_only(getattr(transformers, processor_class))(image_processor=images, tokenizer=tok,
                                                                   video_processor=None, chat_template=QWEN_CHAT_TEMPLATE)
    processor.tokenizer.padding_side = "left"
    return processor


def tiny_qwen2_vl(text_layers: int = 4, kv_heads: int = 2, seed: int = 0, max_tokens: int = 96):
    """(model, processor): a random `Qwen2VLForConditionalGeneration` (M-RoPE, 2x2 patch merger)."""
    from transformers import Qwen2VLConfig

    tok = tiny_qwen_tokenizer()
    config = Qwen2VLConfig(
        vision_config=dict(depth=3, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=_qwen_text(tok, text_layers, kv_heads, [2, 3, 3]), **qwen_token_ids(tok))
    return _qwen_model("Qwen2VLForConditionalGeneration", config, seed), _qwen_processor("Qwen2VLProcessor", tok, 14, max_tokens)


def tiny_qwen2_5_vl(text_layers: int = 4, kv_heads: int = 2, seed: int = 0, max_tokens: int = 96):
    """(model, processor): a random `Qwen2_5_VLForConditionalGeneration` with window attention in
    blocks 0 and 2 and full attention in blocks 1 and 3."""
    from transformers import Qwen2_5_VLConfig

    tok = tiny_qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3]),
        text_config=_qwen_text(tok, text_layers, kv_heads, [2, 3, 3]), **qwen_token_ids(tok))
    return (_qwen_model("Qwen2_5_VLForConditionalGeneration", config, seed),
            _qwen_processor("Qwen2_5_VLProcessor", tok, 14, max_tokens))


def tiny_qwen3_vl(text_layers: int = 4, kv_heads: int = 2, seed: int = 0, max_tokens: int = 96):
    """(model, processor): a random `Qwen3VLForConditionalGeneration`: 16-px patches, q/k norms, and
    DeepStack features from vision blocks 0 and 1 added after LLM layers 0 and 1."""
    from transformers import Qwen3VLConfig

    tok = tiny_qwen_tokenizer()
    text = _qwen_text(tok, text_layers, kv_heads, [4, 2, 2], head_dim=16)
    text["rope_parameters"]["mrope_interleaved"] = True
    config = Qwen3VLConfig(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0, 1],
                           num_position_embeddings=64),
        text_config=text, **qwen_token_ids(tok))
    return _qwen_model("Qwen3VLForConditionalGeneration", config, seed), _qwen_processor("Qwen3VLProcessor", tok, 16, max_tokens)
