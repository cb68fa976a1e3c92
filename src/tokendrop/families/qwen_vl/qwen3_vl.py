"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): 16-px patches, q/k norms in the LLM, DeepStack.

DeepStack adds visual features from several vision blocks to the image tokens' hidden states after
the first LLM layers. Pre-LLM methods keep the same rows of every DeepStack level as of the main
features; in-LLM methods add them to the image tokens still present (`tokendrop.engine.decoder`).
"""

from __future__ import annotations

from tokendrop.families.qwen_vl.common import QwenVLStyle


class Qwen3VLAdapter(QwenVLStyle):
    name = "qwen3-vl"
    model_type = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)
    decoder = "tokendrop.engine.decoders:DeepStackDecoder"  # visual features added after the first layers
    config_class = "Qwen3VLConfig"
    processor_class = "Qwen3VLProcessor"
    image_processor_class = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil"
    tiny = "tokendrop.families.qwen_vl.tiny:tiny_qwen3_vl"
    vllm = "tokendrop.families.qwen_vl.vllm:TokendropQwen3VLForConditionalGeneration"
    default_pixels = (64 * 32 * 32, 16384 * 32 * 32)  # Qwen3-VL's processor defaults (min, max)
