"""Attention rows recomputed from a layer's own projections: never an N x N map.

Token-dropping methods need one row of an attention map: the [CLS] row of a ViT layer (HiRED) or
the last prompt token's row of an LLM layer (FastV, PyramidDrop). SDPA and flash attention do not
return maps, and asking for eager attention costs O(N^2) memory per head. One row costs a single
(1 x d) @ (d x N) product per head, computed here from the layer's input with the layer's own
norm and projections, in fp32.

Shapes: B batch, H heads, N tokens, D width, hd head width.
"""

from __future__ import annotations

import torch
from torch import nn


def cls_attention_row(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the [CLS] query (token 0) over all keys in a CLIP encoder layer.

    Args:
        layer: a `CLIPEncoderLayer` (has `layer_norm1` and `self_attn.{q,k}_proj`).
        hidden_states: (B, N, D) the layer's INPUT (hidden_states[i] for layer i).
    Returns:
        (B, H, N) fp32 rows, each summing to 1 (column 0 is [CLS] -> [CLS]).
    """
    attn = layer.self_attn
    x = layer.layer_norm1(hidden_states)  # (B, N, D)
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(x[:, :1]).view(B, 1, H, hd).transpose(1, 2)  # (B, H, 1, hd)
    k = attn.k_proj(x).view(B, N, H, hd).transpose(1, 2)  # (B, H, N, hd)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scale  # (B, H, N)
    return logits.softmax(dim=-1)


def query_attention_row(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_mask: torch.Tensor,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of a few query tokens per sample in a Llama-style decoder layer, averaged.

    At inference the query is the last prompt token (FastV, PyramidDrop); in training, the token
    before each answer span (PyramidDrop), whose rows are averaged.

    Args:
        layer: a decoder layer with `input_layernorm` and `self_attn.{q,k}_proj` (Llama, Mistral,
            Qwen2, the Qwen-VL text models; Qwen3's `q_norm` / `k_norm` applied when present);
            grouped-query attention is handled by repeating keys per group.
        hidden_states: (B, L, D) the layer's input.
        position_embeddings: (cos, sin), each (B or 1, L, hd): the RoPE tables of the current positions.
        query_mask: (B, L) bool, the query tokens of every sample (at least one each).
        key_mask: (B, L) bool, keys that may be attended to (False for padding); causal masking
            (keys after each query) is applied on top.
    Returns:
        (B, L) fp32 attention over keys, averaged over heads and queries; rows sum to 1.
    """
    Q = int(query_mask.sum(dim=1).max())
    q_index = torch.argsort((~query_mask).to(torch.int8), dim=1, stable=True)[:, :Q]  # (B, Q) queries first
    q_valid = query_mask.gather(1, q_index)  # (B, Q)
    rows = query_attention_rows(layer, hidden_states, position_embeddings, q_index, key_mask).mean(dim=1)  # (B, Q, L)
    weights = q_valid.float() / q_valid.sum(dim=1, keepdim=True)  # (B, Q)
    return (rows * weights[..., None]).sum(dim=1)


def query_attention_rows(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head softmax attention rows of chosen query positions in a Llama-style decoder layer.

    Differentiable (training uses it to supervise where an answer looks).

    Args:
        layer, hidden_states, position_embeddings, key_mask: as in `query_attention_row`.
        query_index: (B, Q) long positions of the queries (any valid position for unused slots).
    Returns:
        (B, H, Q, L) fp32 rows, each summing to 1 over the keys it may see (causal and ``key_mask``).
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_states)  # (B, L, D)
    B, L, D = x.shape
    Q, hd = query_index.shape[1], attn.head_dim
    x_q = x.gather(1, query_index[..., None].expand(-1, -1, D))  # (B, Q, D)
    q = head_norm(attn, "q_norm", queries(attn, x_q)).transpose(1, 2)  # (B, Hq, Q, hd)
    k = head_norm(attn, "k_norm", attn.k_proj(x).view(B, L, -1, hd)).transpose(1, 2)  # (B, Hkv, L, hd)
    cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)  # a batch of 1 when positions are shared
    pick = query_index[..., None].expand(-1, -1, cos.shape[-1])
    q = rotate(q, cos.gather(1, pick), sin.gather(1, pick))
    k = rotate(k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, L, hd)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # (B, Hq, Q, L)
    allowed = torch.arange(L, device=x.device)[None, None, :] <= query_index[..., None]  # (B, Q, L) causal
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)


