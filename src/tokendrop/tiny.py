"""Tiny random-weight models built from configs, with tokenizers trained in a second: for tests and for
trying the library without any download (`--model tiny`).

The builders live with their families (`tokendrop.families.<lineage>.tiny`) and are re-exported
here by name, `tokendrop.tiny.tiny_qwen2_vl()` & co, so scripts and issues can name them in one place.
"""

from __future__ import annotations

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_CORPUS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT: A red circle and a blue square.",
    "Q: what colour is the triangle? A: green. Q: how many shapes are there? A: three.",
    "Is there a star in the picture? yes no maybe the digit seven is written on the box.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"()[]{}<>-_/\\",
]


def bpe_tokenizer(vocab_size: int, special_tokens: list[str], **names):
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
    return bpe_tokenizer(vocab_size, SPECIAL_TOKENS, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                extra_special_tokens={"image_token": "<image>"})


def __getattr__(name: str):
    """A family's tiny builder by its name (`tiny_llava_next`, `tiny_qwen2_vl`, ...): every registered
    family names its builder (`Family.tiny`, "module:function"); it is imported on first use."""
    from tokendrop.families import families
    from tokendrop.families.base import resolve

    for family in families():
        if family.tiny.rpartition(":")[2] == name or family.tokenizer.rpartition(":")[2] == name:
            return resolve(family.tiny if family.tiny.endswith(":" + name) else family.tokenizer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_clip(vision_width: int = 64, seed: int = 0):
    """(CLIPModel, tokenizer): a tiny random CLIP whose vision width is the tiny LLaVA towers' (CDPruner's
    text side without a download). Its text tower reads segments of 16 tokens."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    tok = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        vision_config=dict(image_size=112, patch_size=14, hidden_size=vision_width, intermediate_size=2 * vision_width,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=24)
    torch.manual_seed(seed)
    return CLIPModel(config).eval(), tok
