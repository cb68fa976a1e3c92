"""Where an image's tokens are, and the budget arithmetic every pre-LLM method shares.

Dimension letters used in this package: P partitions (partition 0 is the base image, 1..k the
tiles of the high-resolution canvas), G patches per tile side, N = G*G patches per partition.

Pure integer and tensor math: no model imports (torch is imported on first use, `tokendrop.lazy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from tokendrop.lazy import torch


@dataclass(frozen=True)
class Layout:
    """Where the patch tokens of one image are and which of them survive unpadding.

    Attributes:
        grid: G, patches per tile side (N = G*G tokens per partition).
        tiles: (rows, cols) of the high-resolution tile grid; (0, 0) for single-partition models.
        crop: (top, bottom, left, right) of the unpadded canvas in token units; the canvas is
            (rows*G, cols*G) tokens and the model keeps rows [top, bottom) and cols [left, right).
        grid_cols: columns of a single partition that is not square (Qwen-VL's native-resolution
            grid of `grid` rows x `grid_cols` merged tokens); 0 means square.
        newlines: the model can pack a newline token after every canvas row (LLaVA-NeXT); False
            for tiled models without them (InternVL), where `keep_newlines` adds nothing.
    """

    grid: int
    tiles: tuple[int, int] = (0, 0)
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    grid_cols: int = 0
    newlines: bool = True

    def __post_init__(self):
        if self.grid_cols and self.tiles != (0, 0):
            raise ValueError("a tiled layout has square tiles: grid_cols applies to single-partition layouts")

    @property
    def cols(self) -> int:
        """Token columns of a partition (G for square tiles)."""
        return self.grid_cols or self.grid

    @property
    def patches(self) -> int:
        return self.grid * self.cols

    @property
    def num_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    @property
    def num_partitions(self) -> int:
        return 1 + self.num_tiles

    @property
    def canvas_rows(self) -> int:
        """Rows of the unpadded canvas: one newline token each when newlines are packed."""
        return self.crop[1] - self.crop[0]

    def canvas_valid(self) -> torch.Tensor:
        """(rows*G, cols*G) bool: canvas tokens that survive unpadding."""
        top, bottom, left, right = self.crop
        valid = torch.zeros(self.tiles[0] * self.grid, self.tiles[1] * self.grid, dtype=torch.bool)
        valid[top:bottom, left:right] = True
        return valid

    def valid(self) -> torch.Tensor:
        """(P, N) bool: tokens of every partition that can be kept (all of the base partition)."""
        base = torch.ones(1, self.patches, dtype=torch.bool)
        if not self.num_tiles:
            return base
        rows, cols, g = self.tiles[0], self.tiles[1], self.grid
        tiles = self.canvas_valid().view(rows, g, cols, g).permute(0, 2, 1, 3).reshape(rows * cols, g * g)
        return torch.cat([base, tiles])

    def valid_counts(self) -> list[int]:
        """Valid tokens per partition, base first."""
        return self.valid().sum(dim=1).tolist()

    def base_regions(self) -> torch.Tensor:
        """(N,) long: the tile (1..k) whose region holds the centre of each base-image patch.

        The base image is the whole image squashed to one tile; the canvas holds the same image,
        aspect preserved, in `crop`. A base patch at (a, b) has its centre at ((a+.5)/G, (b+.5)/G)
        of the image, i.e. at canvas row top + (a+.5)/G * height; its tile is that point's tile.
        """
        g = self.grid
        top, bottom, left, right = self.crop
        centres = (torch.arange(g, dtype=torch.float64) + 0.5) / g  # (G,)
        rows = ((top + centres * (bottom - top)) // g).long().clamp(0, self.tiles[0] - 1)
        cols = ((left + centres * (right - left)) // g).long().clamp(0, self.tiles[1] - 1)
        return (1 + rows[:, None] * self.tiles[1] + cols[None, :]).reshape(-1)


def floor_mul(fraction: float, n: int) -> int:
    """floor(fraction * n) computed on the decimal the user wrote (0.58 * 50 is 29, not 28)."""
    return math.floor(Fraction(str(fraction)) * n)


def budget_tokens(budget: float, layout: Layout) -> int:
    """B = floor(budget * P * N), capped at the number of tokens that survive unpadding."""
    return min(floor_mul(budget, layout.num_partitions * layout.patches), sum(layout.valid_counts()))


def allocate(total: int, weights: list[float], capacity: list[int]) -> list[int]:
    """Split `total` tokens in proportion to `weights`, each share capped at its `capacity`.

    Shares are floored and the rounding leftovers go by largest remainder (ties to the lower
    index). A share over its capacity is cut, and the excess is split again among the others, so
    the result always sums to min(total, sum(capacity)). Zero total weight splits by free room.
    """
    counts = [0] * len(capacity)
    remaining = min(total, sum(capacity))
    while remaining > 0:
        room = [c - k for c, k in zip(capacity, counts)]
        w = [wi if r > 0 else 0.0 for wi, r in zip(weights, room)]
        if sum(w) <= 0:
            w = [float(r) for r in room]
        ideal = [remaining * wi / sum(w) for wi in w]
        share = [math.floor(x) for x in ideal]
        by_remainder = sorted(range(len(w)), key=lambda i: (-(ideal[i] - share[i]), i))
        for i in by_remainder[: remaining - sum(share)]:
            share[i] += 1
        share = [min(s, r) for s, r in zip(share, room)]
        counts = [k + s for k, s in zip(counts, share)]
        remaining -= sum(share)
    return counts


def top_k_sorted(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k highest scores, returned in ascending (spatial) order.

    Args:
        scores: (N,) float.
        k: how many to keep; at most the number of valid entries.
        valid: (N,) bool; invalid entries are never chosen.

    Ties break by the lower index (a stable sort), so selections are reproducible.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return order.sort().values


def uniform_counts(budget: float, layout: Layout) -> list[int]:
    """Kept tokens per partition in proportion to each partition's valid tokens (uniform density)."""
    valid = layout.valid_counts()
    return allocate(budget_tokens(budget, layout), [float(v) for v in valid], valid)
