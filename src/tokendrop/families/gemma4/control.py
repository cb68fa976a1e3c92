"""Gemma 4's own visual-token budget, as a control: ask the model for fewer tokens.

Gemma 4's image processor resizes every image, aspect ratio kept, to at most `max_soft_tokens` LLM
tokens, one of the settings the checkpoints were trained with (70, 140, 280, 560, 1120; 280 by
default). Asking for 70 instead of 280 is the baseline a token-dropping method at 25% must beat:
about the same count, reached by the model's own resize instead of a selection among the 280.

It is not a pre-LLM method: it changes the image the encoder sees, not which of its tokens reach
the LLM (a method's count is `floor(budget * N)` of the stock N tokens; the control's is the pooled
grid of the smaller resize, which may differ by a few tokens). So it is a processor setting:

    setting = control_setting(0.25, processor)      # 70 for the default 280; ValueError otherwise
    with fewer_tokens(processor, setting):
        inputs = processor(images=..., text=...)    # every image at most 70 tokens
    control_tokens(processor, (h, w), setting)      # the count, before encoding

`SoftTokenBudget` is the same as a `Control` (`Gemma4Adapter.controls`): `tokendrop bench` and
`tokendrop eval` run it as `--method gemma4-budget` beside the methods at the same `--budget`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from tokendrop.families.base import Control
from tokendrop.families.gemma4.gemma4 import Gemma4Geometry
from tokendrop.methods.base import check_budget

#: the `max_soft_tokens` values Gemma 4's image processor accepts
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)


def check_setting(max_soft_tokens) -> int:
    """`max_soft_tokens` as an int; ValueError naming the allowed values otherwise."""
    if isinstance(max_soft_tokens, bool) or max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}, "
                         f"got {max_soft_tokens!r}")
    return int(max_soft_tokens)


def control_setting(budget: float, processor) -> int:
    """The `max_soft_tokens` that is `budget` of the processor's current one (the control beside a
    method at that budget). ValueError naming the budgets that have a control."""
    current = processor.image_processor.max_soft_tokens
    setting = Fraction(str(budget)) * current
    if setting.denominator != 1 or int(setting) not in SUPPORTED_SOFT_TOKENS or setting > current:
        have = [f"{float(Fraction(s, current)):g} ({s})" for s in SUPPORTED_SOFT_TOKENS if s <= current]
        raise ValueError(f"budget {budget} has no Gemma 4 control at max_soft_tokens={current}: the budgets that "
                         f"have one are {', '.join(have)}")
    return int(setting)


def control_tokens(processor, image_size, max_soft_tokens: int) -> int:
    """LLM tokens an image of (height, width) pixels gets at `max_soft_tokens` (known before encoding)."""
    images = processor.image_processor
    geometry = Gemma4Geometry(images.patch_size, images.pooling_kernel_size, check_setting(max_soft_tokens))
    return geometry.layout(image_size).patches


@contextlib.contextmanager
def fewer_tokens(processor, max_soft_tokens: int):
    """The processor asks for at most `max_soft_tokens` tokens per image inside the block (restored after)."""
    setting = check_setting(max_soft_tokens)
    images = processor.image_processor
    had, old = "max_soft_tokens" in vars(images), vars(images).get("max_soft_tokens")
    images.max_soft_tokens = setting
    try:
        yield processor
    finally:
        if had:
            images.max_soft_tokens = old
        else:
            vars(images).pop("max_soft_tokens", None)


@dataclass(frozen=True)
class SoftTokenBudget(Control):
    """The stock Gemma 4 at its own `max_soft_tokens` = budget x the processor's, nothing dropped.

    The "ask the model for fewer tokens" control beside a method at `budget` (`control_setting`
    names the budgets that have a setting); run as "gemma4-budget" by bench and eval."""

    name: ClassVar[str] = "gemma4-budget"
    budget: float

    def __post_init__(self):
        check_budget(self.budget)

    def setting(self, processor) -> dict:
        return {"max_soft_tokens": control_setting(self.budget, processor)}

    def applied(self, processor):
        return fewer_tokens(processor, control_setting(self.budget, processor))
