"""What every adapter knows of its model: the wrapper, the inner model, its config and vision tower."""

from __future__ import annotations


class Adapter:
    """Base of the per-family adapters; `model_classes` names the classes an adapter accepts."""

    model_classes: tuple[str, ...] = ()

    def __init__(self, model):
        self.model = model  # the *ForConditionalGeneration wrapper
        self.base = model.model  # the inner model: vision_tower, projector, language_model
        self.config = model.config
        self.tower = self.base.vision_tower
