"""DivPrune: keep the most diverse visual tokens (greedy max-min diversity on the projected features).

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
arXiv 2503.02175 (CVPR 2025). Official code: github.com/vbdi/divprune @ 799e2d9 (read to check the
algorithm: its licence is non-commercial, so this file is written from the paper).

The pruning is a Max-Min Diversity Problem over an image's visual tokens, solved greedily:
  1. candidates: the image's tokens as the LLM would receive them (`Score` "projected", after the
     projector), in the order of the packed sequence (LLaVA-NeXT: base image, then the unpadded
     canvas row by row; tokens lost to unpadding are not candidates); distance d(i, j) = 1 - cosine;
  2. the budget B = floor(budget * P * N) tokens, over all of the image's partitions together;
  3. first pick: the token whose nearest other token is farthest (the largest second-smallest
     distance in its column of the distance matrix, the smallest being its distance to itself);
  4. every next pick: the token whose minimum distance to the picked set is largest;
  5. ties go to the lower index (the first candidate in packed order); kept in raster order.

Deviations from the official code:
  - The budget is B = floor(budget * P * N) (capped at the valid tokens), known before encoding; the
    official keeps round(ratio * n) of the n packed tokens, so its count depends on the unpadding.
  - LLaVA-NeXT: the official code prunes the packed sequence, newline tokens included as candidates
    (one can be picked, and the rows lose their newlines); here newlines are never candidates and
    `keep_newlines` decides whether every row's newline is packed.
  - Picked tokens are excluded explicitly (the official relies on their self-distance being 0, so
    with duplicate features it can pick a token twice and keep fewer than its count).
  - Distances in fp32 (the official: the model's dtype, fp16); a zero feature vector is read as
    norm 1e-12 instead of dividing by 0. Distances to the picked set are kept as a running minimum
    (one row per pick) instead of re-reading every picked row: the same values, O(V) memory per step.
  - Batches of any size, each image on its own (the official: batch 1, one image).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod, Score
from tokendrop.methods.layout import Layout, budget_tokens

#: distance-matrix entries computed at once for the first pick (memory bound, not an approximation)
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class DivPrune(PreLLMMethod):
    """Keep the image's most diverse tokens: greedy max-min diversity on `1 - cosine` of the projected features.

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to keep, chosen over all partitions together.
        keep_newlines: pack one newline token per unpadded canvas row (LLaVA-NeXT).
    """

    name = "divprune"

    def scores(self) -> dict[str, Score]:
        return {"projected": Score("projected")}

    def counts(self, layout: Layout, scores: dict) -> list[int]:
        """Kept tokens per partition: where the diversity picks fall (all partitions compete)."""
        return [k.numel() for k in self.select(layout, scores)]

    def select(self, layout: Layout, scores: dict) -> list[torch.Tensor]:
        features = scores["projected"]  # (P, N, D)
        n = layout.patches
        # 1. the candidates in packed order, as flat indices p * N + n
        order = packed_order(layout).to(features.device)
        # 2-5. B greedy max-min picks among them (all of them: no need to order them)
        total = budget_tokens(self.budget, layout)
        rows = features.reshape(-1, features.shape[-1])[order]  # (V, D)
        flat = order if total == order.numel() else order[max_min_diversity(rows, total)]
        return [(flat[flat // n == p] % n).sort().values for p in range(layout.num_partitions)]


def packed_order(layout: Layout) -> torch.Tensor:
    """(V,) long: flat indices p * N + n of the valid tokens in the order the LLM receives them:
    partition 0 in raster order, then the unpadded canvas (tiles 1..k) row by row."""
    base = torch.arange(layout.patches)
    if not layout.num_tiles:
        return base
    g, cols = layout.grid, layout.tiles[1]
    rows, columns = layout.canvas_valid().nonzero(as_tuple=True)  # canvas (row, col), raster order
    tile = 1 + (rows // g) * cols + columns // g
    return torch.cat([base, tile * layout.patches + (rows % g) * g + columns % g])


def max_min_diversity(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity: (k,) long indices into the V rows of `features` (V, D), in pick order.

    Distance d(i, j) = 1 - cos(x_i, x_j). First pick: argmax over j of the second-smallest d(., j);
    then argmax of the minimum distance to the picked set. Ties: the lower index (`argmax`'s first).
    """
    count = features.shape[0]
    k = min(k, count)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    unit = features.float()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    picks = torch.empty(k, dtype=torch.long, device=features.device)
    picks[0] = first_pick(unit)
    nearest = 1.0 - unit @ unit[picks[0]]  # (V,) distance to the picked set
    taken = torch.zeros(count, dtype=torch.bool, device=features.device)
    taken[picks[0]] = True
    for i in range(1, k):
        picks[i] = torch.argmax(nearest.masked_fill(taken, float("-inf")))
        taken[picks[i]] = True
        nearest = torch.minimum(nearest, 1.0 - unit @ unit[picks[i]])
    return picks


def first_pick(unit: torch.Tensor) -> torch.Tensor:
    """The index of the column of D = 1 - U U^T whose second-smallest entry is largest (U: unit rows)."""
    count = unit.shape[0]
    if count == 1:
        return torch.zeros((), dtype=torch.long, device=unit.device)
    step = max(1, CHUNK_ELEMENTS // count)
    second = [(1.0 - unit @ unit[start:start + step].T).topk(2, dim=0, largest=False).values[1]
              for start in range(0, count, step)]  # columns start.. of D, each its second-smallest entry
    return torch.argmax(torch.cat(second))
