"""Tiny random-weight Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (dense and MoE) models built from configs
(tests), and a tokenizer with Qwen-VL's special tokens."""

from __future__ import annotations

import torch

from tokendrop.families.qwen_vl.common import QWEN_CHAT_TEMPLATE, qwen_token_ids
from tokendrop.processors import image_only
from tokendrop.tiny import bpe_tokenizer

QWEN_SPECIAL_TOKENS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
def tiny_qwen_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen-VL's special tokens."""
    return bpe_tokenizer(vocab_size, QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
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


def tiny_qwen3_5(text_layers: int = 4, kv_heads: int = 2, seed: int = 0, max_tokens: int = 96, moe: bool = False):
    """(model, processor): a random `Qwen3_5ForConditionalGeneration`: Qwen3-VL's 16-px tower without
    DeepStack, and a hybrid decoder of Gated-DeltaNet (linear-attention) layers with a full-attention
    layer every second layer (the real models: every fourth), gated queries and partial M-RoPE.
    `moe`: `Qwen3_5MoeForConditionalGeneration` instead (4 experts, 2 per token, a shared expert)."""
    import transformers

    tok = tiny_qwen_tokenizer()
    text = _qwen_text(tok, text_layers, kv_heads, [4, 2, 2], head_dim=32, linear_conv_kernel_dim=4,
                      linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                      layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)])
    text["rope_parameters"].update(mrope_interleaved=True, partial_rotary_factor=0.5)
    if moe:
        del text["intermediate_size"]
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    name = "Qwen3_5Moe" if moe else "Qwen3_5"
    config = getattr(transformers, f"{name}Config")(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64),
        text_config=text, **qwen_token_ids(tok))
    return (_qwen_model(f"{name}ForConditionalGeneration", config, seed),
            _qwen_processor("Qwen3VLProcessor", tok, 16, max_tokens))


def tiny_qwen3_5_moe(text_layers: int = 4, kv_heads: int = 2, seed: int = 0, max_tokens: int = 96):
    """(model, processor): a random `Qwen3_5MoeForConditionalGeneration` (`tiny_qwen3_5` with moe=True)."""
    return tiny_qwen3_5(text_layers, kv_heads, seed, max_tokens, moe=True)
