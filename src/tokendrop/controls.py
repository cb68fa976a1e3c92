"""Running one configuration of bench / eval: methods through `tokendrop.apply`, or a control.

A control is a family's own setting that asks the stock model for fewer visual tokens (Gemma 4's
`max_soft_tokens`, `tokendrop.families.base.Control`): the "ask the model for fewer tokens" baseline
beside the methods at the same budget. It drops nothing and patches nothing in the model; only the
processor's setting changes, inside the block.

    run = registry.build_run("gemma4-budget", 0.25)      # or a tuple of methods (`build_methods`)
    with applied(model, processor, run) as handle:       # a Handle either way (no patch for a control)
        model.generate(**processor(images=..., text=...))
    describe(processor, run)                             # "max_soft_tokens=70" (None for methods)
"""

from __future__ import annotations

import contextlib

from tokendrop.families.base import Control
from tokendrop.registry import check_control, family_for


def check(model, processor, control: Control) -> None:
    """ValueError (one line) unless `control` runs on `model` with `processor`: its family declares the
    control, the processor belongs to the model, and the control's budget has a setting."""
    family = family_for(model)
    check_control(family, control.name)
    family.check_processor(processor)
    control.setting(processor)


def describe(processor, run) -> str | None:
    """How results mark a control: its setting ("max_soft_tokens=70"); None for methods."""
    return run.describe(processor) if isinstance(run, Control) else None


@contextlib.contextmanager
def applied(model, processor, run):
    """`run` in force inside the block, yielding a `tokendrop.Handle`: the methods' (a tuple from
    `build_methods`; () is the stock model), or, for a `Control`, the stock model's (no patch) while
    the processor asks for fewer tokens. Everything is checked before anything changes."""
    import tokendrop as td

    if not isinstance(run, Control):
        with td.apply(model, processor, *run) as handle:
            yield handle
        return
    check(model, processor, run)
    with run.applied(processor), td.apply(model, processor) as handle:
        yield handle
