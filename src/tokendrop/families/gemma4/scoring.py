"""Received-attention scores in Gemma 4's vision encoder, mapped onto its pooled LLM tokens.

A score is the attention each patch receives in one encoder layer (softmax rows of all the image's
queries, averaged over heads and queries: `tokendrop.scoring.received_attention`, never an N x N
map for all heads), recomputed from the layer's own input norm, projections, q/k norms and 2-D
rotary embedding. The pooler averages every k x k block of patches into one LLM token, so a token's
score is the SUM of the scores its k^2 patches receive (as Qwen-VL's 2x2 merge groups add up);
padding patches are masked out of the encoder's attention and are out of every segment here.

B images, M padded patches per image, H heads, hd head width.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from tokendrop.scoring import received_attention


def received_attention_gemma4(layer: nn.Module, hidden_states: torch.Tensor, position_embeddings, position_ids: torch.Tensor):
    """Attention each valid patch receives in one encoder layer, per image.

    Args:
        layer: a `Gemma4VisionEncoderLayer` (`input_layernorm`, `self_attn.{q,k}_proj`, `.{q,k}_norm`).
        hidden_states: (B, M, D) the layer's input.
        position_embeddings: (cos, sin), each (B, M, hd): the encoder's 2-D rotary tables.
        position_ids: (B, M, 2) patch (x, y) positions, (-1, -1) for padding.
    Returns:
        per image, (n_i,) fp32 over its valid patches in the processor's (raster) order, summing to 1.
    """
    attn = layer.self_attn
    rope = sys.modules[type(attn).__module__].apply_multidimensional_rope  # the encoder's own 2-D rotation
    x = layer.input_layernorm(hidden_states)
    B, M, _ = x.shape
    cos, sin = position_embeddings
    q = rope(attn.q_norm(attn.q_proj(x).view(B, M, -1, attn.head_dim)), cos, sin, position_ids)  # (B, M, H, hd)
    k = rope(attn.k_norm(attn.k_proj(x).view(B, M, -1, attn.head_dim)), cos, sin, position_ids)  # (B, M, Hkv, hd)
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    valid = (position_ids >= 0).all(dim=-1)  # (B, M); padding comes after an image's patches
    sizes = valid.sum(dim=1).tolist()
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    scores = received_attention(q[valid], k[valid], attn.scaling, list(zip(bounds[:-1], bounds[1:])))
    return list(torch.split(scores, sizes))


def pooled_scores(patch_scores: torch.Tensor, positions: torch.Tensor, pool: int) -> torch.Tensor:
    """Patch scores summed into the LLM tokens the pooler makes of them.

    Args:
        patch_scores: (n,) scores of an image's valid patches.
        positions: (n, 2) their (x, y) patch positions.
        pool: k, patches per token side.
    Returns:
        (rows * cols,) one score per pooled token, raster order of the token grid (the pooler's order).
    """
    x, y = positions[:, 0].long(), positions[:, 1].long()
    cols, rows = (int(x.max()) + 1) // pool, (int(y.max()) + 1) // pool
    token = (y // pool) * cols + x // pool  # (n,) the token each patch is pooled into
    return torch.zeros(rows * cols, dtype=patch_scores.dtype, device=patch_scores.device).index_add_(0, token, patch_scores)


class ReceivedScores:
    """Forward pre-hooks on the scoring encoder layers while the stock tower runs: a dict name ->
    per image (N_i,) pooled-token scores, filled during the pass (empty when no score is read)."""

    def __init__(self, tower: nn.Module, blocks: dict[str, tuple[str, int]], image_position_ids: torch.Tensor, pool: int):
        self.tower, self.blocks, self.positions, self.pool = tower, blocks, image_position_ids, pool
        self.scores: dict[str, list[torch.Tensor]] = {}
        self.hooks = []

    def __enter__(self) -> dict:
        for name, (_, index) in self.blocks.items():
            self.hooks.append(self.tower.encoder.layers[index].register_forward_pre_hook(
                functools.partial(self.hook, name), with_kwargs=True))
        return self.scores

    def hook(self, name: str, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs["position_ids"]
        with torch.no_grad():
            patches = received_attention_gemma4(module, hidden, kwargs["position_embeddings"], positions)
        valid = (positions >= 0).all(dim=-1)
        self.scores[name] = [pooled_scores(s, p[v], self.pool) for s, p, v in zip(patches, positions, valid)]

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return False

