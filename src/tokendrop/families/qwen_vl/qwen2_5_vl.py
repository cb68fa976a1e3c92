"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): window attention in most vision blocks,
full attention in `fullatt_block_indexes`, M-RoPE.

The blocks run in WINDOW order (merge groups permuted by `get_window_index`); the merger's
output is put back in raster order, so selections index the raster grid as for Qwen2-VL.
"""

from __future__ import annotations

from tokendrop.families.qwen_vl.common import QwenVLStyle


class Qwen2_5_VLAdapter(QwenVLStyle):
    name = "qwen2.5-vl"
    model_type = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    config_class = "Qwen2_5_VLConfig"
    processor_class = "Qwen2_5_VLProcessor"
    image_processor_class = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil"
    tiny = "tokendrop.families.qwen_vl.tiny:tiny_qwen2_5_vl"
    merges = True  # VisionZip: merged rows through the stock merger (no DeepStack levels to merge)
    vllm = "tokendrop.families.qwen_vl.vllm:TokendropQwen2_5_VLForConditionalGeneration"

    @classmethod
    def config_score_block(cls, config, layer: int | None) -> int:
        """Full-attention blocks only: window blocks normalise attention per window, so their scores
        cannot rank an image's tokens against each other. None: the last full-attention block."""
        full = sorted(config.vision_config.fullatt_block_indexes)
        block = super().config_score_block(config, full[-1] if layer is None else layer)
        if block not in full:
            raise ValueError(f"layer {layer} of Qwen2.5-VL's vision tower uses window attention; the scores come from "
                             f"a full-attention block: {full}")
        return block

    def block_order(self, image_grid_thw):
        from transformers.vision_utils import get_vision_window_index

        tower = self.tower
        window_index, _ = get_vision_window_index(image_grid_thw, spatial_merge_size=tower.spatial_merge_size,
                                                  window_size=tower.window_size, patch_size=tower.patch_size)
        return window_index
