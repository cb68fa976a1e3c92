"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, Qwen2 LM): in-LLM methods.

Its SigLIP tower has no [CLS] token (vision_feature_select_strategy "full"), so HiRED has nothing
to rank by; `apply()` refuses it naming the missing capability. The in-LLM methods need only the
language model and the image token id.
"""

from __future__ import annotations

import math

from tokendrop.adapters.llava_common import LlavaStyle
from tokendrop.adapters.llava_next import NextGeometry


class LlavaOnevisionAdapter(LlavaStyle):
    name = "llava-onevision"
    model_type = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    config_class = "LlavaOnevisionConfig"
    processor_class = "LlavaOnevisionProcessor"
    image_processor_class = (
        "transformers.models.llava_onevision.image_processing_pil_llava_onevision:LlavaOnevisionImageProcessorPil")
    tiny = "tokendrop.tiny:tiny_llava_onevision"

    def __init__(self, model):
        super().__init__(model)
        vision = self.config.vision_config
        self.grid = vision.image_size // vision.patch_size
        self.tiles = NextGeometry(vision.image_size, self.grid, tuple(tuple(p) for p in self.config.image_grid_pinpoints))

    def stock_tokens(self, image_size=None, processor=None) -> int:
        """Base + unpadded canvas (pooled down to `anyres_max_N` tiles' worth) + one newline per row."""
        top, bottom, left, right = self.tiles.layout(image_size).crop
        height, width = bottom - top, right - left
        max_tiles = int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(height * width / (max_tiles * self.grid**2))
        if ratio > 1.1:  # the stock model interpolates large canvases down
            height, width = int(height // ratio), int(width // ratio)
        return self.grid * self.grid + height * width + height

    def check_processor(self, processor) -> None:
        pass  # in-LLM methods only: the processor's counts stay the stock ones
