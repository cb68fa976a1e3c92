"""HiRED: High-Resolution Early Dropping.

Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models", arXiv 2408.10945 (AAAI 2025). Reference code: github.com/hasanar1f/HiRED.

A fixed budget of B visual tokens per image, chosen before the LLM:
  Phase 1 (allocation): the base image keeps alpha*B; the tiles share the rest in proportion to
      the base image's early-layer (l_init) [CLS] attention mass over the region each tile covers.
  Phase 2 (dropping): every partition keeps its top tokens by the feature layer's (l_final) [CLS]
      attention summed over heads, in spatial order.

Scores arrive as dict entries, computed by `tokendrop.scoring` from the layers' own projections:
  scores["init"]:  (P, N) [CLS]->patch attention at l_init, summed over heads (row 0 = base image)
  scores["final"]: (P, N) [CLS]->patch attention at l_final, summed over heads

Deviations from the paper (Algorithm 1) and the official code, all for exact, known-in-advance counts:
  - B = floor(r * P * N) is capped at the tokens that survive unpadding, and only those are candidates
    (the official code can pick padding tokens that unpad then silently removes).
  - Tile shares are floored, then the leftovers go by largest remainder (the paper floors and loses
    them); a tile over its valid count hands its excess to the others, and to the base image last.
  - variant="official" takes the official code's phase-1 score (a 0/1 mask of the top (1-alpha)*N
    layer-0 tokens, counted over k contiguous bands of the flattened base grid) but keeps the exact
    rounding above. `official_budget_split` reproduces the official budget arithmetic itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod, Score, check_choice, check_int, check_number, set_field
from tokendrop.methods.layout import Layout, allocate, budget_tokens, floor_mul, top_k_sorted

VARIANTS = ("paper", "official")


@dataclass(frozen=True)
class HiRED(PreLLMMethod):
    """HiRED token dropping before the LLM.

    Attributes:
        budget: fraction r in (0, 1] of the P*N patch tokens to keep (0.2 keeps 20%).
        alpha: share in [0, 1] of the budget given to the base (full) image; the paper's best is 0.5.
        variant: "paper" (geometric tile regions, raw attention mass) or "official" (binarised
            counts over flattened bands, as in the code that produced the published numbers).
        init_layer: vision layer whose [CLS] attention allocates the budget (l_init, default 0).
        final_layer: vision layer whose [CLS] attention selects tokens (l_final); None means the
            layer that produces the LLM's features (config.vision_feature_layer).
        keep_newlines: pack one newline token per unpadded canvas row.
    """

    alpha: float = 0.5
    variant: str = "paper"
    init_layer: int = 0
    final_layer: int | None = None

    name = "hired"

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "alpha", check_number("alpha", self.alpha, 0.0, 1.0))
        check_choice("variant", self.variant, VARIANTS)
        for name in ("init_layer", "final_layer"):
            value = getattr(self, name)
            if value is not None:  # a layer index; negative counts from the end
                set_field(self, name, check_int(name, value, -(2**31)))

    def scores(self) -> dict[str, Score]:
        return {"init": Score("cls", self.init_layer), "final": Score("cls", self.final_layer)}

    def counts(self, layout: Layout, scores: dict[str, torch.Tensor]) -> list[int]:
        # 1. B = floor(r * P * N); the base image takes floor(alpha * B), at most N.
        total = budget_tokens(self.budget, layout)
        base = min(floor_mul(self.alpha, total), layout.patches)
        if layout.num_tiles == 0:  # single-partition model: no phase 1
            return [total]
        # 2. Content score of every tile, from the base image's l_init [CLS] attention.
        if self.variant == "paper":
            tile_scores = region_scores(scores["init"][0], layout)
        else:
            tile_scores = band_scores(scores["init"][0], layout.num_tiles, self.alpha)
        # 3. Tiles share B - base in proportion to their scores (exact; see module docstring).
        valid = layout.valid_counts()
        tiles = allocate(total - base, tile_scores.tolist(), valid[1:])
        return [total - sum(tiles)] + tiles

    def select(self, layout: Layout, scores: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # 4-5. Every partition keeps its top tokens by the l_final [CLS] row, in raster order.
        valid = layout.valid().to(scores["final"].device)
        counts = self.counts(layout, scores)
        return [top_k_sorted(scores["final"][p], counts[p], valid[p]) for p in range(len(counts))]


def region_scores(init_row: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Paper phase 1: s_i = attention mass of the base patches lying in tile i's region.

    Args:
        init_row: (N,) the base image's [CLS]->patch attention at l_init, summed over heads.
    Returns:
        (k,) float64 score per tile.
    """
    regions = layout.base_regions().to(init_row.device) - 1  # (N,) tile index 0..k-1
    return torch.zeros(layout.num_tiles, dtype=torch.float64, device=init_row.device).index_add_(
        0, regions, init_row.double()
    )


def band_scores(init_row: torch.Tensor, num_tiles: int, alpha: float) -> torch.Tensor:
    """Official-code phase 1: count the top floor((1 - alpha) * N) tokens in k flattened bands.

    Band c is the c-th of k contiguous chunks of the flattened (row-major) base grid, so for a
    2x2 grid the top-left tile is scored by base rows 0-5 of 24, not by its region.

    Args:
        init_row: (N,) the base image's [CLS]->patch attention at l_init, summed over heads.
    Returns:
        (k,) float64 count per tile.
    """
    n = init_row.shape[0]
    hot = torch.zeros(n, dtype=torch.float64, device=init_row.device)
    hot[top_k_sorted(init_row, floor_mul(1 - alpha, n))] = 1.0
    return torch.stack([band.sum() for band in torch.tensor_split(hot, num_tiles)])


def paper_allocation(total: int, alpha: float, ratios: list[float]) -> list[int]:
    """The paper's floor arithmetic (Algorithm 1, Fig. 4): sub-image i gets floor(N_sub * ratio_i).

    >>> paper_allocation(100, 0.5, [0.32, 0.08, 0.58, 0.02])
    [16, 4, 29, 1]
    """
    sub = total - floor_mul(alpha, total)
    return [floor_mul(r, sub) for r in ratios]


def official_budget_split(partitions: int, rate: float, alpha: float, patches: int = 576) -> tuple[int, int, int]:
    """The official code's budget arithmetic: (B, full-image tokens, sub-image pool).

    B = int(P * N * r); full = min(int(B * alpha), N); pool = min(B - full, (P - 1) * N).

    >>> official_budget_split(4, 0.4, 0.5)
    (921, 460, 461)
    """
    total = floor_mul(rate, partitions * patches)
    full = min(floor_mul(alpha, total), patches)
    return total, full, min(total - full, (partitions - 1) * patches)
