"""Configs and schedules of the in-LLM methods: PyramidDrop and FastV.

PyramidDrop: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", arXiv 2410.17247 (CVPR 2025); github.com/Cooperx521/PyramidDrop.
FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764 (ECCV 2024);
github.com/pkunlp-icler/FastV.

Both rank the image tokens by the attention the last prompt token pays them (softmax over all keys,
mean over heads, image columns only) and keep the top ones, in order, from a layer on. The keep
set is chosen at prefill and stays fixed while decoding. The layer loop that applies them lives in
`tokendrop.adapters.llm`; this module holds only configs and "how many" arithmetic.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from tokendrop.methods.base import SEED_MAX, check_int, check_number, set_field

POSITION_RULES = ("renumber", "original")


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class PyramidDrop:
    """Drop image tokens at stage boundaries inside the LLM.

    Attributes:
        layers: stage boundaries, strictly increasing in [1, depth); None means depth/4, depth/2,
            3*depth/4 ([8, 16, 24] for 32 layers).
        ratio: lambda in (0, 1]; stage s keeps int(N * ratio**s) of the ORIGINAL N image tokens.
        score_layer: "next" scores with the first layer of the next stage (official code);
            "last" with the stage's last layer (paper text).
        positions: "renumber" (positions contiguous after each drop, official) or "original".
    """

    layers: tuple[int, ...] | None = None
    ratio: float = 0.5
    score_layer: str = "next"
    positions: str = "renumber"

    def __post_init__(self):
        if self.layers is not None:
            layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else None
            if not layers:
                raise TypeError(f"layers must be a non-empty sequence of ints or None, got {self.layers!r}")
            layers = tuple(check_int("layers", x, -(2**31)) for x in layers)
            if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1:
                raise ValueError(f"layers must be strictly increasing and >= 1, got {list(layers)}")
            set_field(self, "layers", layers)
        set_field(self, "ratio", check_number("ratio", self.ratio, 0.0, 1.0, low_open=True))
        _check_choice("score_layer", self.score_layer, ("next", "last"))
        _check_choice("positions", self.positions, POSITION_RULES)

    def boundaries(self, depth: int) -> tuple[int, ...]:
        """The drop layers for an LLM of `depth` layers, validated against it."""
        layers = self.layers or (depth // 4, depth // 2, 3 * depth // 4)
        if layers[0] < 1 or layers[-1] >= depth or any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers must be strictly increasing in [1, {depth}) for a {depth}-layer LLM, got {list(layers)}")
        return tuple(layers)

    def keep_counts(self, n: int, depth: int) -> list[tuple[int, int]]:
        """(layer, image tokens kept from that layer on) for every boundary."""
        return [(layer, int(n * self.ratio ** (s + 1))) for s, layer in enumerate(self.boundaries(depth))]

    def layer_counts(self, n: int, depth: int) -> list[int]:
        """Image tokens each of the `depth` layers sees."""
        return _per_layer(n, depth, self.keep_counts(n, depth))


@dataclass(frozen=True)
class FastV:
    """Drop image tokens once, after layer k.

    Attributes:
        k: layers 0..k-1 see every token; from layer k on only the kept ones. k = 0 keeps a random
            subset (there is no attention to rank by). Must be in [0, depth).
        drop: the fraction of image tokens DROPPED, in [0, 1) (FastV's R; lmms-eval's "ratio" is
            the keep fraction, hence the explicit name). round(N * (1 - drop)) are kept.
        positions: "original" (kept tokens keep their position ids, official) or "renumber".
        seed: generator seed for k = 0.
    """

    k: int = 2
    drop: float = 0.5
    positions: str = "original"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral) or self.k < 0:
            raise ValueError(f"k must be an int in [0, depth), got {self.k!r}")
        set_field(self, "k", int(self.k))
        set_field(self, "drop", check_number("drop", self.drop, 0.0, 1.0, high_open=True))
        _check_choice("positions", self.positions, POSITION_RULES)
        set_field(self, "seed", check_int("seed", self.seed, 0, SEED_MAX))

    def boundaries(self, depth: int) -> tuple[int, ...]:
        if self.k >= depth:
            raise ValueError(f"k must be in [0, {depth}) for a {depth}-layer LLM, got {self.k}")
        return (self.k,)

    def keep_counts(self, n: int, depth: int) -> list[tuple[int, int]]:
        return [(self.boundaries(depth)[0], round(n * (1 - self.drop)))]

    def layer_counts(self, n: int, depth: int) -> list[int]:
        return _per_layer(n, depth, self.keep_counts(n, depth))


def _per_layer(n: int, depth: int, drops: list[tuple[int, int]]) -> list[int]:
    counts, current, pending = [], n, dict(drops)
    for layer in range(depth):
        current = pending.get(layer, current)
        counts.append(current)
    return counts
