"""The one list of methods and the one list of model families. Everything else asks these.

    method_class("hired")                                   -> HiRED
    build_methods("hired+pdrop", budget=0.4, ratio=0.6)     -> (HiRED(budget=0.4), PyramidDrop(ratio=0.6))
    build_methods("none")                                   -> ()   (the stock model)
    build_run("gemma4-budget", budget=0.25)                 -> SoftTokenBudget(budget=0.25)  (a control)
    family_for(model)                                       -> the model's family adapter

A method name is a registered name, a preset ("hired-official"), or a composition joined by "+"
(at most one pre-LLM and one in-LLM part, as `tokendrop.apply` allows). Options are the methods'
dataclass fields: a key applies to every part that has that field ("fastv.seed=1" to one part).
Unknown names raise ValueError with a "did you mean" hint and the list of known names.

A control is a family's own setting for fewer visual tokens (`Family.controls`, e.g. Gemma 4's
"gemma4-budget"): a name `--method` accepts in bench and eval beside the methods, at each budget, never
composed. It is no method (nothing is dropped): `build_methods` refuses it, `build_run` builds either.

Third-party methods register through the `tokendrop.methods` entry-point group (a class per entry
point, loaded on first use) or `register_method(cls)` in a script. A registered method builds from its
defaults (given a budget if it takes one): listings, grids and the contract tests build it that way.
A plugin that fails to load or to build is one warning naming it; asking for it by name is a
ValueError that says why; every other method keeps working.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from importlib import metadata

from tokendrop.families import families, family_for, family_of, supported_models  # noqa: F401  (the family table)
from tokendrop.methods import (DART, BaseOnly, CDPruner, DivPrune, DominantDrop, FastV, FasterVLM, HiPrune, HiRED,
                               InLLMMethod, PreLLMMethod, PyramidDrop, RandomDrop, SpatialDrop, VisionZip, VisPruner)

#: the methods that ship with tokendrop, in the order `tokendrop methods` lists them.
METHODS = (HiRED, FasterVLM, HiPrune, DominantDrop, DivPrune, VisPruner, RandomDrop, SpatialDrop, BaseOnly, PyramidDrop,
           FastV, DART, VisionZip, CDPruner)
#: names for a method with some options set.
PRESETS = {"hired-official": ("hired", {"variant": "official"})}
VANILLA = "none"
ENTRY_POINTS = "tokendrop.methods"

#: the budget a method that takes one is built with to ask what it requires (`runs_on`).
PROBE_BUDGET = 0.5

_methods: dict[str, type] = {}
_broken: dict[str, str] = {}  # name of a plugin that failed -> why (for the error when it is asked for)


# ---- methods --------------------------------------------------------------------------------------
def register_method(cls: type) -> type:
    """Make a method class known by its `name` (usable as a class decorator). Returns `cls`."""
    if not (isinstance(cls, type) and issubclass(cls, (PreLLMMethod, InLLMMethod)) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"a method must be a dataclass subclassing PreLLMMethod or InLLMMethod, got {cls!r}")
    name = cls.name
    if not isinstance(name, str):
        raise TypeError(f"{cls.__name__}.name must be a str, got {type(name).__name__} {name!r}")
    if not name or name != name.strip().lower() or any(c in name for c in "+,= ") or name in (VANILLA, *PRESETS):
        raise ValueError(f"{cls.__name__}.name must be a lowercase name without '+', ',', '=' or spaces, "
                         f"other than {VANILLA!r} and the presets; got {name!r}")
    known = _registered()
    if known.get(name, cls) is not cls:
        raise ValueError(f"method name {name!r} is taken by {known[name].__module__}.{known[name].__qualname__}")
    _check_defaults(cls)
    known[name] = cls
    return cls


def _check_defaults(cls) -> None:
    """TypeError unless `cls` builds from its defaults (and a budget) and says what it requires."""
    required = [f for f, field in cls.options().items() if f != "budget" and field.init
                and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if required:
        raise TypeError(f"{cls.__name__}: option {', '.join(map(repr, required))} has no default; every option but budget "
                        "needs one (a method is listed, and run in a grid, from its defaults)")
    try:
        _default_instance(cls).requires()
    except Exception as err:
        budget = f" (budget={PROBE_BUDGET})" if _needs_budget(cls) else ""
        raise TypeError(f"{cls.__name__} cannot be built from its defaults{budget}: {type(err).__name__}: {err}") from err


def _default_instance(cls):
    """`cls` with its defaults, and PROBE_BUDGET when it takes a budget."""
    return cls(budget=PROBE_BUDGET) if _needs_budget(cls) else cls()


def _registered() -> dict[str, type]:
    """name -> class: the shipped methods, then the entry points (loaded once)."""
    if not _methods:
        _broken.clear()
        _methods.update((cls.name, cls) for cls in METHODS)
        for entry in metadata.entry_points(group=ENTRY_POINTS):
            _load_plugin(entry)
    return _methods


def _load_plugin(entry: metadata.EntryPoint) -> None:
    """Register an entry point's class. A broken plugin must not take tokendrop down, nor pass silently:
    one warning line names it, and asking for it by name (`method_class`) says why it is missing."""
    cls = None
    try:
        cls = entry.load()
        register_method(cls)
    except Exception as err:
        why = " ".join(f"method plugin {entry.name!r} ({entry.value}) not loaded: {type(err).__name__}: {err}".split())
        for name in {entry.name, getattr(cls, "name", None)}:
            if isinstance(name, str):
                _broken.setdefault(name, why)
        # one line (no source line under it), attributed to tokendrop for -W filters
        warnings.warn_explicit(why, UserWarning, filename="tokendrop", lineno=0)


def method_names() -> list[str]:
    """Every name `--method` accepts besides "none": registered methods, then presets."""
    return [*_registered(), *PRESETS]


def _unknown(part: str) -> ValueError:
    known = [VANILLA, *method_names()]
    close = difflib.get_close_matches(part, [*known, *control_names()], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    controls = f"; controls (bench, eval): {', '.join(control_names())}" if control_names() else ""
    return ValueError(f"unknown method {part!r}.{hint} Available: {', '.join(known)} (compose with '+', e.g. "
                      f"hired+pdrop){controls}")


def method_class(name: str) -> type:
    """The class registered (or preset) under `name`; ValueError with a hint otherwise."""
    base = PRESETS.get(name, (name, None))[0]
    cls = _registered().get(base)
    if cls is None:
        raise ValueError(_broken[base]) if base in _broken else _unknown(name)
    return cls


def split_name(name: str) -> list[str]:
    """The parts of a (possibly composed) method name, validated; ["none"] stays ["none"]."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    parts = [p.strip().lower() for p in name.split("+")]
    control = next((p for p in parts if p in control_names()), None)
    if control is not None and len(parts) > 1:
        raise ValueError(f"method {name!r}: {control!r} is a control (the stock model at its own setting), run "
                         "alone: it cannot be composed")
    if control is not None:
        return parts
    if VANILLA in parts:
        if len(parts) > 1:
            raise ValueError(f"method {name!r}: 'none' (the stock model) cannot be composed")
        return parts
    stages = [method_class(p).stage for p in parts]
    if stages.count("pre") > 1 or stages.count("in") > 1:
        pre = [n for n in method_names() if method_class(n).stage == "pre"]
        inner = [n for n in method_names() if method_class(n).stage == "in"]
        raise ValueError(f"method {name!r}: compose at most one pre-LLM ({', '.join(pre)}) and one in-LLM "
                         f"({', '.join(inner)}) method")
    return parts


