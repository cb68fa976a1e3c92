"""InternVL3 / 3.5 (`InternVLForConditionalGeneration`): InternViT with a [CLS] token, a pixel shuffle,
tiles with the thumbnail last, `<img>...</img>` around each image's tokens, a Qwen2 / Qwen3 / Llama LM.

The processor (GOT-OCR2's tiling) cuts an image into rows x cols tiles of S x S pixels (the grid
whose aspect ratio is nearest the image's, between `min_patches` and `max_patches` tiles) and, when
there is more than one tile, appends the whole image squashed to one tile: the thumbnail. Every tile
becomes N = G*G LLM tokens (InternViT's g x g patches, k x k blocks folded into one token by the
pixel shuffle, k = 1 / downsample_ratio). In `Layout` terms the thumbnail is the base image,
partition 0, and the tiles are partitions 1..rows*cols in raster order, although the stock sequence
holds the tiles first and the thumbnail LAST; a one-tile image has no thumbnail (P = 1).

Budget: B = floor(budget * P * N) per image. Score-free methods split it as on LLaVA-NeXT (floor(B / P)
per partition, the remainder to the thumbnail first, then to the tiles in raster order). Scored
methods score LLM tokens: a token's score is the sum of its k x k patches' scores (`vision.group_scores`).
Kept tokens reach the LLM in the stock order: each tile's kept tokens in raster order, tile by tile,
then the thumbnail's.

The model never sees an image's size or tile count (`get_image_features` gets the tiles of all images
concatenated), so the patched processor also returns `image_sizes` (each image's (height, width), from
its image processor), and the layouts follow from the processor's own tiling arithmetic. `generate()`
hands them to `get_image_features` (its signature is the stock one plus `image_sizes`); a direct
`forward` receives them as a keyword, which a pre-hook takes out before the language model sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.families.base import Family, Shapes, TokenCount
from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod
from tokendrop.methods.layout import Layout


@dataclass(frozen=True)
class InternVLGeometry:
    """Image size -> `Layout` as the GOT-OCR2 processor tiles it (config and processor values, picklable)."""

    tile: int  # S, tile pixels
    grid: int  # G, LLM tokens per tile side after the pixel shuffle
    min_tiles: int = 1
    max_tiles: int = 12
    crop: bool = True  # crop_to_patches: tile at all

    def tiles(self, image_size) -> tuple[int, int]:
        """(rows, cols) of the tile grid, (0, 0) for a one-tile image (no thumbnail)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        if not self.crop or self.max_tiles <= 1:
            return 0, 0
        height, width = (int(x) for x in image_size)
        cols, rows = get_optimal_tiled_canvas((height, width), (self.tile, self.tile), self.min_tiles, self.max_tiles)
        return (rows, cols) if rows * cols > 1 else (0, 0)

    def layout(self, image_size) -> Layout:
        if image_size is None:
            raise ValueError("InternVL's tiles depend on the image size: pass image_size=(height, width)")
        return self.tiles_layout(*self.tiles(image_size))

    def tiles_layout(self, rows: int, cols: int) -> Layout:
        """The `Layout` of a rows x cols tile grid ((0, 0): one tile, no thumbnail)."""
        return Layout(grid=self.grid, tiles=(rows, cols), crop=(0, rows * self.grid, 0, cols * self.grid), newlines=False)

    def input_layout(self, image_inputs: dict, image_idx: int):
        """(Layout, (height, width)) of image `image_idx` of the patched processor's `image_inputs`."""
        size = [int(x) for x in image_inputs["image_sizes"][image_idx]]
        layout = self.layout(size)
        tiles = int(image_inputs["num_patches"][image_idx])
        if tiles != layout.num_partitions:
            raise ValueError(f"the processor cut an image of {size[0]}x{size[1]} pixels into {tiles} tiles, its "
                             f"settings into {layout.num_partitions}: pass min_patches / max_patches / "
                             "crop_to_patches to the processor itself, not per call")
        return layout, size


