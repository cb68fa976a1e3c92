"""BaseOnly: only the downscaled whole image (partition 0), every tile dropped: the low-resolution control.

It answers "what does the high-resolution canvas add?": the LLM sees the N tokens of the base
image, as a model without anyres tiling would.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod
from tokendrop.methods.layout import Layout


@dataclass(frozen=True)
class BaseOnly(PreLLMMethod):
    """Keep the base image's tokens and drop every tile.

    Attributes:
        budget: ignored for selection (fixed at 1.0); the count is N per image.
    """

    budget: float = 1.0

    name = "base-only"

    def requires(self) -> set[str]:
        return super().requires() | {"base_image"}

    def counts(self, layout: Layout, scores=None) -> list[int]:
        return [layout.patches] + [0] * layout.num_tiles

    def select(self, layout: Layout, scores=None) -> list[torch.Tensor]:
        return [torch.arange(layout.patches)] + [torch.empty(0, dtype=torch.long)] * layout.num_tiles

    def num_tokens(self, layout: Layout) -> int:
        return layout.patches
