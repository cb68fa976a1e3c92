"""FasterVLM: keep the patches the [CLS] token attends to most, before the LLM.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", arXiv 2412.01818. Official code: github.com/Theia-4869/FasterVLM, commit f5d5f12
read (`llava/model/multimodal_encoder/clip_encoder.py` `feature_select`, `llava/model/llava_arch.py`
`encode_images` and the LLaVA-NeXT branch of `prepare_inputs_labels_for_multimodal`).

  1. score every patch of every partition (LLaVA-1.5: the image; LLaVA-NeXT: the base image and each
     tile) by the [CLS] query's attention over it in the feature block (the block whose output is
     `vision_feature_layer`: the official "layer -2"), averaged over heads;
  2. B = floor(budget * P * N) tokens per image, split evenly over the P partitions, as the official
     LLaVA-NeXT code keeps the same count in the base image and in every tile (P * T tokens);
  3. every partition keeps its top tokens by that score, in raster order; the [CLS] token is not fed.

Scores arrive as `scores["cls"]`: (P, N), the [CLS] row summed over heads (`tokendrop.scoring`). The
official ranks the mean over heads, i.e. that sum divided by the head count H: the ranking is the
same, since dividing by a positive constant preserves order; in floating point the quotient is
exact when H is a power of two (CLIP-L's 16 heads), and otherwise rounding is monotone, so it can at
most turn two values one rounding step apart into a tie. No separate "mean" score is needed.

Deviations from the official code:
  - Exact counts known before encoding: B = floor(budget * P * N) per image (the official takes a
    token count T per partition). Partition shares are B // P, the first B % P partitions (base
    first) one more; a tile with fewer tokens left after unpadding than its share keeps all of them
    and hands the rest to the others (`allocate`).
  - Candidates are the tokens that survive unpadding only (the official picks among all of a tile's
    tokens and unpadding then silently drops the padding ones, so it feeds fewer than P * T).
  - Scores in fp32 and ties broken by the lower index (the official ranks fp16 maps with `topk`).
  - Row newlines are dropped by default (the official keeps every row's newline on LLaVA-NeXT:
    `keep_newlines=True` reproduces that; the budget never counts them).
  - Batches of any size with padding; every image is selected on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod, Score
from tokendrop.methods.layout import Layout, allocate, budget_tokens, top_k_sorted


@dataclass(frozen=True)
class FasterVLM(PreLLMMethod):
    """Keep each partition's top patches by the feature block's [CLS] attention (FasterVLM).

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to keep (the official scripts' T tokens
            per partition of N patches: budget = T / N, e.g. 144 / 576 = 0.25).
        keep_newlines: pack one newline token per unpadded canvas row (LLaVA-NeXT), as the official does.
    """

    name = "fastervlm"

    def scores(self) -> dict[str, Score]:
        return {"cls": Score("cls")}  # the feature block's [CLS] row

    def counts(self, layout: Layout, scores=None) -> list[int]:
        return even_counts(self.budget, layout)

    def select(self, layout: Layout, scores: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # 3. every partition's top tokens by [CLS] attention, in raster order
        cls = scores["cls"]  # (P, N)
        valid = layout.valid().to(cls.device)
        return [top_k_sorted(cls[p], count, valid[p]) for p, count in enumerate(self.counts(layout))]


def even_counts(budget: float, layout: Layout) -> list[int]:
    """Step 2: B = floor(budget * P * N) split evenly over the partitions (the official LLaVA-NeXT code
    keeps the same count in each), the remainder to the first partitions, each share capped at the
    partition's tokens that survive unpadding (the excess goes to the others).

    >>> even_counts(0.25, Layout(grid=4, tiles=(1, 2), crop=(0, 4, 0, 8)))  # B = floor(0.25 * 3 * 16) = 12
    [4, 4, 4]
    """
    valid = layout.valid_counts()
    return allocate(budget_tokens(budget, layout), [1.0] * len(valid), valid)
