"""Different transformations for different leaves of one tree (optax's ``multi_transform``,
``masked`` and ``set_to_zero``), for users who keep one parameter tree instead of splitting it
with :func:`fnlm.tree.partition`.

Each label's transformation sees only its own leaves, as a tree with the same dotted names
(:func:`fnlm.tree.partition`), so its state exists only for them: ``set_to_zero()`` for the
frozen label keeps no state at all.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, NamedTuple, Union

import torch

from fnlm.optim._transforms import EmptyState, GradientTransformation, identity
from fnlm.tree import PyTree, flatten_names, tree_flatten, tree_map, tree_unflatten, unflatten_names

Labels = Union[PyTree, Callable[[PyTree], PyTree]]


class MultiTransformState(NamedTuple):
    inner_states: dict  # label -> state of that label's transformation


def set_to_zero() -> GradientTransformation:
    """``u = 0``: the leaves it is applied to do not move (optax's ``set_to_zero``)."""

    def update(grads, state, params=None):
        return tree_map(torch.zeros_like, grads), state

    return GradientTransformation(lambda params: EmptyState(), update)


def _labels_by_name(labels: Labels, params: PyTree, transforms: Mapping) -> dict[str, Hashable]:
    tree = labels(params) if callable(labels) else labels
    p_names = list(flatten_names(params))
    l_flat = flatten_names(tree)
    if list(l_flat) != p_names:
        missing = [n for n in p_names if n not in l_flat][:3]
        raise ValueError(
            "multi_transform: labels must have the structure of params"
            + (f"; no label for {missing}" if missing else "")
        )
    unknown = sorted({repr(v) for v in l_flat.values() if v not in transforms})
    if unknown:
        raise ValueError(
            f"multi_transform: labels {', '.join(unknown)} have no transformation "
            f"(transforms has {sorted(map(repr, transforms))})"
        )
    return l_flat


def _split(tree: PyTree, labels: dict[str, Hashable], label: Hashable) -> PyTree:
    part = {n: x for n, x in flatten_names(tree).items() if labels[n] == label}
    return unflatten_names(part) if part else {}


def multi_transform(transforms: Mapping[Hashable, GradientTransformation], labels: Labels) -> GradientTransformation:
    """Apply ``transforms[label]`` to the leaves labelled ``label`` (optax's ``multi_transform``).

    ``labels``: a tree with the structure of params whose leaves are labels (keys of
    ``transforms``), or a function ``params -> such a tree``, e.g.
    ``lambda p: fnlm.tree.tree_map_with_name(lambda n, _: 'head' if n.startswith('classifier') else 'body', p)``.
    Every label's transformation gets the sub-tree of its leaves, with their dotted names.
    """
    for k, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"multi_transform: transforms[{k!r}] must be a GradientTransformation, got {type(t).__name__}"
            )

    def init(params: PyTree) -> MultiTransformState:
        lab = _labels_by_name(labels, params, transforms)
        return MultiTransformState({k: t.init(_split(params, lab, k)) for k, t in transforms.items()})

    def update(grads: PyTree, state: MultiTransformState, params: PyTree | None = None):
        lab = _labels_by_name(labels, grads if params is None else params, transforms)
        flat: dict[str, Any] = {}
        new_states = {}
        for k, t in transforms.items():
            sub_params = None if params is None else _split(params, lab, k)
            u, new_states[k] = t.update(_split(grads, lab, k), state.inner_states[k], sub_params)
            flat.update(flatten_names(u))
        leaves, spec = tree_flatten(grads)
        return tree_unflatten([flat[n] for n in flatten_names(grads)], spec), MultiTransformState(new_states)

    return GradientTransformation(init, update)


def masked(inner: GradientTransformation, mask: Labels) -> GradientTransformation:
    """``inner`` on the leaves where ``mask`` is True; the others' gradients pass through
    unchanged (optax's ``masked``). ``mask``: a tree of bools or ``params -> tree of bools``
    (e.g. ``lambda p: fnlm.tree.mask(p, '*.attn.*')``)."""
    return multi_transform({True: inner, False: identity()}, mask)
