"""HiPrune: anchors from a middle vision layer, their neighbours, and registers from the feature layer.

Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
Vision-Language Models", arXiv 2508.00553. Official code: github.com/Danielement321/HiPrune, commit
6e83a12 read (`LLaVA/llava/model/llava_arch.py` `encode_images` for LLaVA-1.5 and LLaVA-NeXT,
`LLaVA/llava/model/multimodal_encoder/clip_encoder.py`, `Qwen2_5_VL/qwen2_5_vl_HiPrune.py`).

  1. score every token by the attention it receives, averaged over heads and over all queries of its
     partition ([CLS] query included on CLIP), in two vision blocks: the object layer (`object_layer`,
     1-based and absolute as in the official code: block object_layer - 1) and the feature block (the
     block whose output is `vision_feature_layer`, the official "layer -2"; Qwen-VL: the last block);
  2. B = floor(budget * P * N) tokens per image, split evenly over the P partitions (the official
     LLaVA-NeXT code gives every encoded partition the same count T);
  3. anchors: a partition keeping T tokens takes its top round(T * alpha / 5) tokens by the object
     layer's score (Python's round, half to even, as the official; at alpha = 0.1 a partition keeping
     fewer than 25 tokens gets none);
  4. buffers: each anchor's flat neighbours i - 1, i + 1, i - W, i + W on its partition's grid of row
     width W, clamped into [0, N - 1] and de-duplicated, as the official computes them (so i +- 1 runs
     over a row's end, and a first-row anchor's i - W is token 0);
  5. registers: the remaining T - |anchors and buffers| tokens by the feature block's score, among the
     tokens not chosen yet; everything is kept in raster order.

Grids: W is the tower's patch grid (LLaVA: image_size // patch_size per tile; the official hard-codes
24). Qwen-VL has one partition of rows x cols merged tokens, each the sum of its 2x2 patch group's
scores, W = cols (non-square as the image); OneVision's SigLIP tiles (no [CLS]) are G x G.

Deviations from the official code:
  - The budget does not depend on the batch: B per image (the official divides its token count by
    the number of partitions encoded together, so an image's count changes with its batch); on
    Qwen-VL B = floor(budget * N) (the official rounds) and each image is its own grid (the official
    treats the batch's images as one sequence with the first image's width).
  - Exact counts, candidates among the tokens that survive unpadding only: an anchor is a valid token,
    a buffer on padding is not kept and registers fill its place (the official picks padding tokens
    that unpadding then drops). Partition shares as FasterVLM: B // P, the first B % P one more, a
    tile with fewer valid tokens keeps them all and the others take the rest.
  - Anchors are capped at T // 5, so anchors and buffers never exceed T (the official fails there).
  - Registers exclude the chosen tokens (the official subtracts 1 from their scores, which are in
    (0, 1): the same tokens). Scores in fp32; ties to the lower index (the official: fp16 `topk`).
  - The per-token scores differ from the official by constant factors only (mean over queries where
    Qwen's official sums them; sum over a 2x2 group where it averages): the same ranking.
  - An `object_layer` past the tower's last block reads the last block (the official indexes past the
    end). On Qwen2.5-VL the object layer must be a full-attention block: the official Qwen setting
    is object_layer=16 (block 15); the default 9 lands on a window block and is refused.
  - Row newlines dropped by default (`keep_newlines=True`: the official's LLaVA-NeXT packing).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod, Score, check_int, check_number, set_field
from tokendrop.methods.fastervlm import even_counts
from tokendrop.methods.layout import Layout, top_k_sorted

#: an anchor and its four buffers (i - 1, i + 1, i - W, i + W): the official anchor count is round(T * alpha / 5)
GROUP = 5


@dataclass(frozen=True)
class HiPrune(PreLLMMethod):
    """Keep anchor, buffer and register tokens chosen by the vision tower's attention (HiPrune).

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to keep.
        alpha: share in [0, 1] of a partition's tokens given to anchors and their buffers (anchors:
            round(T * alpha / 5)); the official default 0.1.
        object_layer: 1-based vision layer whose attention picks the anchors (9: the official LLaVA
            setting; 16 for Qwen2.5-VL).
        keep_newlines: pack one newline token per unpadded canvas row (LLaVA-NeXT), as the official does.
    """

    alpha: float = 0.1
    object_layer: int = 9

    name = "hiprune"

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "alpha", check_number("alpha", self.alpha, 0.0, 1.0))
        set_field(self, "object_layer", check_int("object_layer", self.object_layer, 1,
                                                  allowed="a 1-based vision layer, an int >= 1"))

    def scores(self) -> dict[str, Score]:
        # 1. received attention at the object layer and at the feature block
        return {"object": Score("received", self.object_layer - 1, clamp=True), "register": Score("received")}

    def counts(self, layout: Layout, scores=None) -> list[int]:
        # 2. B split evenly over the partitions
        return even_counts(self.budget, layout)

    def select(self, layout: Layout, scores: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        found, registers = scores["object"], scores["register"]  # (P, N) each
        valid = layout.valid().to(registers.device)
        return [keep_partition(found[p], registers[p], count, valid[p], layout.cols, self.alpha)
                for p, count in enumerate(self.counts(layout))]


def anchor_count(count: int, alpha: float) -> int:
    """Step 3's anchor count for a partition keeping `count` tokens: the official round(T * alpha / 5),
    at most count // 5 (each anchor brings up to four buffers).

    >>> anchor_count(192, 0.1), anchor_count(128, 0.1), anchor_count(64, 0.1), anchor_count(24, 0.1)
    (4, 3, 1, 0)
    """
    return min(round(count * alpha / GROUP), count // GROUP)


def keep_partition(found: torch.Tensor, registers: torch.Tensor, count: int, valid: torch.Tensor, width: int,
                   alpha: float) -> torch.Tensor:
    """Steps 3-5 on one partition: (count,) sorted kept indices.

    Args:
        found, registers: (N,) the object layer's and the feature block's scores.
        valid: (N,) bool, tokens that survive unpadding (at least `count`).
        width: W, tokens per row of the partition's grid.
    """
    n = found.numel()
    # 3. anchors: the object layer's top tokens
    anchors = top_k_sorted(found, anchor_count(count, alpha), valid)
    # 4. buffers: flat neighbours +-1 and +-W, clamped into the partition
    near = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1)
    chosen = torch.zeros(n, dtype=torch.bool, device=valid.device)
    chosen[near] = True
    chosen &= valid
    # 5. registers: the feature block's top tokens among the rest
    rest = count - int(chosen.sum())
    chosen[top_k_sorted(registers, rest, valid & ~chosen)] = True
    return chosen.nonzero().flatten()
