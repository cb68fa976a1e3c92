"""Controls at the same budget as HiRED: random and spatially uniform dropping.

Random dropping and strided sampling are strong baselines in the token-reduction literature
(see the evaluation notes of VisionZip, DART and others), so every comparison should report them.
Both keep exactly `budget_tokens(budget, layout)` tokens, split across partitions in proportion to
their valid (post-unpad) token counts, i.e. at a uniform density over the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokendrop.methods.base import SEED_MAX, BudgetMethod, Layout, allocate, budget_tokens, check_int, set_field


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
        set_field(self, "seed", check_int("seed", self.seed, 0, SEED_MAX))

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
    """Keep tokens on an even 2-D lattice over each partition's valid (unpadded) rectangle.

    n tokens over an r x c rectangle: about sqrt(n r / c) evenly spaced rows, the n tokens split
    evenly among them, each row's tokens evenly strided (a 1-D stride over raster order would
    line up in columns whenever the stride nearly divides the row length).
    """

    def counts(self, layout: Layout, scores=None) -> list[int]:
        return uniform_counts(self.budget, layout)

    def select(self, layout: Layout, scores=None) -> list[torch.Tensor]:
        keep = []
        for valid, count in zip(layout.valid(), self.counts(layout)):
            grid = valid.view(layout.grid, layout.grid)  # the valid tokens form a rectangle
            rows, cols = grid.any(dim=1).nonzero().squeeze(1), grid.any(dim=0).nonzero().squeeze(1)
            if count == 0:
                keep.append(torch.empty(0, dtype=torch.long))
                continue
            r, c = lattice(rows.numel(), cols.numel(), count)
            keep.append((rows[r] * layout.grid + cols[c]).sort().values)
        return keep


def lattice(rows: int, cols: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of n points spread evenly over a rows x cols grid, 0 < n <= rows * cols."""
    used_rows = min(rows, max(round(math.sqrt(n * rows / cols)), math.ceil(n / cols), 1))
    per_row = allocate(n, [1.0] * used_rows, [cols] * used_rows)
    at = lambda k, size: ((torch.arange(k, dtype=torch.float64) + 0.5) * size / k).long()  # noqa: E731
    r = torch.cat([torch.full((m,), int(row)) for row, m in zip(at(used_rows, rows), per_row)])
    c = torch.cat([at(m, cols) for m in per_row])
    return r, c


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