def needs_budget(name: str) -> bool:
    """Whether `name` has a pre-LLM part whose budget the user chooses (BaseOnly's is fixed), or is a
    control (run at each budget)."""
    return any(p in control_names() or _needs_budget(method_class(p)) for p in split_name(name) if p != VANILLA)


def _needs_budget(cls) -> bool:
    field = cls.options().get("budget")
    return field is not None and field.default is dataclasses.MISSING


def configurations(names: list[str], budgets: list[float]) -> list[tuple[str, float | None]]:
    """(name, budget) for every method at every budget; methods without a budget once. In order, no repeats."""
    out = []
    for name in names:
        for budget in budgets if needs_budget(name) else [None]:
            if (name, budget) not in out:
                out.append((name, budget))
    return out


def check_options(names: list[str], options: dict) -> None:
    """ValueError for an option key that no method in `names` has (a grid shares its options)."""
    for key in options:
        if not any(option_owners(name, key) for name in names):
            raise ValueError(f"{key!r} is not an option of {', '.join(names)}; "
                             f"{'; '.join(describe_options(n) for n in names)}")


def option_owners(name: str, key: str) -> list[str]:
    """The parts of `name` an option key applies to ("fastv.seed" names its part)."""
    part, _, field = key.rpartition(".")
    parts = [p for p in split_name(name) if p != VANILLA and p not in control_names()]  # controls have no options
    if part:
        return [p for p in parts if part in (p, PRESETS.get(p, (p,))[0]) and field in method_class(p).options()]
    return [p for p in parts if key in method_class(p).options()]


