"""FastV: one drop of image tokens after layer K of the LLM.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models", arXiv 2403.06764 (ECCV 2024). Reference code: github.com/pkunlp-icler/FastV.

Layers 0..K-1 see every token. Before layer K (prefill only):
  1. rank the image tokens by layer K-1's attention from the last prompt token: softmax of its
     query over all keys (fp32), mean over heads, image columns (the official code's rule; the
     paper's text says "attention received from all tokens", which the code never computes);
  2. keep the top round(N * (1 - R)) of them, in their order; text stays;
  3. kept tokens keep their ORIGINAL position ids, and decoding continues the original numbering.
K = 0 has no attention to rank by: a seeded random subset is kept.
The keep set is fixed at prefill (the HF port and the lmms-eval variant; without a cache the
original code re-selects at every step).

Deviations from the official code:
  - The query is never dropped (a prompt that ends with its image keeps its last token).
  - Batches with padding, grouped-query attention, SDPA / flash attention (the row is recomputed
    from layer K-1's projections instead of needing eager attention maps) and per-layer caches;
    the official code is batch 1, eager only, and one variant duplicates layer K-1's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import SEED_MAX, POSITION_RULES, InLLMMethod, check_choice, check_int, check_number, set_field

K = 2  # the paper's filtering layer
R = 0.5  # the paper's drop ratio


@dataclass(frozen=True)
class FastV(InLLMMethod):
    """Drop image tokens once, after layer k.

    Attributes:
        k: layers 0..k-1 see every token; from layer k on only the kept ones. k = 0 keeps a random
            subset (there is no attention to rank by). Must be in [0, depth).
        drop: the fraction of image tokens DROPPED, in [0, 1) (FastV's R; lmms-eval's "ratio" is
            the keep fraction, hence the explicit name). round(N * (1 - drop)) are kept.
        positions: "original" (kept tokens keep their position ids, official) or "renumber".
        seed: generator seed for k = 0, an int in [0, 2**63 - 1].
    """

    k: int = K
    drop: float = R
    positions: str = "original"
    seed: int = 0

    name = "fastv"

    def __post_init__(self):
        set_field(self, "k", check_int("k", self.k, 0, allowed="an int in [0, depth)"))
        set_field(self, "drop", check_number("drop", self.drop, 0.0, 1.0, high_open=True))
        check_choice("positions", self.positions, POSITION_RULES)
        set_field(self, "seed", check_int("seed", self.seed, 0, SEED_MAX))

    def boundaries(self, depth: int) -> tuple[int, ...]:
        if self.k >= depth:
            raise ValueError(f"k must be in [0, {depth}) for a {depth}-layer LLM, got {self.k}")
        return (self.k,)

    def keep_counts(self, n: int, depth: int) -> list[tuple[int, int]]:
        # 2. keep round(N * (1 - R)) (Python's round: half to even)
        return [(self.boundaries(depth)[0], round(n * (1 - self.drop)))]

    def layer_fractions(self, depth: int) -> list[float]:
        return [1.0 if layer < self.boundaries(depth)[0] else 1 - self.drop for layer in range(depth)]

    def ranking_layer(self, boundary: int) -> int | None:
        # 1. layer K-1's attention; K = 0 has none
        return boundary - 1 if boundary > 0 else None

    def random_scores(self, image: torch.Tensor) -> torch.Tensor:
        """(B, L) random scores over each sample's own image tokens: the same alone or in a padded batch."""
        scores = torch.zeros(image.shape, dtype=torch.float32, device=image.device)
        for b in range(image.shape[0]):
            where = image[b].nonzero().squeeze(1)
            generator = torch.Generator().manual_seed(self.seed)
            scores[b, where] = torch.rand(where.numel(), generator=generator).to(image.device)
        return scores
