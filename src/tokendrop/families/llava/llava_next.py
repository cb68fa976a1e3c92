"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres partitions, unpadding, newline packing.

The stock model encodes each image as P = 1 + rows*cols tiles of S x S pixels (G x G patches):
tile 0 is the whole image squashed to one tile (the base), tiles 1..k cover a canvas holding the
image at its best pinpoint resolution, aspect preserved and centre padded. `pack_image_features`
then lays out [base tokens, canvas rows with the padding cropped away, one newline per row].

This adapter replaces `get_image_features` (instance attribute, removed by `remove()`) with:
tower pass -> scores -> method.select -> gather kept tokens -> projector -> pack, and the
processor's `replace_image_token` with the method's count, known from the image size alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.families.llava.common import LlavaStyle
from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod
from tokendrop.methods.layout import Layout


@dataclass(frozen=True)
class NextGeometry:
    """Image size -> `Layout` as the stock LLaVA-NeXT model tiles and unpads it.

    Built from config values only, so the processor's placeholder patch can carry it (and be pickled)
    without holding the model.
    """

    tile: int  # S, tile pixels
    grid: int  # G, patches per tile side
    pinpoints: tuple[tuple[int, int], ...]

    def layout(self, image_size) -> Layout:
        """Layout of an image of (height, width) pixels."""
        from transformers.image_processing_utils import select_best_resolution

        height, width = (int(x) for x in image_size)
        best_h, best_w = select_best_resolution((height, width), [list(p) for p in self.pinpoints])
        rows, cols = best_h // self.tile, best_w // self.tile
        canvas_h, canvas_w = rows * self.grid, cols * self.grid
        top, bottom, left, right = 0, canvas_h, 0, canvas_w
        if width / height > canvas_w / canvas_h:  # same arithmetic as transformers' unpad_image
            pad = (canvas_h - int(round(height * (canvas_w / width), 7))) // 2
            top, bottom = pad, canvas_h - pad
        else:
            pad = (canvas_w - int(round(width * (canvas_h / height), 7))) // 2
            left, right = pad, canvas_w - pad
        return Layout(grid=self.grid, tiles=(rows, cols), crop=(top, bottom, left, right))

    def input_layout(self, image_inputs: dict, image_idx: int):
        """(Layout, (height, width)) of image `image_idx` as the processor's `replace_image_token` sees it."""
        size = image_inputs["image_sizes"][image_idx]
        size = size.tolist() if hasattr(size, "tolist") else list(size)
        return self.layout(size), size


