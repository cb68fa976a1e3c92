"""RandomDrop: a uniformly random subset of every partition's valid tokens, at HiRED's budget.

Random dropping is a strong control in the token-reduction literature (the evaluations of
VisionZip, DART and others report it), so every comparison should include it. It keeps exactly
`budget_tokens(budget, layout)` tokens, split across partitions in proportion to their valid
(post-unpad) tokens, i.e. at a uniform density over the image.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import SEED_MAX, PreLLMMethod, check_int, set_field
from tokendrop.methods.layout import Layout, uniform_counts


@dataclass(frozen=True)
class RandomDrop(PreLLMMethod):
    """Keep a uniformly random subset of each partition's valid tokens.

    The generator is seeded with `seed` for every image, so an image's selection depends only on
    the seed and the image's layout (the same alone or in a batch).

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to keep.
        seed: generator seed, an int in [0, 2**63 - 1].
    """

    seed: int = 0

    name = "random"

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
