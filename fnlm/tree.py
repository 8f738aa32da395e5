"""Parameter pytrees: nested dicts / lists / tuples whose leaves are tensors.

One mechanism everywhere: ``torch.utils._pytree``, the same registry that ``torch.func``
(grad, vmap) and ``torch.compile`` use, so a tree that works here works under every transform.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

PyTree = Any
#: A layer's or a model's parameters: a (nested) dict whose leaves are tensors.
Params = dict[str, Any]

tree_map = pytree.tree_map  # tree_map(f, tree, *more_trees_of_the_same_structure)
tree_leaves = pytree.tree_leaves
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_structure = pytree.tree_structure


def num_params(tree: PyTree) -> int:
    """Total number of scalars in all tensor leaves."""
    return sum(x.numel() for x in tree_leaves(tree) if isinstance(x, Tensor))


def cast(tree: PyTree, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> PyTree:
    """Move every tensor to ``device`` and cast *floating-point* tensors to ``dtype``.

    Integer leaves (step counters, keys) keep their dtype: casting them to bf16 would be a bug.
    """

    def f(x):
        if not isinstance(x, Tensor):
            return x
        dt = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
        return x.to(device=device if device is not None else x.device, dtype=dt)

    return tree_map(f, tree)


def _key_str(k: Any) -> str:
    # pytree path entries: MappingKey(key=...), SequenceKey(idx=...), GetAttrKey(name=...)
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten_names(tree: PyTree, sep: str = ".") -> dict[str, Any]:
    """``{'encoder': {'layers': [{'attn': ...}]}}`` -> ``{'encoder.layers.0.attn...': leaf}``."""
    flat, _ = pytree.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for path, leaf in flat:
        name = sep.join(_key_str(k) for k in path)
        out[name] = leaf
    return out


def unflatten_names(flat: dict[str, Any], sep: str = ".") -> PyTree:
    """Inverse of :func:`flatten_names`. A level whose keys are exactly ``0..n-1`` becomes a list."""
    root: dict = {}
    for name, leaf in flat.items():
        node = root
        *parents, last = name.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"name {name!r} conflicts with a leaf at {p!r}")
        if last in node:
            raise ValueError(f"duplicate name {name!r}")
        node[last] = leaf

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        keys = list(node)
        if keys and all(k.isdigit() for k in keys) and sorted(int(k) for k in keys) == list(range(len(keys))):
            return [node[str(i)] for i in range(len(keys))]
        return node

    return listify(root)


def tree_stack(trees: list[PyTree]) -> PyTree:
    """Stack N trees of equal structure along a new leading axis (for ``vmap`` ensembles)."""
    return tree_map(lambda *xs: torch.stack(xs), *trees)


def tree_unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`tree_stack`."""
    leaves, spec = tree_flatten(tree)
    n = leaves[0].shape[0]
    return [tree_unflatten([x[i] for x in leaves], spec) for i in range(n)]


def tree_zeros_like(tree: PyTree) -> PyTree:
    return tree_map(torch.zeros_like, tree)


def tree_allclose(a: PyTree, b: PyTree, **kw) -> bool:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and all(torch.allclose(x, y, **kw) for x, y in zip(la, lb))


def tree_map_with_name(f: Callable[[str, Any], Any], tree: PyTree, sep: str = ".") -> PyTree:
    """``tree_map`` whose function also receives each leaf's dotted name (for masks, e.g. weight decay)."""
    flat, spec = pytree.tree_flatten_with_path(tree)
    return tree_unflatten([f(sep.join(_key_str(k) for k in path), leaf) for path, leaf in flat], spec)


