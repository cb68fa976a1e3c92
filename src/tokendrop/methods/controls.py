"""Controls at the same budget as HiRED: random and spatially uniform dropping.

Random dropping and strided sampling are strong baselines in the token-reduction literature
(see the evaluation notes of VisionZip, DART and others), so every comparison should report them.
Both keep exactly `budget_tokens(budget, layout)` tokens, split across partitions in proportion to
their valid (post-unpad) token counts, i.e. at a uniform density over the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokendrop.methods.base import BudgetMethod, Layout, allocate, budget_tokens


def uniform_counts(budget: float, layout: Layout) -> list[int]:
    """Kept tokens per partition in proportion to each partition's valid tokens."""
    valid = layout.valid_counts()
    return allocate(budget_tokens(budget, layout), [float(v) for v in valid], valid)


@dataclass(frozen=True)
class RandomDrop(BudgetMethod):
    """Keep a uniformly random subset of each partition's valid tokens.

    The generator is seeded with `seed` for every image, so an image's selection depends only on
    the seed and the image's layout (the same alone or in a batch).
    """

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def counts(self, layout: Layout, scores=None) -> list[int]:
        return uniform_counts(self.budget, layout)

    def select(self, layout: Layout, scores=None) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        keep = []
        for valid, count in zip(layout.valid(), self.counts(layout)):
            candidates = valid.nonzero().squeeze(1)  # (V,)
            order = torch.randperm(candidates.numel(), generator=generator)[:count]
            keep.append(candidates[order].sort().values)
        return keep


@dataclass(frozen=True)
class SpatialDrop(BudgetMethod):
    """Keep evenly strided tokens of each partition: the i-th of n kept is valid token floor((i + 1/2) V / n)."""

    def counts(self, layout: Layout, scores=None) -> list[int]:
        return uniform_counts(self.budget, layout)

    def select(self, layout: Layout, scores=None) -> list[torch.Tensor]:
        keep = []
        for valid, count in zip(layout.valid(), self.counts(layout)):
            candidates = valid.nonzero().squeeze(1)  # (V,)
            picks = ((torch.arange(count, dtype=torch.float64) + 0.5) * candidates.numel() / max(count, 1)).long()
            keep.append(candidates[picks])
        return keep


@dataclass(frozen=True)
class BaseOnly(BudgetMethod):
    """Keep the base (downscaled whole-image) tokens and drop every tile: the low-resolution control.

    `budget` is ignored for selection (fixed at 1.0 by default); the count is N per image.
    """

    budget: float = 1.0

    def counts(self, layout: Layout, scores=None) -> list[int]:
        return [layout.patches] + [0] * layout.num_tiles

    def select(self, layout: Layout, scores=None) -> list[torch.Tensor]:
        return [torch.arange(layout.patches)] + [torch.empty(0, dtype=torch.long)] * layout.num_tiles

    def num_tokens(self, layout: Layout) -> int:
        return layout.patches
