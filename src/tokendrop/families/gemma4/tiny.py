"""A tiny random-weight Gemma 4 built from a config (tests), and a tokenizer with Gemma 4's special tokens.

The widths are toy-sized; the structure is the real one: a vision encoder with 2-D rotary positions
and a pooler (2 x 2 patches per LLM token here, 3 x 3 in the checkpoints), per-layer inputs (PLE),
sliding-window and full-attention layers (keys shared with values and a wider head on the full ones),
bidirectional attention inside image blocks, and a final logit soft-cap.
"""

from __future__ import annotations

from tokendrop.families.gemma4.gemma4 import GEMMA4_SPECIAL_TOKENS, gemma4_token_ids
from tokendrop.tiny import bpe_tokenizer

TINY_SOFT_TOKENS = 70  # the smallest budget the image processor accepts (70, 140, 280, 560, 1120)


def tiny_gemma4_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Gemma 4's special tokens (`image_token`, `boi_token`, ...)."""
    return bpe_tokenizer(vocab_size, GEMMA4_SPECIAL_TOKENS, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                         extra_special_tokens={"image_token": "<|image|>", "boi_token": "<|image>",
                                               "eoi_token": "<image|>", "audio_token": "<|audio|>",
                                               "boa_token": "<|audio>", "eoa_token": "<audio|>"})


def tiny_gemma4(text_layers: int = 4, seed: int = 0, soft_tokens: int = TINY_SOFT_TOKENS):
    """(model, processor): a random `Gemma4ForConditionalGeneration`, 8-px patches pooled 2 x 2 (an
    image is at most `soft_tokens` LLM tokens), layers alternating sliding (window 16) and full attention.

    Raises:
        ImportError: transformers' Gemma 4 processor cannot be imported here (transformers < 5.21
            imports torchvision for it: `tokendrop.families.gemma4.gemma4.processor_class`).
    """
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from tokendrop.families.gemma4.gemma4 import Gemma4Adapter, image_processor_class

    tok = tiny_gemma4_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"] * (text_layers // 2),
                hidden_size_per_layer_input=8, vocab_size_per_layer_input=len(tok),
                use_bidirectional_attention="vision", final_logit_softcapping=30.0, max_position_embeddings=4096,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=16, patch_size=8, pooling_kernel_size=2, position_embedding_size=160, standardize=True)
    config = Gemma4Config(text_config=text, vision_config=vision, vision_soft_tokens_per_image=soft_tokens,
                          **gemma4_token_ids(tok))
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    images = image_processor_class()(patch_size=8, pooling_kernel_size=2, max_soft_tokens=soft_tokens)
    processor = Gemma4Adapter.build_processor(images, tok)
    processor.tokenizer.padding_side = "left"
    return model, processor