class InternVLAdapter(Family):
    name = "internvl"
    model_type = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    config_class = "InternVLConfig"
    processor_class = "InternVLProcessor"
    image_processor_class = "transformers.models.got_ocr2.image_processing_pil_got_ocr2:GotOcr2ImageProcessorPil"
    tiny = "tokendrop.families.internvl.tiny:tiny_internvl"
    tokenizer = "tokendrop.families.internvl.tiny:tiny_internvl_tokenizer"
    pre_llm = cls_token = base_image = True  # base: the thumbnail (or the one tile)
    decoder = "tokendrop.engine.decoders:LlamaDecoder"  # Qwen2 / Qwen3 / Llama language models
    vllm = "tokendrop.families.internvl.vllm:TokendropInternVLForConditionalGeneration"

    def __init__(self, model):
        super().__init__(model)
        self.geometry = self.config_geometry(self.config)

    @property
    def tower(self):
        return self.base.vision_tower

    # ---- config-level answers ------------------------------------------------------------------
    @classmethod
    def config_geometry(cls, config, image_processor=None, crop: bool = True) -> InternVLGeometry:
        """The geometry from the config (tiling defaults: 1..12 tiles), or with `image_processor`'s settings."""
        vision = config.vision_config
        size, patch = _first(vision.image_size), _first(vision.patch_size)
        grid = int(size // patch * config.downsample_ratio)
        if image_processor is None:
            return InternVLGeometry(size, grid)
        tile = image_processor.size["height"] if isinstance(image_processor.size, dict) else image_processor.size.height
        return InternVLGeometry(int(tile), grid, int(image_processor.min_patches), int(image_processor.max_patches), crop)

    @classmethod
    def config_capabilities(cls, config) -> set[str]:
        caps = super().config_capabilities(config)
        if config.vision_feature_select_strategy != "default":
            caps -= {"pre_llm", "cls_token"}  # the stock model's pixel shuffle then fails on the [CLS] row
        return caps

    @classmethod
    def config_score_blocks(cls, config, method: PreLLMMethod) -> dict[str, tuple[str, int]]:
        """name -> (score kind, 0-based InternViT block) of every score `method` reads."""
        from tokendrop.families.llava.vision import config_score_blocks  # the rule every [CLS] tower shares

        return config_score_blocks(config, method)

    # ---- processor ---------------------------------------------------------------------------------
    def processor_geometry(self, processor):
        return self.config_processor_geometry(self.config, processor)

    @classmethod
    def config_processor_geometry(cls, config, processor) -> InternVLGeometry:
        """The geometry of `config` tiled as `processor` tiles (its image processor's settings; whether it
        tiles at all is asked of the processor: InternVLProcessor's own default turns tiling on)."""
        images = getattr(processor, "image_processor", None)
        if images is None:
            return cls.config_geometry(config)
        crop = bool(getattr(images, "crop_to_patches", False))
        query = getattr(processor, "_get_num_multimodal_tokens", None)
        if query is not None and int(images.max_patches) > 1:
            tile = cls.config_geometry(config, images).tile
            crop = query(image_sizes=[[tile, 2 * tile]]).num_image_patches[0] > 1
        return cls.config_geometry(config, images, crop)

    def stock_tokens(self, image_size=None, processor=None) -> int:
        """N tokens per tile, tiles and thumbnail alike (the `<img>` / `</img>` tokens are not image tokens)."""
        layout = self.processor_geometry(processor).layout(image_size) if processor is not None else self.layout(image_size)
        return layout.num_partitions * layout.patches

    def processor_expects(self) -> dict:
        return {"image_seq_length": self.geometry.grid**2}

    def processor_patches(self, processor, count: TokenCount, live):
        from tokendrop.families.internvl.seams import ImageSizes, WrappedPlaceholders

        return [(processor, "replace_image_token", WrappedPlaceholders(processor, count, live)),
                (processor.image_processor, "_preprocess", ImageSizes(processor.image_processor, live))]

    # ---- encoding ------------------------------------------------------------------------------------
    def pre_llm_patches(self, method: PreLLMMethod, record, geometry):
        state = {}

        def take_sizes(module, args, kwargs):  # a direct forward: image_sizes arrive as a keyword
            state["image_sizes"] = kwargs.pop("image_sizes", None)
            return args, kwargs

        return {"get_image_features": self.encoder_patch(method, record, geometry, state)}, [take_sizes]

    def encoder_patch(self, method: PreLLMMethod, record, geometry=None, state=None):
        """A `get_image_features` keeping `method`'s tokens; `record(selections)` gets the picks."""
        from tokendrop.families.internvl.vision import tower_pass
        from tokendrop.families.llava.vision import score_blocks

        geometry, state = geometry or self.geometry, {} if state is None else state

        def get_image_features(pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                               image_sizes=None, **kwargs):
            sizes = image_sizes if image_sizes is not None else state.pop("image_sizes", None)
            layouts = image_layouts(geometry, sizes, pixel_values.shape[0])
            layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
            blocks = score_blocks(method, self.config.vision_config.num_hidden_layers, layer)
            outputs, features, scores = tower_pass(self.base, pixel_values, layer, blocks)
            kept, selections, start = [], [], 0
            for layout in layouts:
                part = slice(start, start + layout.num_partitions)
                keep = method.select(layout, {name: to_layout_order(row[part]) for name, row in scores.items()})
                tokens, where = gather_stock_order(features[part], keep, layout)
                kept.append(tokens)
                selections.append(where)
                start += layout.num_partitions
            record(selections)
            # (K, 1, D): one row per token, so generate()'s expansion (beams) splits images by placeholder counts
            outputs.pooler_output = self.base.multi_modal_projector(torch.cat(kept))[:, None]
            return outputs

        return get_image_features

    # ---- costs -----------------------------------------------------------------------------------------
    def shapes(self) -> Shapes:
        lm, tower = self.language_model, self.tower
        attn, mlp = lm.layers[0].self_attn, lm.layers[0].mlp
        vlayer = tower.encoder.layer[0]
        conv = tower.embeddings.patch_embeddings.projection.weight  # (vd, 3, p, p)
        projector = self.base.multi_modal_projector
        linears = [projector.linear_1.weight.shape, projector.linear_2.weight.shape]
        return Shapes(d=attn.q_proj.weight.shape[1], m=mlp.gate_proj.weight.shape[0], depth=len(lm.layers),
                      q_width=attn.q_proj.weight.shape[0], kv_width=attn.k_proj.weight.shape[0],
                      vocab=self.model.lm_head.weight.shape[0], vd=vlayer.attention.q_proj.weight.shape[0],
                      vm=vlayer.mlp.fc1.weight.shape[0], vision_depth=len(tower.encoder.layer),
                      patch_inputs=conv.shape[1] * conv.shape[2] * conv.shape[3],
                      projector=tuple(x for shape in linears for x in (shape[1], shape[0])), vision_tokens_extra=1)

    def vision_work(self, layout) -> tuple[int, int]:
        """InternViT runs on every tile's g*g patches (k*k per LLM token)."""
        k = round(1 / self.config.downsample_ratio)
        return layout.num_partitions, layout.patches * k * k

    def token_pixels(self) -> int:
        return _first(self.config.vision_config.patch_size) * round(1 / self.config.downsample_ratio)

    @classmethod
    def build_processor(cls, image_processor, tokenizer, **settings):
        from tokendrop.families.base import resolve
        from tokendrop.processors import image_only  # its video processor needs torchvision

        return image_only(resolve(cls.processor_class))(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                            **settings)

    @classmethod
    def bind_tokenizer(cls, config, tokenizer) -> None:
        config.image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")


def _first(value) -> int:
    """An int from a config value that may be a (height, width) pair."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def image_layouts(geometry: InternVLGeometry, image_sizes, tiles: int) -> list[Layout]:
    """Every image's `Layout`; ValueError unless their partitions are the `tiles` given."""
    if image_sizes is None:
        raise ValueError("InternVL under a pre-LLM method needs each image's size (image_sizes), which the patched "
                         "processor returns: build the inputs with the processor given to td.apply()")
    layouts = [geometry.layout(size) for size in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
    if sum(lay.num_partitions for lay in layouts) != tiles:
        raise ValueError(f"image_sizes give {sum(lay.num_partitions for lay in layouts)} tiles, pixel_values holds {tiles}")
    return layouts


def to_layout_order(rows: torch.Tensor) -> torch.Tensor:
    """(P, N) rows of one image in the stock order (tiles, then thumbnail) -> `Layout` order (thumbnail first)."""
    return rows if rows.shape[0] == 1 else torch.cat([rows[-1:], rows[:-1]])


def gather_stock_order(features: torch.Tensor, keep: list[torch.Tensor], layout: Layout):
    """One image's kept features in the stock order (tiles in raster order, then the thumbnail).

    Args:
        features: (P, N, Dp) the image's pixel-shuffled features, stock order.
        keep: P sorted index tensors into N, `Layout` order (partition 0 = thumbnail).
    Returns:
        tokens: (K, Dp); where: (K, 3) long (partition, row, col), partition in `Layout` terms.
    """
    P, g = features.shape[0], layout.grid
    order = list(range(1, P)) + [0]  # Layout partitions in stock order
    tokens, where = [], []
    for p in order:
        k = keep[p].to(features.device)
        tokens.append(features[(p - 1) % P, k])  # Layout partition p is stock tile p - 1; 0 is the last
        where.append(torch.stack([torch.full_like(k, p), k // g, k % g], dim=1))
    return torch.cat(tokens), torch.cat(where)
