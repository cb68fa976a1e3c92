"""The word-matcher start of the grounded and tally heads (``TrainConfig.match_init``, off by default)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recipes.default_model.config import TrainConfig
from recipes.default_model.words import word_ids


def init_matching_heads(model, layer: int, heads: list[int], words: torch.Tensor, logit: float, pairs: int = 4) -> None:
    """Start attention ``heads`` of LM layer ``layer`` as content matchers (``TrainConfig.match_init``).

    The grounding and tally losses ask those heads to attend by content (question word -> image
    tokens showing it); from random weights that match first has to emerge, and until it does the
    grounding loss sits on a plateau. Here the query and key projections of each
    head, on its ``pairs`` most slowly turning RoPE frequency pairs (they rotate least over the
    hundreds of positions between a question and the image tokens), are both set to ``a * B``: B an
    orthonormal basis of the span of ``words`` (embedding rows, (W, D)), ``a`` such that two
    normalised hidden states that both lie along one word score ``logit`` before the softmax.
    The head's other dimensions keep their random start. Weights change in place.
    """
    attn = model.model.language_model.layers[layer].self_attn
    inv_freq = model.model.language_model.rotary_emb.inv_freq  # (hd / 2,): dims j and j + hd / 2 turn at inv_freq[j]
    hd, dim = attn.head_dim, words.shape[1]
    if not 1 <= 2 * pairs <= min(hd, words.shape[0]):
        raise ValueError(f"pairs must be in [1, {min(hd, words.shape[0]) // 2}], got {pairs}")
    slow = inv_freq.argsort()[:pairs]  # slowest frequencies first
    dims = torch.cat([slow, slow + hd // 2])  # (2 * pairs,)
    basis = torch.linalg.svd(F.normalize(words.float(), dim=-1), full_matrices=False).Vh[: 2 * pairs]  # (2 * pairs, D)
    a = math.sqrt(logit * math.sqrt(hd) / dim)  # an RMS-normalised state has norm sqrt(D)
    group = attn.config.num_attention_heads // attn.config.num_key_value_heads
    with torch.no_grad():
        for h in heads:
            attn.q_proj.weight[h * hd + dims] = a * basis.to(attn.q_proj.weight.dtype)
            attn.k_proj.weight[(h // group) * hd + dims] = a * basis.to(attn.k_proj.weight.dtype)


def start_matching_heads(model, processor, cfg: TrainConfig) -> None:
    """With ``cfg.match_init`` > 0, start the grounded and tally heads (those whose loss is on) as
    matchers of the colour and shape words."""
    heads = [h for h, w in ((cfg.ground_head, cfg.ground_weight), (cfg.tally_head, cfg.tally_weight)) if w > 0]
    if cfg.match_init > 0 and heads:
        words = model.get_input_embeddings().weight.detach()[torch.cat(word_ids(processor.tokenizer)[:2])]  # colours, shapes
        init_matching_heads(model, cfg.ground_layer, heads, words, cfg.match_init)
