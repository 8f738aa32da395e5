"""Dynamic loss scaling for float16 training (Micikevicius et al. 2018), as a pure transformation.

float16 gradients underflow to 0 below ~6e-8, so the loss is multiplied by a scale ``S`` before
the backward pass and the gradients divided by ``S`` afterwards. ``S`` adapts, as
``torch.amp.GradScaler`` does::

    g = g_scaled / S
    ok = every g finite
    (ok)      u, s' = inner.update(g, s, params);   k' = k + 1;   S' = S * growth if k' = interval (k' = 0)
    (not ok)  u = 0, s' = s  (the step is skipped);  k' = 0;       S' = S * backoff

:func:`dynamic_loss_scale` wraps any optimizer; its state holds ``loss_scale`` and
:func:`fnlm.train.make_train_step` finds it there (:func:`find_loss_scale`) and differentiates
``loss * S`` instead of ``loss``; without such a state the step is unchanged. Branch-free
(``torch.where``), so it compiles into the step's graph and works under ``vmap``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fnlm.optim._transforms import GradientTransformation
from fnlm.tree import PyTree, flatten_names, tree_leaves, tree_map


class LossScaleState(NamedTuple):
    loss_scale: Tensor  # float32 [], the scale S the next step's loss is multiplied by
    good_steps: Tensor  # int64 [], finite steps since the scale last changed
    inner: Any  # the wrapped optimizer's state


def dynamic_loss_scale(
    inner: GradientTransformation,
    *,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> GradientTransformation:
    """Wrap ``inner`` with dynamic loss scaling (see the module docstring); the defaults are
    ``torch.amp.GradScaler``'s. ``update`` expects the gradients of ``loss * state.loss_scale``."""
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"dynamic_loss_scale: inner must be a GradientTransformation, got {type(inner).__name__}")
    if not (init_scale > 0 and math.isfinite(init_scale)):
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
    if not growth_factor > 1.0:
        raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
    if not isinstance(growth_interval, int) or growth_interval < 1:
        raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")

    def init(params: PyTree) -> LossScaleState:
        dev = tree_leaves(params)[0].device if tree_leaves(params) else None
        return LossScaleState(
            torch.tensor(float(init_scale), dtype=torch.float32, device=dev),
            torch.zeros((), dtype=torch.int64, device=dev),
            inner.init(params),
        )

    def update(grads: PyTree, state: LossScaleState, params: PyTree | None = None):
        s = state.loss_scale
        grads = tree_map(lambda g: (g.float() / s).to(g.dtype), grads)  # unscaled in float32
        leaves = tree_leaves(grads)
        ok = torch.stack([torch.isfinite(g).all() for g in leaves]).all() if leaves else torch.tensor(True)
        safe = tree_map(lambda g: torch.where(ok, g, torch.zeros_like(g)), grads)
        updates, new_inner = inner.update(safe, state.inner, params)
        updates = tree_map(lambda u: torch.where(ok, u, torch.zeros_like(u)), updates)
        new_inner = tree_map(lambda n, o: torch.where(ok, n, o) if isinstance(n, Tensor) else n, new_inner, state.inner)
        good = torch.where(ok, state.good_steps + 1, torch.zeros_like(state.good_steps))
        grow = good >= growth_interval
        new_s = torch.where(ok, torch.where(grow, s * growth_factor, s), s * backoff_factor)
        good = torch.where(grow, torch.zeros_like(good), good)
        return updates, LossScaleState(new_s, good, new_inner)

    return GradientTransformation(init, update)


def find_loss_scale(opt_state: PyTree) -> Tensor | None:
    """The ``loss_scale`` leaf of a :func:`dynamic_loss_scale` state (possibly nested), or ``None``."""
    for name, leaf in flatten_names(opt_state).items():
        if name.rsplit(".", 1)[-1] == "loss_scale" and isinstance(leaf, Tensor):
            return leaf
    return None
