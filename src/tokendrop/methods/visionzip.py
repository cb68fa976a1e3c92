"""VisionZip: a few dominant tokens plus a few contextual tokens merged from the rest, before the LLM.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", arXiv
2412.04467. Official code: github.com/dvlab-research/VisionZip, commit 3151f6d read
(`visionzip/clip_encoder.py` `forward`, `visionzip/utils.py` `CLIPAttention_forward` (the key
metric), `visionzip/llava_arch.py` (the LLaVA-NeXT packing), `visionzip/main.py`).

Per partition, with T tokens to feed (B = floor(budget * P * N) per image, split over partitions):
  1. C = floor(T * contextual) contextual tokens, T - C dominant tokens; on a tower with [CLS] the
     dominant tokens are the [CLS] token itself plus T - C - 1 patches (the official feeds [CLS]);
  2. dominant patches: the top ones by the feature block's [CLS] attention row summed over heads
     (towers without [CLS]: the attention each token receives, mean over heads and queries);
  3. the remaining patches, in raster order (R of them), are compared by the feature block's keys
     averaged over heads, L2-normalised; the targets are every step-th of them, step = max(1, R // C),
     the first C;
  4. every other remaining patch joins its most cosine-similar target (the first on ties);
  5. a contextual token is its target's feature-block state plus the mean state of its members (the
     target alone when none joined); the [CLS] state, the dominant patches and the contextual tokens
     all go through the stock projector, in that order.

LLaVA-NeXT: the official runs steps 1-5 on every partition with the same counts and packs the base
image's tokens, the tiles' dominant patches on the canvas, the tiles' [CLS] tokens, then their
contextual tokens. Here B is split evenly over the partitions (`even_counts`, as FasterVLM), each
partition runs steps 1-5 on its own share and feeds its own [CLS]; the family packs [CLS] + dominant
+ contextual per partition in the official order (see the family's `pack_merged`).

Deviations from the official code:
  - Exact counts known before encoding: T per partition from B = floor(budget * P * N) (the official
    takes a dominant and a contextual count); [CLS] counts as one of the dominant tokens.
  - budget = 1.0 is the stock model: every patch, no [CLS], no merging.
  - LLaVA-NeXT: only the tokens that survive unpadding are candidates (dominant or merged); the
    official picks among the whole padded canvas and never unpads; row newlines only with
    `keep_newlines` (after the canvas rows' dominant patches).
  - Scores, keys and merging in fp32; dominant ties to the lower index (the official `topk` on fp16
    has no defined tie order).
  - Towers without [CLS] (Qwen-VL): dominant by received attention, no [CLS] token (the official has
    CLIP code only); keys of a 2x2 merge group are its four patches' keys concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import Merged, PreLLMMethod, Score, check_number, set_field
from tokendrop.methods.fastervlm import even_counts
from tokendrop.methods.layout import Layout, floor_mul, top_k_sorted

#: the official default: 10 contextual tokens of 64 (54 dominant + 10)
CONTEXTUAL = 10 / 64


@dataclass(frozen=True)
class VisionZip(PreLLMMethod):
    """Keep dominant tokens ([CLS] attention) and merge the rest into contextual tokens (VisionZip).

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to feed (dominant, [CLS] and contextual).
        contextual: share in [0, 1) of each partition's tokens that are contextual (merged).
        keep_newlines: pack one newline token per unpadded canvas row (LLaVA-NeXT).
    """

    contextual: float = CONTEXTUAL

    name = "visionzip"
    merges = True

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "contextual", check_number("contextual", self.contextual, 0.0, 1.0, high_open=True))

    def scores(self) -> dict[str, Score]:
        return {"dominant": Score("cls", fallback="received"), "keys": Score("keys"), "features": Score("features")}

    def counts(self, layout: Layout, scores=None) -> list[int]:
        return even_counts(self.budget, layout)

    def select(self, layout: Layout, scores: dict) -> list[torch.Tensor]:
        """The patches the tokens stand for on a tower without [CLS] (dominant and target patches)."""
        return [torch.cat([m.keep, m.anchors]).sort().values for m in self.merge(layout, scores, cls=False)]

    def merge(self, layout: Layout, scores: dict, cls: bool) -> list[Merged]:
        valid = layout.valid().to(scores["dominant"].device)
        return [self.merge_partition(scores["dominant"][p], scores["keys"][p], scores["features"][p], valid[p], count, cls)
                for p, count in enumerate(self.counts(layout))]

    def merge_partition(self, dominant: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, valid: torch.Tensor,
                        count: int, cls: bool) -> Merged:
        """One partition: `count` tokens (Args: dominant (N,), keys (N, hd), features (N, Dv), valid (N,) bool)."""
        empty = torch.zeros(0, dtype=torch.long, device=valid.device)
        if self.budget == 1.0:  # the stock model: every valid patch, no [CLS], no merging
            return Merged(False, valid.nonzero().squeeze(1), features[:0].float(), empty)
        # 1. contextual and dominant counts; [CLS] is one of the dominant tokens
        contextual = floor_mul(self.contextual, count)
        feed_cls = cls and count > contextual
        # 2. dominant patches by score
        keep = top_k_sorted(dominant.float(), count - contextual - int(feed_cls), valid)
        rest = valid.clone()
        rest[keep] = False
        remaining = rest.nonzero().squeeze(1)  # (R,) raster order
        rows, anchors = merge_contextual(keys[remaining].float(), features[remaining].float(), contextual)
        return Merged(feed_cls, keep, rows, remaining[anchors] if anchors.numel() else empty)


def merge_contextual(keys: torch.Tensor, features: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-5 on the R remaining tokens: (count, Dv) contextual rows and (count,) their targets' indices into R.

    Args:
        keys: (R, hd) metric; features: (R, Dv) states to merge.
    """
    R = keys.shape[0]
    if count == 0:
        return features[:0], torch.zeros(0, dtype=torch.long, device=keys.device)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    # 3. targets: every step-th remaining token, the first `count`
    targets = torch.arange(0, R, max(1, R // count), device=keys.device)[:count]
    others = torch.ones(R, dtype=torch.bool, device=keys.device)
    others[targets] = False
    # 4. every other token joins its most similar target (argmax: the first on ties)
    join = (unit[others] @ unit[targets].T).argmax(dim=1)  # (R - count,)
    # 5. target + mean of its members
    sums = torch.zeros(count, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, join, features[others])
    members = torch.bincount(join, minlength=count).clamp(min=1).to(features.dtype)[:, None]
    return features[targets] + sums / members, targets