def ravel(
    tree: PyTree, group: Callable[[str], str] | None = None
) -> tuple[dict[str, Tensor], Callable[[dict[str, Tensor]], PyTree]]:
    """``v_g = concat(vec(x_i) for leaves i labelled g)``: ``(vectors, unravel)`` with one 1-D vector
    per label, as ``jax.flatten_util.ravel_pytree`` with groups.

    ``group(name) -> label`` (default: every leaf in ``'all'``) sorts the leaves by dotted name;
    the leaves of one label must share dtype and device. ``unravel(vectors)`` gives a tree of
    ``tree``'s structure whose leaves are *views* of the vectors (no copy), so a function of the
    tree is a function of the vectors, and its gradient is a handful of vectors instead of one
    tensor per leaf. ``ravel`` itself copies once (``cat``). :func:`fnlm.optim.flatten` runs an
    optimizer in this layout.
    """
    flat, spec = pytree.tree_flatten_with_path(tree)
    if not flat:
        raise ValueError("ravel: the tree has no leaves")
    labels, shapes = [], []
    members: dict[str, list[Tensor]] = {}
    for path, leaf in flat:
        name = ".".join(_key_str(k) for k in path)
        if not isinstance(leaf, Tensor):
            raise TypeError(f"ravel: leaf {name!r} is a {type(leaf).__name__}, not a tensor")
        label = "all" if group is None else group(name)
        first = members.setdefault(label, [leaf])[0]
        if first is not leaf:
            if (leaf.dtype, leaf.device) != (first.dtype, first.device):
                raise ValueError(
                    f"ravel: group {label!r} mixes {first.dtype} on {first.device} and {leaf.dtype} on "
                    f"{leaf.device} (leaf {name!r}); give them different labels"
                )
            members[label].append(leaf)
        labels.append(label)
        shapes.append(leaf.shape)
    vectors = {g: torch.cat([x.reshape(-1) for x in xs]) for g, xs in members.items()}
    sizes = {g: [x.numel() for x in xs] for g, xs in members.items()}

    def unravel(vecs: dict[str, Tensor]) -> PyTree:
        if set(vecs) != set(sizes):
            raise ValueError(f"unravel: expected vectors {sorted(sizes)}, got {sorted(vecs)}")
        parts = {}
        for g, v in vecs.items():
            if v.shape != (sum(sizes[g]),):
                raise ValueError(f"unravel: vector {g!r} has shape {tuple(v.shape)}, expected ({sum(sizes[g])},)")
            parts[g] = iter(torch.split(v, sizes[g]))
        return tree_unflatten([next(parts[g]).view(shape) for g, shape in zip(labels, shapes)], spec)

    return vectors, unravel


# ----------------------------------------------------------------------------- selecting leaves
#: What selects leaves by name: a glob pattern over dotted names (``fnmatch``: ``*`` matches any
#: run of characters, dots included, so ``'*.attn.q.*'`` matches every layer's query projection),
#: a sequence of such patterns (a leaf is selected if any matches), or a predicate
#: ``(name, leaf) -> bool``, or a tree of bools with the params' structure (:func:`mask`'s output).
Spec = Any


def _spec_predicate(spec: Spec, names: list[str], what: str) -> Callable[[str, Any], bool]:
    if callable(spec):
        return spec
    if isinstance(spec, Mapping):  # a mask tree of bools (mask(), fnlm.train.freeze())
        flat = flatten_names(spec)
        if set(flat) != set(names) or not all(isinstance(v, bool) for v in flat.values()):
            raise ValueError(f"{what}: a mask must be a tree of bools with the same leaves as the params")
        return lambda name, leaf: flat[name]
    patterns = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{what}: expected a glob pattern, a list of patterns or a predicate (name, leaf) -> bool, got {spec!r}"
        )
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            example = ", ".join(repr(n) for n in names[:3])
            raise ValueError(f"{what}: pattern {p!r} matches no leaf (names look like {example}, ...)")
    return lambda name, leaf: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def mask(tree: PyTree, spec: Spec) -> PyTree:
    """A tree of Python bools with ``tree``'s structure: True where ``spec`` selects the leaf.

    ``spec``: a glob pattern over the dotted names of :func:`flatten_names` (``fnmatch``, ``*``
    crosses dots: ``'classifier.*'``, ``'*.attn.[qv].weight'``), a list of patterns (any may
    match), or a predicate ``(name, leaf) -> bool``. A pattern that matches no leaf is an error.
    """
    names = list(flatten_names(tree))
    pred = _spec_predicate(spec, names, "mask")
    return tree_map_with_name(lambda name, leaf: bool(pred(name, leaf)), tree)


def partition(tree: PyTree, spec: Spec) -> tuple[Params, Params]:
    """``(selected, rest)``: the leaves that ``spec`` selects and the others, as two trees that
    keep the leaves' dotted names (Equinox's ``partition``). ``spec`` as in :func:`mask`.

    Each part holds only its own leaves (a list with gaps becomes a dict keyed ``'0'``, ``'3'``,
    ..., so names do not change); :func:`combine` puts them back together. Typical use: freeze
    everything but the head, ``trainable, frozen = partition(params, 'classifier.*')``.
    """
    names = list(flatten_names(tree))
    pred = _spec_predicate(spec, names, "partition")
    selected: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, leaf in flatten_names(tree).items():
        (selected if pred(name, leaf) else rest)[name] = leaf
    return unflatten_names(selected) if selected else {}, unflatten_names(rest) if rest else {}


def combine(*parts: PyTree) -> Params:
    """The inverse of :func:`partition`: one tree holding every leaf of ``parts`` (a leaf's name
    must appear in exactly one part)."""
    flat: dict[str, Any] = {}
    for part in parts:
        for name, leaf in flatten_names(part).items():
            if name in flat:
                raise ValueError(f"combine: {name!r} is in more than one part")
            flat[name] = leaf
    return unflatten_names(flat)
