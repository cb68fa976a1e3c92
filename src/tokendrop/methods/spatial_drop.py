"""SpatialDrop: evenly spread tokens over every partition, at HiRED's budget (the spatial control).

Strided sampling is a strong control in the token-reduction literature. SpatialDrop keeps exactly
`budget_tokens(budget, layout)` tokens, split across partitions in proportion to their valid
(post-unpad) tokens, each partition's share on an even 2-D lattice over its valid rectangle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod
from tokendrop.methods.layout import Layout, allocate, uniform_counts


@dataclass(frozen=True)
class SpatialDrop(PreLLMMethod):
    """Keep tokens on an even 2-D lattice over each partition's valid (unpadded) rectangle.

    n tokens over an r x c rectangle: about sqrt(n r / c) evenly spaced rows, the n tokens split
    evenly among them, each row's tokens evenly strided (a 1-D stride over raster order would
    line up in columns whenever the stride nearly divides the row length).

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to keep.
    """

    name = "spatial"

    def counts(self, layout: Layout, scores=None) -> list[int]:
        return uniform_counts(self.budget, layout)

    def select(self, layout: Layout, scores=None) -> list[torch.Tensor]:
        keep = []
        for valid, count in zip(layout.valid(), self.counts(layout)):
            grid = valid.view(layout.grid, layout.cols)  # the valid tokens form a rectangle
            rows, cols = grid.any(dim=1).nonzero().squeeze(1), grid.any(dim=0).nonzero().squeeze(1)
            if count == 0:
                keep.append(torch.empty(0, dtype=torch.long))
                continue
            r, c = lattice(rows.numel(), cols.numel(), count)
            keep.append((rows[r] * layout.cols + cols[c]).sort().values)
        return keep


def lattice(rows: int, cols: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of n points spread evenly over a rows x cols grid, 0 < n <= rows * cols."""
    used_rows = min(rows, max(round(math.sqrt(n * rows / cols)), math.ceil(n / cols), 1))
    per_row = allocate(n, [1.0] * used_rows, [cols] * used_rows)
    at = lambda k, size: ((torch.arange(k, dtype=torch.float64) + 0.5) * size / k).long()  # noqa: E731
    r = torch.cat([torch.full((m,), int(row)) for row, m in zip(at(used_rows, rows), per_row)])
    c = torch.cat([at(m, cols) for m in per_row])
    return r, c
