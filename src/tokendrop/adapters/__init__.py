"""One adapter per model family: where the features come from, how tokens are packed, how the
processor counts placeholders, and (for in-LLM methods) how the language model's layers are reached.

Adapters import transformers; `tokendrop.methods` never does.
"""

from __future__ import annotations

from tokendrop.adapters.llava import LlavaAdapter
from tokendrop.adapters.llava_next import LlavaNextAdapter
from tokendrop.adapters.llava_onevision import LlavaOnevisionAdapter
from tokendrop.adapters.vision import score_blocks

ADAPTERS = (LlavaNextAdapter, LlavaAdapter, LlavaOnevisionAdapter)
SUPPORTED_MODELS = tuple(name for adapter in ADAPTERS for name in adapter.model_classes)


def adapter_for(model):
    """The adapter of `model`'s family; TypeError naming the supported classes otherwise."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    raise TypeError(f"model must be one of {', '.join(SUPPORTED_MODELS)}; got {name}")


def check_pre_llm(adapter, processor, method) -> None:
    """Raise ValueError unless the model's vision path, the processor and the method's layers fit."""
    config = adapter.config
    if isinstance(adapter, LlavaOnevisionAdapter) or config.vision_feature_select_strategy != "default":
        raise ValueError(
            "pre-LLM methods need a vision tower with a [CLS] token (vision_feature_select_strategy='default'), "
            f"got {config.vision_feature_select_strategy!r}"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer must be a single int, got {config.vision_feature_layer!r}")
    layers = getattr(getattr(adapter.tower, "encoder", None), "layers", None)
    if layers is None or not hasattr(layers[0], "layer_norm1"):
        raise TypeError(f"vision tower must be a CLIP-style encoder, got {type(adapter.tower).__name__}")
    score_blocks(method, adapter.tower, config.vision_feature_layer)
    if processor is not None:
        check_processor(adapter, processor)


def check_processor(adapter, processor) -> None:
    """Raise ValueError if `processor` was not built for `adapter.model` (tokens would not line up)."""
    config = adapter.config
    expected = {
        "image_token_id": config.image_token_id,
        "patch_size": config.vision_config.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }
    if isinstance(adapter, LlavaOnevisionAdapter):
        return  # in-LLM methods only: the processor's counts are the stock ones
    if isinstance(adapter, LlavaNextAdapter):
        pinpoints = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
        got_pinpoints = [list(p) for p in pinpoints] if pinpoints is not None else None
        if got_pinpoints != [list(p) for p in config.image_grid_pinpoints]:
            raise ValueError(
                f"processor does not belong to the model: image_grid_pinpoints {got_pinpoints} != "
                f"model's {config.image_grid_pinpoints}"
            )
    for name, want in expected.items():
        got = getattr(processor, name, None)
        if got != want:
            raise ValueError(f"processor does not belong to the model: {name} is {got!r}, the model expects {want!r}")
    if "replace_image_token" in vars(processor):
        raise ValueError("processor is already patched (replace_image_token is overridden); call handle.remove() first")
