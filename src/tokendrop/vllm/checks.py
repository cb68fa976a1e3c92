"""What the plugin reads from a model's HF config, checked when vLLM loads it (before any engine starts).

No vLLM import here: `tokendrop serve` runs these checks before it starts the server.
"""

from __future__ import annotations

from tokendrop.adapters.base import CAPABILITIES, TokenCount
from tokendrop.adapters.llava import LlavaAdapter, SingleGeometry
from tokendrop.adapters.llava_next import LlavaNextAdapter, NextGeometry
from tokendrop.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from tokendrop.adapters.qwen_common import QwenGeometry
from tokendrop.methods.base import PreLLMMethod
from tokendrop.methods.layout import Layout

#: stock architecture -> the library's family adapter (its capabilities and geometry)
FAMILIES = {"LlavaNextForConditionalGeneration": LlavaNextAdapter, "LlavaForConditionalGeneration": LlavaAdapter,
            "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLAdapter}
QWEN = "Qwen2_5_VLForConditionalGeneration"


def check_config(config, method: PreLLMMethod) -> str:
    """The tokendrop architecture that serves `config` with `method`; ValueError naming what does not fit.

    Checks the family (LLaVA-NeXT, LLaVA-1.5, Qwen2.5-VL), the capabilities the method needs, and the
    vision layers it scores against the layers vLLM builds (only up to `vision_feature_layer`);
    on Qwen2.5-VL, the scored block must use full attention (`qwen_score_blocks`).
    """
    from tokendrop.vllm import ARCHITECTURES

    stock = stock_architecture(config)
    if stock not in FAMILIES:
        raise ValueError(f"tokendrop.vllm serves {', '.join(FAMILIES)}; the model is {(stock or config.model_type)!r}. "
                         "Other families run with transformers (tokendrop.apply)")
    family = FAMILIES[stock]
    missing = sorted(method.requires() - capabilities(config, family))
    if missing:
        need = "; ".join(f"{CAPABILITIES[c]} (capability {c!r})" for c in missing)
        raise ValueError(f"{type(method).__name__} needs {need}, which {stock} with this config does not have")
    if stock == QWEN:
        qwen_score_blocks(config, method)
    else:
        score_blocks(config, method)
    return ARCHITECTURES[stock]


def stock_architecture(config) -> str | None:
    """The stock architecture a config names (a config already served by tokendrop names its own; a
    config without `architectures` is read by its model_type, as vLLM does)."""
    from tokendrop.vllm import ARCHITECTURES

    name = (getattr(config, "architectures", None) or [None])[0]
    if not name:
        by_type = {family.model_type: stock for stock, family in FAMILIES.items()}
        name = by_type.get(getattr(config, "model_type", None))
    served = {ours: stock for stock, ours in ARCHITECTURES.items()}
    return served.get(name, name)


def capabilities(config, family) -> set[str]:
    caps = family.family_capabilities() - {"in_llm"}
    if family is Qwen2_5_VLAdapter:
        return caps
    vision = config.vision_config
    if config.vision_feature_select_strategy != "default" or vision.model_type != "clip_vision_model":
        caps.discard("cls_token")  # no [CLS] in front of the patches
    return caps


def score_blocks(config, method: PreLLMMethod) -> dict[str, tuple[str, int]]:
    """(kind, 0-based encoder block) of every score `method` reads, as `tokendrop.adapters.vision.score_blocks`
    validates them, and within the blocks vLLM builds."""
    from tokendrop.adapters.vision import score_blocks as library_blocks

    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(f"vision_feature_layer must be a single int, got {feature_layer!r}")
    depth = config.vision_config.num_hidden_layers
    blocks = library_blocks(method, _TowerDepth(depth), feature_layer)
    built = feature_layer % (depth + 1)  # vLLM builds the tower up to the feature layer only
    for name, (_, block) in blocks.items():
        if block >= built:
            raise ValueError(f"{type(method).__name__} scores vision block {block} ({name}), but vLLM builds the "
                             f"tower only up to vision_feature_layer={feature_layer} (blocks 0..{built - 1})")
    return blocks


class _TowerDepth:
    """The one thing `score_blocks` reads of a tower: how many encoder layers it has."""

    def __init__(self, depth: int):
        self.encoder = type("Encoder", (), {"layers": range(depth)})()


def token_count(config, method: PreLLMMethod) -> TokenCount:
    """The method's placeholder count per image size, from the same geometry as the transformers path."""
    vision = config.vision_config
    grid = vision.image_size // vision.patch_size
    if stock_architecture(config) == "LlavaNextForConditionalGeneration":
        pinpoints = tuple(tuple(p) for p in config.image_grid_pinpoints)
        return TokenCount(NextGeometry(vision.image_size, grid, pinpoints), method)
    return TokenCount(SingleGeometry(grid), method)


def qwen_score_blocks(config, method: PreLLMMethod) -> dict[str, int]:
    """Qwen2.5-VL: the vision block (0-based) of every score `method` reads, as the transformers path
    (`Qwen2_5_VLAdapter.score_block`) chooses and validates it: a full-attention block (window blocks
    normalise attention per window); None: the last one."""
    vision = config.vision_config
    depth, full = vision.depth, sorted(vision.fullatt_block_indexes)
    blocks = {}
    for name, score in method.scores().items():
        if score.kind != "received":
            raise ValueError(f"{type(method).__name__} reads a {score.kind!r} score; Qwen2.5-VL's tower has no [CLS] "
                             "token and gives 'received' attention scores only")
        layer = full[-1] if score.layer is None else score.layer
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [{-depth}, {depth}) for a {depth}-block vision tower, got {layer}")
        if layer % depth not in full:
            raise ValueError(f"layer {score.layer} of Qwen2.5-VL's vision tower uses window attention; "
                             f"{type(method).__name__} scores a full-attention block: {full}")
        blocks[name] = layer % depth
    return blocks


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
