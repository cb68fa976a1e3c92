"""What the plugin reads from a model's HF config, checked when vLLM loads it (before any engine starts).

No vLLM import here: `tokendrop serve` runs these checks before it starts the server.
"""

from __future__ import annotations

from tokendrop.families.base import CAPABILITIES, TokenCount
from tokendrop.families.qwen_vl.common import QwenGeometry
from tokendrop.methods.base import PreLLMMethod
from tokendrop.methods.layout import Layout


def check_config(config, method: PreLLMMethod) -> str:
    """The tokendrop architecture that serves `config` with `method`; ValueError naming what does not fit.

    Checks the family (one the plugin serves: `served_families`, from the family table), the
    capabilities the method needs, and the vision blocks it scores (the family's own rule:
    `config_score_blocks`) against the blocks vLLM builds (`built_blocks`).
    """
    from tokendrop.vllm import architectures, served_families

    served = served_families()
    stock = stock_architecture(config)
    if stock not in served:
        raise ValueError(f"tokendrop.vllm serves {', '.join(served)}; the model is {(stock or config.model_type)!r}. "
                         "Other families run with transformers (tokendrop.apply)")
    family = served[stock]
    missing = sorted(method.requires() - capabilities(config, family))
    if missing:
        need = "; ".join(f"{CAPABILITIES[c]} (capability {c!r})" for c in missing)
        raise ValueError(f"{type(method).__name__} needs {need}, which {stock} with this config does not have")
    score_blocks(config, method, family)
    return architectures()[stock]


def stock_architecture(config) -> str | None:
    """The stock architecture a config names (a config already served by tokendrop names its own; a
    config without `architectures` is read by its model_type, as vLLM does)."""
    from tokendrop.vllm import architectures, served_families

    name = (getattr(config, "architectures", None) or [None])[0]
    if not name:
        by_type = {family.model_type: stock for stock, family in served_families().items()}
        name = by_type.get(getattr(config, "model_type", None))
    served = {ours: stock for stock, ours in architectures().items()}
    return served.get(name, name)


def family_of_config(config):
    """The family adapter class of a config vLLM loads."""
    from tokendrop.vllm import served_families

    return served_families()[stock_architecture(config)]


def capabilities(config, family) -> set[str]:
    """The family's capabilities for this config, less in_llm (vLLM's paged KV cache: every layer one length)."""
    return family.config_capabilities(config) - {"in_llm"}


def score_blocks(config, method: PreLLMMethod, family=None) -> dict:
    """The family's scored blocks (`config_score_blocks`), each within the blocks vLLM builds."""
    family = family or family_of_config(config)
    blocks = family.config_score_blocks(config, method)
    built = built_blocks(config)
    for name, (_, block) in blocks.items():
        if built is not None and block >= built:
            raise ValueError(f"{type(method).__name__} scores vision block {block} ({name}), but vLLM builds the "
                             f"tower only up to vision_feature_layer={config.vision_feature_layer} (blocks 0..{built - 1})")
    return blocks


def built_blocks(config) -> int | None:
    """How many vision blocks vLLM builds: its LLaVA models stop at the feature layer; None: all of them."""
    feature_layer = getattr(config, "vision_feature_layer", None)
    if not isinstance(feature_layer, int):
        return None
    return feature_layer % (config.vision_config.num_hidden_layers + 1)


def token_count(config, method: PreLLMMethod) -> TokenCount:
    """The method's placeholder count per image size, from the same geometry as the transformers path."""
    return TokenCount(family_of_config(config).config_geometry(config), method)


class QwenCount:
    """The method's placeholder count for an image's (t, h, w) patch grid (`image_grid_thw`): the count
    the transformers path's processor writes for the same grid."""

    def __init__(self, config, method: PreLLMMethod):
        vision = config.vision_config
        self.patch = vision.patch_size
        self.geometry = QwenGeometry(vision.patch_size, vision.spatial_merge_size, 0, 0)  # pixels: the processor's
        self.token_count = TokenCount(self.geometry, method)

    def layout(self, t: int, h: int, w: int) -> Layout:
        return self.geometry.grid_layout(t, h, w)

    def __call__(self, t: int, h: int, w: int) -> int:
        return self.token_count.count(self.layout(t, h, w), (h * self.patch, w * self.patch))
