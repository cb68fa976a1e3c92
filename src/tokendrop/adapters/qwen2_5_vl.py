"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): window attention in most vision blocks,
full attention in `fullatt_block_indexes`, M-RoPE.

The blocks run in WINDOW order (merge groups permuted by `get_window_index`); the merger's
output is put back in raster order, so selections index the raster grid as for Qwen2-VL.
"""

from __future__ import annotations

from tokendrop.adapters.qwen_common import QwenVLStyle


class Qwen2_5_VLAdapter(QwenVLStyle):
    name = "qwen2.5-vl"
    model_type = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    config_class = "Qwen2_5_VLConfig"
    processor_class = "Qwen2_5_VLProcessor"
    image_processor_class = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil"
    tiny = "tokendrop.tiny:tiny_qwen2_5_vl"
