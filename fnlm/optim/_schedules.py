"""Learning-rate schedules: pure float64 tensor functions of the int64 update count.

Branch-free (``torch.where``, ``clamp``), so they compile inside the whole training step and
``vmap`` over ensembles. A schedule is evaluated at the number of updates already done: the first
update uses ``schedule(0)``.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import Tensor

Schedule = Callable[[Tensor], Tensor]  # int64 step tensor -> float64 lr tensor
ScalarOrSchedule = Union[float, Schedule]


def _check_lr(name: str, lr: ScalarOrSchedule) -> None:
    if callable(lr):
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{name}: expected a float or a schedule (callable step -> lr), got {type(lr).__name__}")
    if lr < 0:
        raise ValueError(f"{name}: expected lr >= 0, got {lr}")


def _step_f64(step: Tensor) -> Tensor:
    if not isinstance(step, Tensor):
        step = torch.as_tensor(step)
    return step.to(torch.float64)


def constant(lr: float) -> Schedule:
    """``lr(s) = lr`` (any float: also usable as a constant factor in :func:`scale_by_schedule`)."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr: expected a float, got {type(lr).__name__}")
    value = float(lr)
    return lambda step: torch.full_like(_step_f64(step), value)


def linear_warmup_linear_decay(peak_lr: float, warmup_steps: int, total_steps: int) -> Schedule:
    """HF ``get_linear_schedule_with_warmup``::

    lr(s) = peak * s / warmup                                  for s < warmup
    lr(s) = peak * max(0, (total - s) / (total - warmup))      otherwise
    """
    _check_lr("peak_lr", peak_lr)
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps/total_steps: expected >= 0, got {warmup_steps}, {total_steps}")
    peak, warmup, total = float(peak_lr), int(warmup_steps), int(total_steps)

    def schedule(step: Tensor) -> Tensor:
        s = _step_f64(step)
        warm = s / float(max(1, warmup))
        decay = torch.clamp((total - s) / float(max(1, total - warmup)), min=0.0)
        return peak * torch.where(s < warmup, warm, decay)

    return schedule


def linear_warmup_constant(peak_lr: float, warmup_steps: int) -> Schedule:
    """HF ``get_constant_schedule_with_warmup``::

    lr(s) = peak * s / warmup      for s < warmup
    lr(s) = peak                   otherwise
    """
    _check_lr("peak_lr", peak_lr)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")
    peak, warmup = float(peak_lr), int(warmup_steps)

    def schedule(step: Tensor) -> Tensor:
        s = _step_f64(step)
        return peak * torch.clamp(s / float(max(1, warmup)), max=1.0)

    return schedule


def cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0, final_lr: float = 0.0) -> Schedule:
    """Linear warmup then half-cosine decay from ``peak_lr`` to ``final_lr`` (HF
    ``get_cosine_schedule_with_warmup`` / ``get_cosine_with_min_lr_schedule_with_warmup``)::

        lr(s) = peak * s / warmup                                                  for s < warmup
        lr(s) = peak * (c (1 - r) + r),  c = (1 + cos(pi * p)) / 2,  r = final / peak,
                p = min(1, (s - warmup) / (total - warmup))                          otherwise

    Unlike HF, ``p`` is clamped at 1: past ``total_steps`` the lr stays at ``final_lr``.
    """
    _check_lr("peak_lr", peak_lr)
    _check_lr("final_lr", final_lr)
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps/total_steps: expected >= 0, got {warmup_steps}, {total_steps}")
    peak, final, warmup, total = float(peak_lr), float(final_lr), int(warmup_steps), int(total_steps)
    rate = final / peak if peak != 0 else 0.0

    def schedule(step: Tensor) -> Tensor:
        s = _step_f64(step)
        warm = s / float(max(1, warmup))
        progress = torch.clamp((s - warmup) / float(max(1, total - warmup)), max=1.0)
        c = 0.5 * (1.0 + torch.cos(math.pi * progress))
        decay = torch.clamp(c * (1 - rate) + rate, min=0.0)
        return peak * torch.where(s < warmup, warm, decay)

    return schedule
