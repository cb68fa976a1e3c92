"""The InternVL processor seams under a pre-LLM method (picklable, model-free: DataLoader workers carry them).

  * `WrappedPlaceholders`: the method's count of image tokens between `<img>` and `</img>`, as the
    stock `replace_image_token` writes the stock count.
  * `ImageSizes`: the image processor also returns each image's (height, width), from which the model
    side lays out the tiles (the stock processor returns only the tile count, and the model nothing).
"""

from __future__ import annotations

import numpy as np

from tokendrop.api import Placeholders


class WrappedPlaceholders(Placeholders):
    def __call__(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if not self.live.active:
            return type(self.processor).replace_image_token(self.processor, image_inputs, image_idx, **kwargs)
        tokens = self.processor.image_token * self.count.of_inputs(image_inputs, image_idx)
        return f"{self.processor.start_image_token}{tokens}{self.processor.end_image_token}"


class ImageSizes:
    """The image processor's `_preprocess`, returning `image_sizes` (M, 2) besides the stock outputs."""

    def __init__(self, image_processor, live):
        self.image_processor, self.live = image_processor, live

    def __call__(self, images, *args, **kwargs):
        from transformers.image_utils import get_image_size

        out = type(self.image_processor)._preprocess(self.image_processor, images, *args, **kwargs)
        if self.live.active:
            # (M, 2) int64; the processor's BatchFeature turns it into its tensor type with the rest
            out["image_sizes"] = np.array([get_image_size(image) for image in images], dtype=np.int64).reshape(-1, 2)
        return out
