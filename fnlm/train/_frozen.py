"""Training part of a model: the loss of the trainable leaves, the frozen ones closed over.

Equinox's ``filter_grad`` as one wrapper around a loss::

    trainable, frozen = fnlm.tree.partition(params, ['classifier.*', '*.layers.5.*'])
    step = make_train_step(with_frozen(loss_fn, frozen), optimizer)
    opt_state = optimizer.init(trainable)              # state for the trainable leaves only
    trainable, opt_state, metrics = step(trainable, opt_state, batch, key)
    params = fnlm.tree.combine(trainable, frozen)

``torch.func.grad`` differentiates only the step's first argument, so the frozen tensors are
constants of the graph: no weight gradient is computed for them (their matrix products still
back-propagate to the inputs where a trainable leaf lies below), and the optimizer never sees them.
"""
from __future__ import annotations

from typing import Any, Callable

from fnlm.tree import Params, combine


def with_frozen(loss_fn: Callable[..., Any], frozen: Params) -> Callable[..., Any]:
    """``loss(trainable, batch, key) = loss_fn(combine(trainable, frozen), batch, key)``.

    ``frozen``: the part of :func:`fnlm.tree.partition` that is not trained.
    """

    def loss(trainable: Params, batch: Any, key: Any):
        return loss_fn(combine(trainable, frozen), batch, key)

    return loss
