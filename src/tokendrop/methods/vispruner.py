"""VisPruner: important tokens by the [CLS] attention, then diverse tokens by similarity matching.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", ICCV 2025, arXiv 2412.01818 (its later versions; the first was FasterVLM). Official code:
github.com/Theia-4869/VisPruner @ aefa01a (`llava/model/llava_arch.py` `encode_images`).

Per partition, with T tokens to keep (budget B = floor(budget * P * N), split over the partitions):
  1. rank the partition's tokens by the feature block's [CLS] attention (descending);
  2. important tokens: the first floor(T * important_ratio);
  3. the residual tokens, in that ranking order, are thinned to T_div = T - T_imp: repeatedly split
     them into even and odd positions, score every even token by its highest cosine similarity
     (pre-projector features, `Score` "features") to the odd ones, drop the r = min(8, R - T_div)
     most similar even tokens, and continue with the remaining even tokens (most similar first)
     followed by the odd ones;
  4. keep the important and the remaining residual tokens, in raster order.

Deviations from the official code:
  - Odd residual counts: the official even/odd split crashes when R is odd (its index bookkeeping
    assumes R // 2 even tokens); here the even positions are ceil(R / 2) tokens, each still scored
    against the floor(R / 2) odd ones, and at most all even tokens are dropped in one round (the
    official also crashes when r exceeds them, e.g. T_div = 1 with a residual of 8).
  - LLaVA-NeXT: the official gives every tile the same T (all its patches candidates, then unpads);
    here B is split equally over the partitions, capped at each partition's tokens that survive
    unpadding (the excess goes to the others, largest remainder, lower index first), and only those
    tokens are candidates, so the count is exact and known before encoding.
  - T_imp = floor(T * important_ratio) on the decimal written (0.58 * 50 = 29), the official int(x * y).
  - Ties to the lower index (stable sorts; the official's are unstable); scores and similarities
    in fp32 (the official: fp16), [CLS] row summed over heads (the official: mean; the same order).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod, Score, check_number, set_field
from tokendrop.methods.layout import Layout, allocate, budget_tokens, floor_mul

#: even tokens dropped per matching round at most (the official constant)
ROUND = 8


@dataclass(frozen=True)
class VisPruner(PreLLMMethod):
    """Keep [CLS]-important tokens plus diverse tokens thinned by even/odd similarity matching.

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to keep.
        important_ratio: share in [0, 1] of each partition's kept tokens chosen by [CLS] attention.
        keep_newlines: pack one newline token per unpadded canvas row (LLaVA-NeXT).
    """

    important_ratio: float = 0.5

    name = "vispruner"

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "important_ratio", check_number("important_ratio", self.important_ratio, 0.0, 1.0))

    def scores(self) -> dict[str, Score]:
        return {"cls": Score("cls"), "features": Score("features")}

    def counts(self, layout: Layout, scores=None) -> list[int]:
        """B split equally over the partitions, capped at each one's valid tokens."""
        valid = layout.valid_counts()
        return allocate(budget_tokens(self.budget, layout), [1.0] * len(valid), valid)

    def select(self, layout: Layout, scores: dict) -> list[torch.Tensor]:
        valid = layout.valid().to(scores["cls"].device)
        return [prune_partition(scores["cls"][p], scores["features"][p], valid[p], count, self.important_ratio)
                for p, count in enumerate(self.counts(layout))]


def prune_partition(cls_row: torch.Tensor, features: torch.Tensor, valid: torch.Tensor, count: int,
                    important_ratio: float) -> torch.Tensor:
    """Sorted kept indices of one partition.

    Args:
        cls_row: (N,) [CLS] attention; features: (N, Dv) pre-projector features; valid: (N,) bool.
    """
    candidates = valid.nonzero().squeeze(1)
    # 1. the valid tokens by [CLS] attention, highest first (ties: lower index)
    ranked = candidates[torch.argsort(cls_row[candidates], descending=True, stable=True)]
    # 2. the important tokens
    important = floor_mul(important_ratio, count)
    # 3. the residual thinned to count - important
    residual = thin_by_matching(ranked[important:], features, count - important)
    # 4. raster order
    return torch.cat([ranked[:important], residual]).sort().values


def thin_by_matching(residual: torch.Tensor, features: torch.Tensor, target: int) -> torch.Tensor:
    """The official loop: drop the even-position tokens most similar to the odd ones, up to ROUND a round,
    until `target` tokens remain (none when target is 0)."""
    if target <= 0:
        return residual[:0]
    unit = features.float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    while residual.numel() > target:
        even, odd = residual[0::2], residual[1::2]
        drop = min(ROUND, residual.numel() - target, even.numel())
        best = (unit[even] @ unit[odd].T).max(dim=1).values  # each even token's closest odd token
        survivors = torch.argsort(best, descending=True, stable=True)[drop:]
        residual = torch.cat([even[survivors], odd])
    return residual
