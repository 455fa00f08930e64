"""The learning rate of each local step: --warmup, then --schedule over the run's budget.

A pure function of a worker's local step count, which is part of its saved state: a resumed
worker continues its schedule from the restored step, exactly. The schedule scales the lr that
the local step uses (rules.local_step_), whatever the algorithm; the elastic moving rate is not
scaled. With a budget of ``T`` local steps, warm-up ``N`` and base rate ``eta``, step ``s``
(from 0) takes ``eta * w(s) * d(s)`` where

    w(s) = (s + 1) / N  for s < N, else 1       (PyTorch's LinearLR(start_factor=1/N,
                                                 total_iters=N-1): from eta / N, never 0)
    constant:  d(s) = 1
    cosine:    d(s) = (1 + cos(pi * p)) / 2, p = clamp((s - N) / (T - N), 0, 1)
                                                (from the end of the warm-up down to 0 at T)
    step:      d(s) = factor ** (number of fractions f with s >= f * T)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .config import DEFAULT_DECAY_AT, DEFAULT_DECAY_FACTOR

if TYPE_CHECKING:
    from .config import TrainConfig


def lr_at(step: int, base_lr: float, warmup: int = 0, schedule: str = "constant",
          total_steps: int | None = None, *, decay_factor: float = DEFAULT_DECAY_FACTOR,
          decay_at: Sequence[float] = DEFAULT_DECAY_AT) -> float:
    """The lr of local step ``step`` (counted from 0); see the module's docstring.
    ``total_steps``: the run's budget of local steps per worker, needed by cosine and step."""
    factor = (step + 1) / warmup if step < warmup else 1.0
    if schedule == "constant":
        return base_lr * factor
    if total_steps is None:
        raise ValueError(f"schedule {schedule} needs the run's budget of steps")
    if schedule == "cosine":
        progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
        return base_lr * factor * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        passed = sum(1 for at in decay_at if step >= at * total_steps)
        return base_lr * factor * decay_factor ** passed
    raise ValueError(f"unknown schedule {schedule!r}")


def run_schedule(config: TrainConfig, total_steps: int | None) -> Callable[[int], float]:
    """step -> lr for a worker of this (validated) run; ``total_steps``: control.steps_budget."""
    return functools.partial(
        lr_at, base_lr=config.lr, warmup=config.warmup, schedule=config.schedule,
        total_steps=total_steps,
        decay_factor=DEFAULT_DECAY_FACTOR if config.decay_factor is None else config.decay_factor,
        decay_at=DEFAULT_DECAY_AT if config.decay_at is None else tuple(config.decay_at))
