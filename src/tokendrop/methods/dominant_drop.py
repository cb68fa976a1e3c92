"""DominantDrop: keep the tokens that receive the most attention in one vision layer.

The "dominant tokens" of VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in
Vision Language Models", arXiv 2412.04467; github.com/dvlab-research/VisionZip), without its
merging of the dropped tokens into a few contextual ones: a [CLS]-free attention score, so it runs
on towers without [CLS] (SigLIP, the Qwen-VL towers) as well as on CLIP.

  1. score every token by the attention it receives in vision layer `layer`: softmax rows of all
     queries of its image (tile, frame), averaged over heads and queries, recomputed from the
     layer's own projections (`tokendrop.scoring.received_attention`); on Qwen-VL the four patches
     of a 2x2 merge group add up to the score of their LLM token, on Gemma 4 the k x k patches its
     pooler averages into one token;
  2. the budget B = floor(budget * P * N) is split over the partitions in proportion to their valid
     tokens (the same split as RandomDrop and SpatialDrop, so the three compare at equal density);
  3. every partition keeps its top tokens by score (ties: lower index), in raster order.

Deviations from VisionZip: no contextual (merged) tokens; VisionZip scores CLIP by its [CLS] row
and SigLIP by the received attention, this method uses the received attention on every tower (HiRED
is the [CLS]-based method here); the budget is split per partition instead of over the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod, Score, check_int, set_field
from tokendrop.methods.layout import Layout, top_k_sorted, uniform_counts


@dataclass(frozen=True)
class DominantDrop(PreLLMMethod):
    """Keep the tokens that receive the most attention in one vision layer (VisionZip's dominant tokens).

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to keep.
        layer: vision encoder block whose attention scores the tokens; None: the block that
            produces the LLM's features (LLaVA: `vision_feature_layer`; Qwen-VL: the last block,
            Qwen2.5-VL: the last full-attention block, as window blocks normalise per window; Gemma 4:
            the last encoder layer, which its pooler reads).
    """

    layer: int | None = None

    name = "dominant"

    def __post_init__(self):
        super().__post_init__()
        if self.layer is not None:  # a block index; negative counts from the end
            set_field(self, "layer", check_int("layer", self.layer, -(2**31)))

    def scores(self) -> dict[str, Score]:
        return {"received": Score("received", self.layer)}

    def counts(self, layout: Layout, scores=None) -> list[int]:
        # 2. the budget split by each partition's valid tokens
        return uniform_counts(self.budget, layout)

    def select(self, layout: Layout, scores: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # 3. every partition's top tokens by received attention, in raster order
        received = scores["received"]  # (P, N)
        valid = layout.valid().to(received.device)
        return [top_k_sorted(received[p], count, valid[p]) for p, count in enumerate(self.counts(layout))]