def build_methods(name: str, budget=None, strict: bool = False, **options) -> tuple:
    """Method objects for `name`, in the order `tokendrop.apply(model, processor, *methods)` takes them.

    Args:
        name: "none", a method name, a preset, or a "+"-joined composition such as "hired+pdrop".
        budget: fraction in (0, 1] kept by the pre-LLM part (required when it takes one).
        strict: raise for an option no part of `name` has (else it is ignored: a grid shares options).
        options: field values, as Python values or as strings (`parse_options`), e.g. alpha=0.6,
            layers="[2,4,6]", or "pdrop.ratio"=0.4 for one part.
    Returns:
        a tuple of method objects; () for "none".
    """
    parts = split_name(name)
    if parts[0] in control_names():
        raise ValueError(f"{parts[0]!r} is a control (the stock model at its own setting for fewer visual tokens), "
                         "not a method: `tokendrop bench` and `tokendrop eval` run it beside the methods")
    if "budget" in options:
        raise ValueError("pass the budget as budget=..., not as an option")
    if strict:
        check_options([name], options)
    methods = []
    for part in parts:
        if part == VANILLA:
            continue
        cls, preset = method_class(part), PRESETS.get(part, (part, {}))[1]
        values = {**preset, **{key.rpartition(".")[2]: value for key, value in options.items() if part in option_owners(part, key)}}
        kwargs = {field: convert(cls, field, value) for field, value in values.items()}
        if _needs_budget(cls):
            if budget is None:
                raise ValueError(f"method {name!r} needs a budget in (0, 1], e.g. budget=0.2")
            kwargs["budget"] = convert(cls, "budget", budget)
        methods.append(cls(**kwargs))
    return tuple(methods)


def describe_options(name: str) -> str:
    """'hired: alpha, variant, ...; pdrop: layers, ...' for error messages."""
    parts = [p for p in split_name(name) if p != VANILLA and p not in control_names()]
    return "options: " + ("; ".join(f"{p}: {', '.join(method_class(p).options())}" for p in parts) or "none")


def build_run(name: str, budget=None, **options):
    """What a configuration of bench / eval runs: `build_methods(name, budget, **options)`, or the
    `Control` that `name` names at `budget` (options do not apply to it: a grid shares them)."""
    if isinstance(name, str) and name.strip().lower() in control_names():
        if budget is None:
            raise ValueError(f"control {name!r} needs a budget in (0, 1], e.g. budget=0.25")
        return control_class(name.strip().lower())(budget=budget)
    return build_methods(name, budget=budget, **options)


# ---- controls (`Family.controls`: a family's own setting for fewer visual tokens) ---------------------
def control_names() -> dict[str, str]:
    """Control name -> the name of the family that declares it, in the families' order."""
    return {control: family.name for family in families() for control in family.controls}


def control_class(name: str) -> type:
    """The `Control` class registered under `name`; ValueError with a hint otherwise."""
    from tokendrop.families.base import resolve

    for family in families():
        if name in family.controls:
            return resolve(family.controls[name])
    raise _unknown(name)


def check_control(family, name: str) -> None:
    """ValueError unless `family` (a class or adapter) declares the control `name`."""
    if name not in family.controls:
        owner = control_names().get(name)
        has = f"its controls are {', '.join(family.controls)}" if family.controls else "it declares no control"
        raise ValueError(f"control {name!r} is {owner}'s own setting and runs on {owner} models only; this model is "
                         f"{family.name}: {has}")


# ---- option strings ("key=value,key=value", the lmms-eval convention) ---------------------------------
def parse_options(text: str | None) -> dict[str, str]:
    """'alpha=0.5,layers=[8,16,24],fastv.seed=1' -> {"alpha": "0.5", "layers": "[8,16,24]", "fastv.seed": "1"}."""
    options, depth, item = {}, 0, ""
    for ch in (text or "") + ",":
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            if item.strip():
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"method options are key=value pairs separated by commas, got {item.strip()!r}")
                options[key.strip()] = value.strip()
            item = ""
        else:
            item += ch
    if depth:
        raise ValueError(f"unbalanced brackets in method options {text!r}")
    return options


def convert(cls, field: str, value):
    """A field value from its string form, by the field's annotation (non-strings pass unchanged)."""
    if not isinstance(value, str):
        return value
    hint = typing.get_type_hints(cls)[field]
    choices = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if type(None) in choices and value.lower() in ("none", "null", ""):
        return None
    kind = next(c for c in choices if c is not type(None))
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if typing.get_origin(kind) is tuple:
            items = [x for x in value.strip("[]() ").replace("/", ",").split(",") if x.strip()]
            return tuple(int(x) for x in items)
        return kind(value) if kind in (int, float, str) else value
    except ValueError:
        raise ValueError(f"{cls.name}: option {field}={value!r} is not a valid {getattr(kind, '__name__', kind)}") from None


# ---- families (the table: `tokendrop.families`) --------------------------------------------------------
def runs_on(method_cls) -> list[str]:
    """Families whose capabilities cover what `method_cls` needs with its default options."""
    probe = _default_instance(method_cls)
    return [family.name for family in families() if probe.requires() <= family.family_capabilities()]
