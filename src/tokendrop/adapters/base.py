"""What every adapter knows of its model: the wrapper, the inner model, its config and vision tower."""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.methods.base import BudgetMethod


@dataclass(frozen=True)
class TokenCount:
    """Visual tokens a pre-LLM method gives one image: known from the image size before encoding.

    Holds only the family's geometry (config values) and the method, so the processor patch that
    uses it can be pickled (spawned DataLoader workers) and never keeps the model alive.
    """

    geometry: object  # the family's geometry: .layout(image_size) -> Layout
    method: BudgetMethod

    def __call__(self, image_size=None) -> int:
        layout = self.geometry.layout(image_size)
        count = self.method.num_tokens(layout)
        if count == 0:
            tokens = layout.num_partitions * layout.patches
            what = "every image" if image_size is None else f"an image of {image_size[0]}x{image_size[1]} pixels"
            raise ValueError(f"{self.method!r} keeps no visual token of {what} ({layout.num_partitions} partition(s) "
                             f"of {layout.patches} patches): the image would be invisible to the model. "
                             f"The smallest budget that keeps one token is {1 / tokens:.4g}")
        return count


class Adapter:
    """Base of the per-family adapters; `model_classes` names the classes an adapter accepts."""

    model_classes: tuple[str, ...] = ()
    geometry = None  # image size -> Layout (config values only); set by families with pre-LLM methods

    def __init__(self, model):
        self.model = model  # the *ForConditionalGeneration wrapper
        self.base = model.model  # the inner model: vision_tower, projector, language_model
        self.config = model.config
        self.tower = self.base.vision_tower

    def num_tokens(self, method: BudgetMethod, image_size=None) -> int:
        """Visual tokens `method` gives an image of (height, width) pixels; ValueError if none."""
        return TokenCount(self.geometry, method)(image_size)
