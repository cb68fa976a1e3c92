"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): full attention in every vision block, M-RoPE.

The shared mechanics (native-resolution grid, merged tokens, position patches) are in
`qwen_common.py`; this family adds nothing to them.
"""

from __future__ import annotations

from tokendrop.families.qwen_vl.common import QwenVLStyle


class Qwen2VLAdapter(QwenVLStyle):
    name = "qwen2-vl"
    model_type = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    config_class = "Qwen2VLConfig"
    processor_class = "Qwen2VLProcessor"
    image_processor_class = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil"
    tiny = "tokendrop.families.qwen_vl.tiny:tiny_qwen2_vl"
    merges = True  # VisionZip: merged rows through the stock merger (no DeepStack levels to merge)
    vllm = "tokendrop.families.qwen_vl.vllm:TokendropQwen2VLForConditionalGeneration"
