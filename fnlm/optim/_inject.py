"""Hyper-parameters held in the optimizer state (optax's ``inject_hyperparams``).

::

    opt = inject_hyperparams(adamw)(lr=linear_warmup_linear_decay(1e-4, 100, 1000), weight_decay=0.01)
    state = opt.init(params)           # state.hyperparams["lr"]: the lr of the next update
    updates, state = opt.update(grads, state, params)
    state.hyperparams["lr"]            # the lr this update used: lr_t = schedule(t)

The state is the one place the current learning rate lives: the training step reports
``metrics["lr"]`` from it (no second copy of the schedule), and since it is a tensor in the
state, it can also be set by hand (a float ``lr`` is stored once and then read from the state:
overwrite ``state.hyperparams["lr"]`` to change it, or give each member of a ``vmap``-ped
ensemble its own).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from fnlm.optim._schedules import _check_lr
from fnlm.optim._transforms import GradientTransformation, _zero_count
from fnlm.tree import PyTree, flatten_names


class InjectHyperparamsState(NamedTuple):
    count: Tensor  # int64 [], number of updates done
    hyperparams: dict[str, Tensor]  # float64 [] each: the values the last update used (at init: the first's)
    inner_state: Any  # the wrapped optimizer's state


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], injected: tuple[str, ...] = ("lr",)
) -> Callable[..., GradientTransformation]:
    """``inject_hyperparams(adamw)(lr=..., **rest)``: ``factory`` with the hyper-parameters named in
    ``injected`` kept in the state, ``h_t = schedule(t)`` for a schedule, the stored tensor for a
    number. The updates are those of ``factory(lr=schedule, **rest)`` exactly (same arithmetic)."""

    def make(**kwargs: Any) -> GradientTransformation:
        missing = [n for n in injected if n not in kwargs]
        if missing:
            raise TypeError(f"inject_hyperparams({getattr(factory, '__name__', factory)}): pass {missing} by keyword")
        for n in injected:
            _check_lr(n, kwargs[n])
        schedules = {n: kwargs[n] for n in injected if callable(kwargs[n])}
        static = {k: v for k, v in kwargs.items() if k not in injected}

        def values(count: Tensor, stored: dict[str, Tensor] | None) -> dict[str, Tensor]:
            out = {}
            for n in injected:
                if n in schedules:
                    out[n] = schedules[n](count).to(torch.float64)
                elif stored is not None:
                    out[n] = stored[n]
                else:
                    out[n] = torch.tensor(float(kwargs[n]), dtype=torch.float64, device=count.device)
            return out

        def inner(hp: dict[str, Tensor]) -> GradientTransformation:
            # each injected value enters the factory as a schedule that returns it
            return factory(**static, **{n: (lambda _count, v=hp[n]: v) for n in injected})

        def init(params: PyTree) -> InjectHyperparamsState:
            count = _zero_count(params)
            hp = values(count, None)
            return InjectHyperparamsState(count, hp, inner(hp).init(params))

        def update(grads: PyTree, state: InjectHyperparamsState, params: PyTree | None = None):
            hp = values(state.count, state.hyperparams)
            updates, inner_state = inner(hp).update(grads, state.inner_state, params)
            return updates, InjectHyperparamsState(state.count + 1, hp, inner_state)

        return GradientTransformation(init, update)

    return make


def find_hyperparam(opt_state: PyTree, name: str = "lr") -> Tensor | None:
    """The value of an injected hyper-parameter in an optimizer state (the first one found,
    e.g. inside :func:`~fnlm.optim.chain`), or ``None`` when nothing was injected."""
    suffix = f"hyperparams.{name}"
    for path, leaf in flatten_names(opt_state).items():
        if path == suffix or path.endswith("." + suffix):
            return leaf
    return None
