"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, Qwen2 LM): in-LLM methods only.

Its SigLIP tower has no [CLS] token (vision_feature_select_strategy "full"), so HiRED and the other
pre-LLM methods have nothing to rank by; `check_pre_llm` refuses them with that reason. The
in-LLM methods need only the language model and the image token id, which this family shares
with LLaVA-NeXT.
"""

from __future__ import annotations

from tokendrop.adapters.base import Adapter


class LlavaOnevisionAdapter(Adapter):
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
