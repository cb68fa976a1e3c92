"""Which patch each image token shows, and the per-token targets of the grounding and tally losses.

The grounding and tally targets of an example are (position, (V, N) patch mask) pairs
(``batches.encode_example``); the losses need them over the tokens of the batch, so each image token
is mapped to the patch it shows, in the stock layout (full inputs) or in a pre-LLM method's kept
order (dropped inputs).
"""

from __future__ import annotations

import torch


def image_token_patches(model, input_ids: torch.Tensor, image_sizes: torch.Tensor, views: list[int]) -> torch.Tensor:
    """Which patch every image token of each sequence shows: (B, L) long, ``v * N + n`` for patch n
    of view v (base first), -1 for text and newline tokens.

    Asks the model's own ``pack_image_features`` (unpadding, newlines) to pack patch indices instead
    of features, so the map is the stock layout by construction. ``views`` = views per image.
    """
    base = model.model
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    newline = torch.tensor([-1.0])
    out = torch.full(input_ids.shape, -1, dtype=torch.long)
    for b, v in enumerate(views):
        index = torch.arange(v * n, dtype=torch.float32).view(v, n, 1)  # (V, N, 1): exact in fp32
        packed = base.pack_image_features([index], image_sizes[b : b + 1], "default", image_newline=newline)[0][0]  # (K, 1)
        where = (input_ids[b] == model.config.image_token_id).nonzero().squeeze(1)  # (K,)
        if where.numel() != packed.shape[0]:
            raise ValueError(f"sequence {b} has {where.numel()} image tokens, the image packs to {packed.shape[0]}")
        out[b, where] = packed[:, 0].round().long()
    return out


def kept_token_patches(input_ids: torch.Tensor, selections: list[torch.Tensor], grid: int, image_token_id: int) -> torch.Tensor:
    """``image_token_patches`` for a batch encoded under a pre-LLM method (no newline tokens): the
    handle's ``selections`` (K, 3) (partition, row, col) per image, in packed order. Returns (B, L)."""
    out = torch.full(input_ids.shape, -1, dtype=torch.long)
    for b, where in enumerate(selections):
        pos = (input_ids[b] == image_token_id).nonzero().squeeze(1)  # (K,)
        if pos.numel() != where.shape[0]:
            raise ValueError(f"sequence {b} has {pos.numel()} image tokens, the method kept {where.shape[0]}")
        out[b, pos] = (where[:, 0] * grid + where[:, 1]) * grid + where[:, 2]
    return out


def grounding_targets(batch: dict, patch: torch.Tensor, key: str = "focus") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query positions and target keys of the grounding loss (``key="tally"``: of the tally loss).

    ``patch`` (B, L): the patch each image token shows (``image_token_patches`` / ``kept_token_patches``).
    Returns ``query`` (B, Q) long (the grounded tokens of ``batch["focus"]``: the token predicting each
    answer, and the lead tokens when ``encode_example`` added them), ``target`` (B, Q, L) bool (the
    image tokens of the patches that answer is about) and ``valid`` (B, Q) bool (False for unused
    slots and for answers whose patches were all dropped).
    """
    B, L = patch.shape
    focus = batch[key]
    Q = max(1, max(len(f) for f in focus))
    query = torch.zeros((B, Q), dtype=torch.long)
    target = torch.zeros((B, Q, L), dtype=torch.bool)
    for b, items in enumerate(focus):
        for q, (pos, mask, *_) in enumerate(items):
            flat = mask.flatten()  # (V * N,)
            query[b, q] = pos
            target[b, q] = (patch[b] >= 0) & flat[patch[b].clamp(min=0)]
    return query, target, target.any(dim=-1)


def batch_token_patches(model, batch: dict) -> torch.Tensor:
    """``image_token_patches`` of a stock training batch (``collate``). Returns (B, L)."""
    return image_token_patches(model, batch["inputs"]["input_ids"], batch["inputs"]["image_sizes"], batch["views"])


def tally_counts(tally: list[list[tuple]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching-object counts (B, Q) float and used slots (B, Q) bool of ``batch["tally"]``."""
    counts = torch.zeros((len(tally), width))
    valid = torch.zeros((len(tally), width), dtype=torch.bool)
    for b, items in enumerate(tally):
        for q, (_, _, n) in enumerate(items):
            counts[b, q], valid[b, q] = n, True
    return counts, valid
