"""Optimisation shared by both stages: the learning-rate schedule, its stopping rule, one update."""

from __future__ import annotations

import math
import time

import torch


class Schedule:
    """Learning rate and stopping rule of one stage: by step count, or by wall-clock seconds.

    By steps the run is bit-for-bit reproducible (same seed, same thread count). By time the
    cosine schedule follows the elapsed share of the budget; the steps actually taken are logged
    and saved, so passing them as step counts reproduces the run exactly.
    """

    def __init__(self, steps: int, seconds: float | None, warmup: int, peak: float):
        self.steps, self.seconds, self.warmup, self.peak = steps, seconds, warmup, peak
        self.start = time.perf_counter()

    def progress(self, step: int) -> float:
        if self.seconds is None:
            return step / max(1, self.steps)
        return (time.perf_counter() - self.start) / self.seconds

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0 if self.seconds is not None else step >= self.steps

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        return self.peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress(step)))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` times each parameter group's ``lr_scale`` (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params) -> None:
    """One step on ``loss``, with the gradient norm of ``params`` clipped to 1."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