def queries(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T, Hq, hd) queries of x (B, T, D); a gated attention (Qwen3.5) projects [query, gate] per
    head, of which the query half is taken."""
    B, T, _ = x.shape
    hd = attention.head_dim
    q = attention.q_proj(x)
    heads = getattr(getattr(attention, "config", None), "num_attention_heads", None)
    if heads is not None and q.shape[-1] == 2 * heads * hd:  # (B, T, Hq, 2 hd): query, then gate
        return q.view(B, T, heads, 2 * hd)[..., :hd]
    return q.view(B, T, -1, hd)


def head_norm(attention: nn.Module, name: str, states: torch.Tensor) -> torch.Tensor:
    """The attention's per-head norm of queries or keys (Qwen3: `q_norm`, `k_norm`), when it has one."""
    norm = getattr(attention, name, None)
    return states if norm is None else norm(states)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, T, hd) with tables (B, T, hd): x cos + rotate_half(x) sin.

    The tables already hold any multimodal layout (M-RoPE sections are composed by the model's
    rotary module), so this one formula serves Llama, Qwen2 and the Qwen-VL text models.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


#: queries per block in `received_attention`, chosen so that a block's (H, queries, keys) fp32
#: probabilities stay near this many elements whatever the image size: on CPU a block that fits the
#: cache (2**20 = 4 MiB; measured 2.2x faster than 64 MiB blocks on a 5,184-patch image, 1 thread),
#: elsewhere large blocks (fewer kernel launches)
RECEIVED_BLOCK_ELEMENTS = {"cpu": 2**20}
RECEIVED_BLOCK_ELEMENTS_DEFAULT = 2**24


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, segments: list[tuple[int, int]]) -> torch.Tensor:
    """Attention each token receives, averaged over heads and over the queries of its segment.

    Exact, at full resolution, without an N x N map for all heads: the queries of a segment go in
    blocks (`RECEIVED_BLOCK_ELEMENTS`), each block's softmax rows are summed into the keys' totals.
    Compute is that of one attention map (H * n^2 * hd multiply-adds per segment of n tokens).

    Args:
        q, k: (N, H, hd) queries and keys (rotary already applied), any float dtype.
        scale: the attention's softmax scale.
        segments: [start, end) ranges of N that attend only among themselves (images, frames, tiles).
    Returns:
        (N,) fp32; within every segment the values sum to 1.
    """
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    heads = q.shape[1]
    elements = RECEIVED_BLOCK_ELEMENTS.get(q.device.type, RECEIVED_BLOCK_ELEMENTS_DEFAULT)
    for start, end in segments:
        keys_t = k[start:end].float().permute(1, 2, 0)  # (H, hd, n)
        n = end - start
        block = max(1, elements // (heads * n))
        for first in range(start, end, block):
            queries = (q[first:min(first + block, end)].float() * scale).transpose(0, 1)  # (H, c, hd), scaled once
            probs = (queries @ keys_t).softmax(dim=-1)  # (H, c, n)
            out[start:end] += probs.sum(dim=(0, 1))
        out[start:end] /= heads * n
    return out


def received_attention_clip(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`received_attention` in a CLIP / SigLIP encoder layer, each image of the batch its own segment.

    Args:
        layer: an encoder layer with `layer_norm1` and `self_attn.{q,k}_proj`, `.scale`.
        hidden_states: (T, N, D) the layer's input.
    Returns:
        (T, N) fp32, every row summing to 1 (the [CLS] column included, when there is one).
    """
    attn = layer.self_attn
    x = layer.layer_norm1(hidden_states)
    T, N, _ = x.shape
    q = attn.q_proj(x).view(T * N, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).view(T * N, attn.num_heads, attn.head_dim)
    return received_attention(q, k, attn.scale, [(t * N, (t + 1) * N) for t in range(T)]).view(T, N)


def received_attention_qwen(block: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                            position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`received_attention` in a Qwen-VL vision block, from the block's own inputs.

    Args:
        block: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision block (`norm1`, `attn.qkv`, `attn.scaling`).
        hidden_states: (N, D) the block's input, all patches of all images in the block's order.
        cu_seqlens: (S + 1,) boundaries of the segments that attend among themselves.
        position_embeddings: (cos, sin), each (N, hd): the vision rotary tables.
    Returns:
        (N,) fp32 per patch, in the block's order.
    """
    attn = block.attn
    x = block.norm1(hidden_states)
    N = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(N, 3, attn.num_heads, -1).unbind(1)  # each (N, H, hd)
    cos, sin = (t.float()[:, None] for t in position_embeddings)  # (N, 1, hd)
    q, k = (rotate_half_vision(t.float(), cos, sin) for t in (q, k))
    bounds = cu_seqlens.tolist()
    return received_attention(q, k, attn.scaling, list(zip(bounds[:-1], bounds[1:])))


def rotate_half_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin for (N, H, hd) vision queries / keys."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
