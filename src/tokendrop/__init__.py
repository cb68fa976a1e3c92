"""tokendrop: training-free visual token dropping for stock Hugging Face vision-language models.

    import tokendrop as td
    handle = td.apply(model, processor, td.HiRED(budget=0.2, alpha=0.5))
    out = model.generate(**processor(images=img, text=prompt, return_tensors="pt"), max_new_tokens=32)
    handle.remove()

The method configs import only torch; `apply` (which needs transformers) is imported on first use,
so `tokendrop.methods` works without transformers installed.
"""

from tokendrop.methods import (DART, BaseOnly, CDPruner, DivPrune, DominantDrop, FastV, FasterVLM, HiPrune, HiRED,
                               PyramidDrop, RandomDrop, SpatialDrop, VisionZip, VisPruner)

__version__ = "0.1.0"

__all__ = ["BaseOnly", "CDPruner", "DART", "DivPrune", "DominantDrop", "FastV", "FasterVLM", "Handle", "HiPrune", "HiRED",
           "PyramidDrop", "RandomDrop", "SpatialDrop", "VisionZip", "VisPruner", "apply", "check", "register_family", "register_method"]


def __getattr__(name):
    if name in ("apply", "check", "Handle"):
        from tokendrop import api

        return getattr(api, name)
    if name == "register_method":
        from tokendrop.registry import register_method

        return register_method
    if name == "register_family":
        from tokendrop.families import register_family

        return register_family
    raise AttributeError(f"module 'tokendrop' has no attribute {name!r}")