class LlavaNextAdapter(LlavaStyle):
    name = "llava-next"
    model_type = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    config_class = "LlavaNextConfig"
    processor_class = "LlavaNextProcessor"
    image_processor_class = "transformers.models.llava_next.image_processing_pil_llava_next:LlavaNextImageProcessorPil"
    tiny = "tokendrop.families.llava.tiny:tiny_llava_next"
    vllm = "tokendrop.families.llava.vllm:TokendropLlavaNextForConditionalGeneration"
    pre_llm = cls_token = base_image = merges = instruction = True

    def __init__(self, model):
        super().__init__(model)
        self.geometry = self.config_geometry(self.config)
        self.tile, self.grid = self.geometry.tile, self.geometry.grid

    @classmethod
    def config_geometry(cls, config) -> NextGeometry:
        vision = config.vision_config
        return NextGeometry(vision.image_size, vision.image_size // vision.patch_size,
                            tuple(tuple(p) for p in config.image_grid_pinpoints))

    def stock_tokens(self, image_size=None, processor=None) -> int:
        """Base + unpadded canvas + one newline per canvas row, as the stock model packs them."""
        layout = self.layout(image_size)
        return layout.patches + sum(layout.valid_counts()[1:]) + layout.canvas_rows

    def check_processor(self, processor) -> None:
        super().check_processor(processor)
        self.check_pinpoints(processor)

    def check_pinpoints(self, processor) -> None:
        pinpoints = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
        got = [list(p) for p in pinpoints] if pinpoints is not None else None
        if got != [list(p) for p in self.config.image_grid_pinpoints]:
            raise ValueError(f"processor does not belong to the model: image_grid_pinpoints {got} != "
                             f"model's {self.config.image_grid_pinpoints}")

    # ---- encoding -------------------------------------------------------------------------
    def encoder_patch(self, method: PreLLMMethod, record):
        """A `get_image_features` that drops tokens with `method`; `record(selections)` gets the picks."""
        from tokendrop.families.llava.vision import instruction_relevance, score_blocks, tower_pass

        cls = self.config.vision_feature_select_strategy == "default"

        def get_image_features(pixel_values, image_sizes, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
            layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
            layouts = [self.layout(size) for size in torch.as_tensor(image_sizes).tolist()]
            if pixel_values.dim() == 5:  # (images, max tiles, 3, S, S) padded -> (T, 3, S, S)
                pixel_values = torch.cat([pv[: lay.num_partitions] for pv, lay in zip(pixel_values, layouts)])
            blocks = score_blocks(method, self.config.vision_config.num_hidden_layers, layer, cls)
            relevance = instruction_relevance(method, self.prompts, blocks, layouts)
            outputs, states, rows = tower_pass(self.tower, pixel_values, layer, blocks, cls=cls,
                                               projector=self.base.multi_modal_projector, relevance=relevance)
            features = states[:, int(cls):]  # (T, N, Dv) patches
            packed, selections, start = [], [], 0
            for lay in layouts:
                part = slice(start, start + lay.num_partitions)
                inputs = {name: row[part] for name, row in rows.items()}
                if method.merges:
                    tokens, where = self.pack_merged(states[part], method.merge(lay, inputs, cls), lay, method.keep_newlines)
                else:
                    tokens, where = self.pack(features[part], method.select(lay, inputs), lay, method.keep_newlines)
                packed.append(tokens)
                selections.append(where)
                start += lay.num_partitions
            record(selections)
            outputs.pooler_output = packed
            return outputs

        return get_image_features

    def pack(self, features: torch.Tensor, keep: list[torch.Tensor], layout: Layout, newlines: bool):
        """`pack_kept` with this model's projector and newline embedding."""
        return pack_kept(features, keep, layout, self.base.multi_modal_projector, self.base.image_newline, newlines)

    def pack_merged(self, states: torch.Tensor, merged: list, layout: Layout, newlines: bool):
        """`pack_merged` with this model's projector and newline embedding."""
        return pack_merged(states, merged, layout, self.base.multi_modal_projector, self.base.image_newline, newlines)


def pack_merged(states: torch.Tensor, merged: list, layout: Layout, projector, newline: torch.Tensor, newlines: bool):
    """One image's tokens under a merging method (VisionZip), in the official LLaVA-NeXT order: the base
    image's [CLS], kept patches and merged rows; the tiles' kept patches on the unpadded canvas (raster
    order, newlines when asked); the tiles' [CLS] states; the tiles' merged rows (tile order).

    Args:
        states: (P, L, Dv) the partitions' feature-layer states, [CLS] first when the tower has one
            (L = N + 1), else L = N.
        merged: P `Merged` answers (`PreLLMMethod.merge`), one per partition.
    Returns:
        tokens: (num_tokens, D); where: (K + M, 3) long (partition, row, col) of every kept patch and
        every merged row's anchor, in packed order.
    """
    from tokendrop.families.llava.vision import merged_parts

    g = layout.grid
    first = states.shape[1] - layout.patches  # 1 with a [CLS] column
    keep = [m.keep.to(states.device) for m in merged]
    kept, where = pack_kept(states[:, first:], keep, layout, projector, newline, newlines)
    parts = [merged_parts(m, states[p], projector) for p, m in enumerate(merged)]  # [(cls, rows)]
    n = keep[0].numel()  # the base's kept patches lead `kept`
    tokens = torch.cat([parts[0][0], kept[:n], parts[0][1], kept[n:],
                        *(cls for cls, _ in parts[1:]), *(rows for _, rows in parts[1:])])
    anchors = [torch.stack([torch.full_like(m.anchors, p), m.anchors // g, m.anchors % g], dim=1).to(where.device)
               for p, m in enumerate(merged)]
    cls = [where.new_tensor([[p, -1, -1]] * int(m.cls)).view(-1, 3) for p, m in enumerate(merged)]  # no grid place
    where = torch.cat([cls[0], where[:n], anchors[0], where[n:], *cls[1:], *anchors[1:]])
    return tokens, where


def pack_kept(features: torch.Tensor, keep: list[torch.Tensor], layout: Layout, projector, newline: torch.Tensor,
              newlines: bool):
    """Gather, project and order one image's kept tokens: base, then the unpadded canvas in raster order
    (the transformers path and the vLLM model class both call this, each with its own modules).

    Args:
        features: (P, N, Dv) vision features of the image's partitions.
        keep: P sorted index tensors into N.
        projector: the multi-modal projector (Dv -> D); newline: (D,) the model's `image_newline`.
    Returns:
        tokens: (K [+ canvas rows], D) LLM-width embeddings.
        where: (K, 3) long (partition, row, col) of every kept patch token, in packed order.
    """
    g, (rows, cols) = layout.grid, layout.tiles
    device = features.device
    keep = [k.to(device) for k in keep]
    mask = torch.zeros(features.shape[:2], dtype=torch.bool, device=device)  # (P, N)
    for p, k in enumerate(keep):
        mask[p, k] = True
    top, bottom, left, right = layout.crop
    canvas = mask[1:].view(rows, cols, g, g).permute(0, 2, 1, 3).reshape(rows * g, cols * g)[top:bottom, left:right]
    canvas_feats = features[1:].view(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, -1)
    chosen = torch.cat([features[0, keep[0]], canvas_feats[top:bottom, left:right][canvas]])  # (K, Dv)
    tokens = projector(chosen)  # (K, D)
    if newlines:
        tokens = insert_row_newlines(tokens, keep[0].numel(), canvas.sum(dim=1), newline)
    r, c = canvas.nonzero(as_tuple=True)
    r, c = r + top, c + left
    where = torch.cat([
        torch.stack([torch.zeros_like(keep[0]), keep[0] // g, keep[0] % g], dim=1),
        torch.stack([1 + (r // g) * cols + c // g, r % g, c % g], dim=1),
    ])
    return tokens, where


def insert_row_newlines(tokens: torch.Tensor, num_base: int, per_row: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """Put a newline embedding after every canvas row's kept tokens (rows may keep none).

    Args:
        tokens: (K, D) base tokens first, then canvas tokens row by row.
        per_row: (R,) kept tokens in each canvas row.
        newline: (D,) the model's `image_newline`.
    Returns:
        (K + R, D)
    """
    ends = num_base + torch.cumsum(per_row + 1, dim=0) - 1  # (R,) where each row's newline goes
    out = newline.to(tokens.dtype)[None].expand(tokens.shape[0] + per_row.numel(), -1).clone()
    is_token = torch.ones(out.shape[0], dtype=torch.bool, device=tokens.device)
    is_token[ends] = False
    out[is_token] = tokens
    return out
