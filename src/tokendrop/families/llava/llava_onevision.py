"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower (no [CLS]), Qwen2 LM.

Tiles, unpadding and packing are LLaVA-NeXT's (base tokens, then the unpadded canvas row by row,
a newline after every row), so pre-LLM methods reuse `LlavaNextAdapter`'s encoder patch. Two
stock behaviours have no exact token layout to drop from, and are refused with a clear error
instead: a canvas larger than `anyres_max_N` tiles, which the model pools (bilinear) to fewer
tokens, and samples of several images, which the model encodes base-only. HiRED needs a [CLS]
token and is refused (DominantDrop is the [CLS]-free attention method); the in-LLM methods need
only the language model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokendrop.families.llava.llava_next import LlavaNextAdapter, NextGeometry
from tokendrop.methods.layout import Layout


@dataclass(frozen=True)
class OnevisionGeometry(NextGeometry):
    """LLaVA-NeXT's tiles and unpadding, for the images whose canvas the model does not pool."""

    max_tiles: int = 9  # `anyres_max_N`

    def pooled_canvas(self, image_size) -> tuple[int, int] | None:
        """(rows, cols) the stock model pools the unpadded canvas to, or None if it keeps it."""
        layout = NextGeometry.layout(self, image_size)
        top, bottom, left, right = layout.crop
        height, width = bottom - top, right - left
        ratio = math.sqrt(height * width / (self.max_tiles * self.grid**2))
        return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else None

    def layout(self, image_size) -> Layout:
        if self.pooled_canvas(image_size) is not None:
            raise ValueError(f"an image of {image_size[0]}x{image_size[1]} pixels fills more than {self.max_tiles} "
                             "tiles, and LLaVA-OneVision pools its canvas (anyres_max) into tokens that are not patch "
                             "tokens; pre-LLM methods drop from unpooled canvases only: use a smaller image, or an "
                             "in-LLM method")
        return NextGeometry.layout(self, image_size)

    def input_layout(self, image_inputs: dict, image_idx: int):
        if any(int(n) > 1 for n in image_inputs.get("batch_num_images", [])):
            raise ValueError("pre-LLM methods on LLaVA-OneVision take one image per sample (the model encodes the "
                             "images of a multi-image sample base-only)")
        return super().input_layout(image_inputs, image_idx)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    name = "llava-onevision"
    model_type = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    config_class = "LlavaOnevisionConfig"
    processor_class = "LlavaOnevisionProcessor"
    image_processor_class = (
        "transformers.models.llava_onevision.image_processing_pil_llava_onevision:LlavaOnevisionImageProcessorPil")
    tiny = "tokendrop.families.llava.tiny:tiny_llava_onevision"
    vllm = "tokendrop.families.llava.vllm:TokendropLlavaOnevisionForConditionalGeneration"
    cls_token = False
    instruction = False  # SigLIP: no CLIP head applies to its features

    @classmethod
    def config_geometry(cls, config) -> OnevisionGeometry:
        next_geometry = LlavaNextAdapter.config_geometry(config)
        max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        return OnevisionGeometry(next_geometry.tile, next_geometry.grid, next_geometry.pinpoints, max_tiles)

    def stock_tokens(self, image_size=None, processor=None) -> int:
        """Base + unpadded canvas (pooled down to `anyres_max_N` tiles' worth) + one newline per row."""
        pooled = self.geometry.pooled_canvas(image_size)
        if pooled is None:
            return super().stock_tokens(image_size)
        return self.grid * self.grid + pooled[0] * pooled[1] + pooled[0]

    def hint(self, missing: list[str]) -> str:
        return ": SigLIP has no [CLS]; DominantDrop ranks by the attention each token receives" if "cls_token" in missing else ""

    def processor_expects(self) -> dict:
        return {}  # its processor counts by num_image_tokens, not patch_size (the pinpoints are checked)
