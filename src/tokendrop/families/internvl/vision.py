"""The vision half of the InternVL adapter: run InternViT once, read features and score rows.

Imported when a pre-LLM method is applied (it needs torch and transformers), not by the declaration.

T tiles (every tile of every image, in the processor's order), g patches per tile side, k = 1 /
downsample_ratio, G = g / k LLM tokens per tile side after the pixel shuffle, N = G*G, Dv tower width.
"""

from __future__ import annotations

import torch

from tokendrop.compat import record_hidden_states
from tokendrop.scoring import received_attention


def queries_keys(layer, hidden_states: torch.Tensor, queries: int | None = None):
    """(q, k) of an InternViT layer from its input, each (T, n, H, hd): the layer's own norm, projections
    and q / k norms (`use_qk_norm`, over the full width, as the layer applies them). `queries`: only
    the first that many query rows (the [CLS] row: 1)."""
    attn = layer.attention
    x = layer.layernorm_before(hidden_states)  # (T, n, Dv)
    T, n, _ = x.shape
    x_q = x if queries is None else x[:, :queries]
    q = attn.q_norm(attn.q_proj(x_q)).view(T, x_q.shape[1], attn.num_heads, attn.head_dim)
    k = attn.k_norm(attn.k_proj(x)).view(T, n, attn.num_heads, attn.head_dim)
    return q, k


def cls_row(layer, hidden_states: torch.Tensor) -> torch.Tensor:
    """(T, n - 1) fp32: the [CLS] query's softmax attention over the patches, summed over heads (HiRED)."""
    q, k = queries_keys(layer, hidden_states, queries=1)
    logits = torch.einsum("tqhd,tnhd->thqn", q.float(), k.float())[:, :, 0] * layer.attention.scale  # (T, H, n)
    return logits.softmax(dim=-1)[:, :, 1:].sum(dim=1)  # drop [CLS] -> [CLS], sum heads


def received_row(layer, hidden_states: torch.Tensor) -> torch.Tensor:
    """(T, n - 1) fp32: the attention each patch receives, averaged over heads and queries (DominantDrop)."""
    q, k = queries_keys(layer, hidden_states)
    T, n = q.shape[:2]
    flat = lambda t: t.reshape(T * n, *t.shape[2:])  # noqa: E731
    row = received_attention(flat(q), flat(k), layer.attention.scale, [(t * n, (t + 1) * n) for t in range(T)])
    return row.view(T, n)[:, 1:]


SCORERS = {"cls": cls_row, "received": received_row}


def group_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Patch scores (T, g*g) -> LLM-token scores (T, N): the pixel shuffle folds each k x k block of
    patches (rows kr..kr+k-1, cols kc..kc+k-1) into the one token (r, c), so a token's score is the SUM
    of its k*k patches' scores (the rule of Qwen-VL's 2x2 merge)."""
    T, n = scores.shape
    g = int(round(n**0.5))
    return scores.view(T, g // k, k, g // k, k).sum(dim=(2, 4)).reshape(T, -1)


def tower_pass(base, pixel_values: torch.Tensor, feature_layer: int, blocks: dict[str, tuple[str, int]]):
    """Run InternViT once (its own attention backend), then the stock pixel shuffle.

    Args:
        base: the inner `InternVLModel` (its tower, config and `pixel_shuffle`).
        pixel_values: (T, 3, S, S) every tile of every image.
        blocks: name -> (score kind, encoder block) of every score to compute.
    Returns:
        outputs: the tower's output object.
        features: (T, N, k*k*Dv) pixel-shuffled features of `feature_layer`, [CLS] dropped (the
            projector's input, in the stock token order).
        scores: name -> (T, N) fp32 per LLM token (`group_scores` of the patch rows).
    """
    tower, config = base.vision_tower, base.config
    layers = tower.encoder.layer
    depth = len(layers)
    feature_index = feature_layer % (depth + 1)
    with record_hidden_states(layers, [feature_index, *(block for _, block in blocks.values())]) as hidden:
        outputs = tower(pixel_values=pixel_values.to(base.dtype), return_dict=True)
    states = outputs.last_hidden_state if feature_layer == -1 else hidden[feature_index]  # as the stock model reads
    patches = states[:, 1:]  # (T, g*g, Dv): [CLS] dropped ("default" strategy)
    T, n, width = patches.shape
    g = int(round(n**0.5))
    shuffled = base.pixel_shuffle(patches.reshape(T, g, g, width), scale_factor=config.downsample_ratio)
    features = shuffled.reshape(T, -1, shuffled.shape[-1])  # (T, N, k*k*Dv)
    k = int(round(1 / config.downsample_ratio))
    scores = {name: group_scores(SCORERS[kind](layers[block], hidden[block]), k) for name, (kind, block) in blocks.items()}
    return outputs, features, scores
