"""The model families tokendrop runs on: one folder per lineage, one table, read by everything else.

    families()                     -> every family class (the table's, then third-party ones)
    family_for(model)              -> the family adapter of a model instance
    family_of(model_type=...)      -> the family class of a config's model_type or architecture

`FAMILIES` maps a family's name to its class as a lazy "module:Class" string (as transformers' auto
mappings do): nothing is imported until a family is needed. `apply`, `cost`, `bench`, `tokendrop
methods`, the contract tests and the vLLM plugin (its architecture map is derived from the families
that name a vLLM class) all read it. A folder holds everything tokendrop knows of its families:
the declaration and the config-level answers (`Family`, `tokendrop.families.base`), the transformers
seams, the tiny random builders and the vLLM module. Third-party families: `register_family(cls)` or
the `tokendrop.families` entry-point group (a class per entry point), as for methods.
"""

from __future__ import annotations

import warnings
from importlib import metadata

#: family name -> "module:Class", in the order `tokendrop methods` lists them.
FAMILIES = {
    "llava-next": "tokendrop.families.llava.llava_next:LlavaNextAdapter",
    "llava": "tokendrop.families.llava.llava:LlavaAdapter",
    "llava-onevision": "tokendrop.families.llava.llava_onevision:LlavaOnevisionAdapter",
    "qwen2-vl": "tokendrop.families.qwen_vl.qwen2_vl:Qwen2VLAdapter",
    "qwen2.5-vl": "tokendrop.families.qwen_vl.qwen2_5_vl:Qwen2_5_VLAdapter",
    "qwen3-vl": "tokendrop.families.qwen_vl.qwen3_vl:Qwen3VLAdapter",
    "qwen3.5": "tokendrop.families.qwen_vl.qwen3_5:Qwen3_5Adapter",
    "qwen3.5-moe": "tokendrop.families.qwen_vl.qwen3_5:Qwen3_5MoeAdapter",
    "internvl": "tokendrop.families.internvl.internvl:InternVLAdapter",
    "gemma4": "tokendrop.families.gemma4.gemma4:Gemma4Adapter",
}
ENTRY_POINTS = "tokendrop.families"

_registered: dict[str, type] = {}  # name -> class: the table's (on first use), then registered ones
_plugins_loaded = False


def families() -> tuple[type, ...]:
    """Every family class: the table's (imported on first call), then third-party ones."""
    global _plugins_loaded
    from tokendrop.families.base import resolve

    for name, path in FAMILIES.items():
        if name not in _registered:
            _registered[name] = resolve(path)
    if not _plugins_loaded:
        _plugins_loaded = True
        _load_plugins()
    return tuple(_registered.values())


def register_family(cls: type) -> type:
    """Make a family class known (usable as a class decorator). Returns `cls`.

    Raises:
        TypeError / ValueError: not a `Family` subclass, a `name` that is not a new non-empty str, or
            `model_classes` that are empty or already served by another family.
    """
    from tokendrop.families.base import Family

    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise TypeError(f"a family must be a subclass of tokendrop.families.base.Family, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"{cls.__name__}.name must be a non-empty str, got {cls.name!r}")
    if not cls.model_classes or not all(isinstance(c, str) for c in cls.model_classes):
        raise TypeError(f"{cls.__name__}.model_classes must name the transformers model classes it serves, "
                        f"got {cls.model_classes!r}")
    known = {f.name: f for f in families()}
    if known.get(cls.name, cls) is not cls:
        raise ValueError(f"family name {cls.name!r} is taken by {known[cls.name].__module__}.{known[cls.name].__qualname__}")
    taken = {c: f for f in known.values() if f is not cls for c in f.model_classes}
    clash = [c for c in cls.model_classes if c in taken]
    if clash:
        raise ValueError(f"{cls.__name__} serves {clash[0]}, which family {taken[clash[0]].name!r} already serves")
    _registered[cls.name] = cls
    return cls


def _load_plugins() -> None:
    """Families from installed packages (entry-point group `tokendrop.families`); a broken one is one warning."""
    for entry in metadata.entry_points(group=ENTRY_POINTS):
        try:
            register_family(entry.load())
        except Exception as err:  # a third-party package's fault: warn, keep every other family
            warnings.warn_explicit(f"family plugin {entry.name!r} ({entry.value}) not loaded: {type(err).__name__}: {err}",
                                   UserWarning, filename="tokendrop", lineno=0)


def supported_models() -> list[str]:
    """The transformers model classes tokendrop accepts."""
    return [name for family in families() for name in family.model_classes]


def family_for(model):
    """The adapter of `model`'s family; TypeError naming the supported classes otherwise."""
    name = type(model).__name__
    for family in families():
        if name in family.model_classes:
            return family(model)
    raise TypeError(f"model must be one of {', '.join(supported_models())}; got {name}")


def family_of(model_type: str | None = None, architecture: str | None = None):
    """The family class of a config's `model_type` or an `architectures` entry; ValueError otherwise."""
    for family in families():
        if model_type == family.model_type or architecture in family.model_classes:
            return family
    what = f"model_type {model_type!r}" if model_type else f"architecture {architecture!r}"
    raise ValueError(f"{what} is not supported; supported: {', '.join(supported_models())}")
