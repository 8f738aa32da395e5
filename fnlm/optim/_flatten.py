"""``flatten(inner)``: run an optimizer on a few long vectors instead of one tensor per leaf (optax's
``flatten``).

The update is the same arithmetic; only its layout changes::

    g_vec = concat(vec(g_i))           one vector per group (default: weights / the rest)
    u_vec, s' = inner.update(g_vec, s, p_vec)
    u_i   = the slice of u_vec that belongs to leaf i, reshaped (a view)

Why: inside a compiled step, AdamW over 105 separate tensors is 105 copies of the same small
kernel chain that the compiler schedules and fuses one by one; over two vectors it is two. The
MiniLM step's cold compile on a 2-core CPU got shorter (``benchmarks/train_step.py``
``compiled-flat``, empty Inductor cache; figures in ``docs/benchmarks.md``). The price is a concatenation of the gradients (and, for weight decay, the
parameters) at every step, which lowered the step's throughput there, so it pays for short runs
only. The optimizer state holds the vectors (``mu``/``nu`` as ``{'weight': [n_w], 'other': [n_o]}``).

Groups are by the leaf's last name component, so that masks keep their meaning: the leaves named
``weight`` go to the vector ``'weight'`` and everything else to ``'other'``, which is exactly what
:func:`~fnlm.optim.default_decay_mask` decays when it sees the vectors. A mask that selects by
other names needs its own ``group`` function that puts what it selects into a vector of a name it
selects. Every leaf of one vector must share dtype and device (:func:`fnlm.tree.ravel`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from fnlm.optim._transforms import GradientTransformation
from fnlm.tree import PyTree, ravel


def decay_groups(name: str) -> str:
    """``'weight'`` for leaves named ``weight`` (decayed by the default mask), ``'other'`` else."""
    return "weight" if name.rsplit(".", 1)[-1] == "weight" else "other"


class FlattenState(NamedTuple):
    """The inner transformation's state, over the vectors."""

    inner: Any


def flatten(inner: GradientTransformation, group: Callable[[str], str] = decay_groups) -> GradientTransformation:
    """``inner`` applied to the gradients concatenated into one vector per ``group`` label; the
    updates come back as a tree of views (see the module docstring). The results equal ``inner``'s
    on the tree up to the summation order of reductions (e.g. the global norm)."""
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"flatten: expected a GradientTransformation, got {type(inner).__name__}")

    def init(params: PyTree) -> FlattenState:
        vectors, _ = ravel(params, group)
        return FlattenState(inner.init(vectors))

    def update(grads: PyTree, state: FlattenState, params: PyTree | None = None) -> tuple[PyTree, FlattenState]:
        g, unravel = ravel(grads, group)
        p = None if params is None else ravel(params, group)[0]
        u, s = inner.update(g, state.inner, p)
        return unravel(u), FlattenState(s)

    return GradientTransformation(init, update)
