"""Method names as users type them (CLI, configs) -> method objects.

    build_methods("hired", budget=0.2)          -> (HiRED(budget=0.2, alpha=0.5),)
    build_methods("hired+pdrop", budget=0.4)    -> (HiRED(budget=0.4), PyramidDrop())
    build_methods("none")                       -> ()   (the stock model)

A name is one method or a composition joined by "+" (at most one pre-LLM and one in-LLM part,
as `tokendrop.apply` allows). Unknown names raise ValueError with a "did you mean" hint and the
list of known names.
"""

from __future__ import annotations

import difflib

from tokendrop.methods import BaseOnly, HiRED, RandomDrop, SpatialDrop
from tokendrop.methods.inllm import FastV, PyramidDrop

VANILLA = "none"
#: pre-LLM names: they need a budget.
PRE_LLM = {
    "hired": lambda budget, alpha: HiRED(budget=budget, alpha=alpha),
    "hired-official": lambda budget, alpha: HiRED(budget=budget, alpha=alpha, variant="official"),
    "random": lambda budget, alpha: RandomDrop(budget=budget),
    "spatial": lambda budget, alpha: SpatialDrop(budget=budget),
}
#: pre-LLM names with a fixed count: no budget.
FIXED = {
    "base-only": BaseOnly,
}
#: in-LLM names: their own schedule arguments, no budget.
IN_LLM = {
    "pdrop": lambda layers, ratio, k, drop: PyramidDrop(layers=layers, ratio=ratio),
    "fastv": lambda layers, ratio, k, drop: FastV(k=k, drop=drop),
}
KNOWN = (VANILLA, *PRE_LLM, *FIXED, *IN_LLM)


def _unknown(part: str) -> ValueError:
    close = difflib.get_close_matches(part, KNOWN, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown method {part!r}.{hint} Available: {', '.join(KNOWN)} (compose with '+', e.g. hired+pdrop)")


def split_name(name: str) -> list[str]:
    """The parts of a (possibly composed) method name, validated; ["none"] stays ["none"]."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    parts = [p.strip().lower() for p in name.split("+")]
    for part in parts:
        if part not in KNOWN:
            raise _unknown(part)
    if VANILLA in parts and len(parts) > 1:
        raise ValueError(f"method {name!r}: 'none' (the stock model) cannot be composed")
    if sum(p in PRE_LLM or p in FIXED for p in parts) > 1 or sum(p in IN_LLM for p in parts) > 1:
        raise ValueError(f"method {name!r}: compose at most one pre-LLM ({', '.join([*PRE_LLM, *FIXED])}) "
                         f"and one in-LLM ({', '.join(IN_LLM)}) method")
    return parts


def needs_budget(name: str) -> bool:
    """Whether `name` has a pre-LLM part (and so takes a budget)."""
    return any(p in PRE_LLM for p in split_name(name))


def build_methods(name: str, budget=None, alpha=0.5, layers=None, ratio=0.5, k=2, drop=0.5) -> tuple:
    """Method objects for `name`, in the order `tokendrop.apply(model, processor, *methods)` takes them.

    Args:
        name: "none", one of `KNOWN`, or a "+"-joined composition such as "hired+pdrop".
        budget: fraction in (0, 1] kept by the pre-LLM part (required when there is one).
        alpha: HiRED's base-image share.
        layers, ratio: PyramidDrop's stage boundaries (None: depth/4, depth/2, 3*depth/4) and lambda.
        k, drop: FastV's layer and dropped fraction R.
    Returns:
        a tuple of method objects; () for "none".
    """
    parts = split_name(name)
    methods = []
    for part in parts:
        if part in PRE_LLM:
            if budget is None:
                raise ValueError(f"method {name!r} needs a budget in (0, 1], e.g. budget=0.2")
            methods.append(PRE_LLM[part](budget, alpha))
        elif part in FIXED:
            methods.append(FIXED[part]())
        elif part in IN_LLM:
            methods.append(IN_LLM[part](layers, ratio, k, drop))
    return tuple(methods)
