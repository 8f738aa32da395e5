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

import fnmatch
from typing import Any, Callable, Sequence

from fnlm.tree import Params, combine, flatten_names, tree_map_with_name


def with_frozen(loss_fn: Callable[..., Any], frozen: Params) -> Callable[..., Any]:
    """``loss(trainable, batch, key) = loss_fn(combine(trainable, frozen), batch, key)``.

    ``frozen``: the part of :func:`fnlm.tree.partition` that is not trained.
    """

    def loss(trainable: Params, batch: Any, key: Any):
        return loss_fn(combine(trainable, frozen), batch, key)

    return loss


def freeze(params: Params, globs: str | Sequence[str]) -> Params:
    """A tree of bools with ``params``' structure, True for the leaves to freeze (``--freeze GLOBS``).

    ``globs``: comma-separated glob patterns (``'embeddings.*,encoder.layers.[0-3].*'``) or a list.
    A pattern selects a leaf when it matches (``fnmatch``; ``*`` crosses dots, ``[0-3]`` is one
    character) its dotted name or a tail of it after a dot (so ``embeddings.*`` also selects
    ``bert.embeddings.word.weight`` in a classifier's tree); ``name`` alone also means ``name.*``.
    Use the mask as a spec: ``frozen, trainable = fnlm.tree.partition(params, mask)``, then
    :func:`with_frozen`. A pattern that selects nothing, or freezing every leaf, is a ``ValueError``.
    """
    if isinstance(globs, str):
        patterns = [p.strip() for p in globs.split(",") if p.strip()]
    else:
        patterns = [str(p).strip() for p in globs]
    if not patterns:
        raise ValueError("freeze: no patterns given")
    names = list(flatten_names(params))

    def tails(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))]

    def hit(pattern: str, name: str) -> bool:
        return any(fnmatch.fnmatchcase(t, pattern) or fnmatch.fnmatchcase(t, pattern + ".*") for t in tails(name))

    for p in patterns:
        if not any(hit(p, n) for n in names):
            example = ", ".join(repr(n) for n in names[:3])
            raise ValueError(f"freeze: pattern {p!r} matches no parameter (names look like {example}, ...)")
    chosen = {n for n in names if any(hit(p, n) for p in patterns)}
    if len(chosen) == len(names):
        raise ValueError(f"freeze: {','.join(patterns)!r} freezes every parameter; nothing would be trained")
    return tree_map_with_name(lambda name, leaf: name in chosen, params)
