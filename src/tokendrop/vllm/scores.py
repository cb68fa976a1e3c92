"""Per-patch scores from vLLM's own CLIP tower: read from the fused `qkv_proj` of the scored layers.

vLLM's CLIP attention returns no weights (and one row is all HiRED needs), so a forward hook keeps
the output of `layers[b].self_attn.qkv_proj` while the tower runs its normal forward, and the rows
are recomputed from those queries and keys exactly as `tokendrop.scoring` does from transformers'
`q_proj` / `k_proj`: the same tower pass, never a second one, never an N x N map for all heads.

T tiles (every partition of every image), L = N + 1 tokens ([CLS] first), H heads, hd head width.
"""

from __future__ import annotations

import contextlib

import torch

from tokendrop.scoring import received_attention


@contextlib.contextmanager
def record_qkv(layers, blocks):
    """Keep the fused qkv output (T, L, 3 * H * hd) of every encoder block in `blocks` while the tower runs."""
    kept = {}
    hooks = []
    for block in sorted(set(blocks)):
        def keep(module, args, output, block=block):
            kept[block] = output[0] if isinstance(output, tuple) else output  # vLLM linears return (out, bias)

        hooks.append(layers[block].self_attn.qkv_proj.register_forward_hook(keep))
    try:
        yield kept
    finally:
        for hook in hooks:
            hook.remove()


def split_heads(qkv: torch.Tensor, attention) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (T, L, H, hd) of a fused qkv output; `attention` is vLLM's `CLIPAttention`."""
    heads, head_dim = attention.num_heads_per_partition, attention.head_dim
    q, k, _ = qkv.chunk(3, dim=-1)
    T, L, _ = q.shape
    return q.reshape(T, L, heads, head_dim), k.reshape(T, L, heads, head_dim)


def cls_scores(qkv: torch.Tensor, attention) -> torch.Tensor:
    """(T, N) fp32: the [CLS] query's softmax row over all keys, summed over heads, [CLS] column dropped."""
    q, k = split_heads(qkv, attention)
    q0 = q[:, :1].transpose(1, 2).float()  # (T, H, 1, hd)
    logits = (q0 @ k.transpose(1, 2).float().transpose(-1, -2)).squeeze(2) * attention.scale  # (T, H, L)
    return logits.softmax(dim=-1)[:, :, 1:].sum(dim=1)


def received_scores(qkv: torch.Tensor, attention) -> torch.Tensor:
    """(T, N) fp32: the attention each patch receives from its tile's queries, averaged (DominantDrop)."""
    q, k = split_heads(qkv, attention)
    T, L, H, hd = q.shape
    segments = [(t * L, (t + 1) * L) for t in range(T)]
    received = received_attention(q.reshape(T * L, H, hd), k.reshape(T * L, H, hd), attention.scale, segments)
    return received.view(T, L)[:, 1:]


#: score kind (`tokendrop.methods.base.Score.kind`) -> how it is computed here
SCORERS = {"cls": cls_scores, "received": received_scores}
