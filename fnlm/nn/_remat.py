"""Rematerialisation (``jax.checkpoint``'s role): run a block without keeping its activations and
recompute them in the backward pass, trading compute for memory.

``remat(f)(*args)`` computes ``f(*args)`` and saves only the tensors in ``args`` (and, with
``policy='matmuls'``, the results of the matrix products); the backward pass runs ``f`` again from
them and differentiates that run. Randomness comes from explicit keys, so the recomputation
draws the same dropout masks: the gradients are those of ``f`` itself.

Why not ``torch.utils.checkpoint``: it keeps activations out of the autograd graph with saved-tensor
hooks, which ``torch.func.grad`` refuses ("don't yet support saved tensor hooks"), eagerly and
under ``torch.compile``. Here a ``torch.autograd.Function`` saves the block's inputs and its
backward is ``torch.func.vjp`` of a fresh run; it works under ``grad``/``grad_and_value`` eagerly
and inside the compiled whole step (dynamo traces the function's backward). Differentiating twice
through a remat block (grad of grad) is not supported: the backward detaches its inputs so that the
recomputation is not kept alive by the outer transform.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.func import vjp
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

POLICIES = ("nothing", "matmuls")
_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.baddbmm.default,
}


class _SaveMatmuls(TorchDispatchMode):
    """Record the results of matrix products (forward), or hand them back (recompute), matched by
    operator and argument shapes in call order (a product the recomputation makes differently,
    e.g. attention that takes another kernel under autograd, is simply computed)."""

    def __init__(self, saved: dict | None = None):
        super().__init__()
        self.replay = saved is not None
        self.saved = {} if saved is None else {k: list(v) for k, v in saved.items()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _MATMULS:
            return func(*args, **(kwargs or {}))
        sig = (func, tuple(tuple(a.shape) if isinstance(a, Tensor) else a for a in args))
        if self.replay:
            queue = self.saved.get(sig)
            return queue.pop(0) if queue else func(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        self.saved.setdefault(sig, []).append(out)
        return out


class _Store:
    """The matrix products of one call (a plain object: functorch rebuilds list arguments)."""

    def __init__(self):
        self.tensors: dict = {}


class _Remat(torch.autograd.Function):
    """``apply(body, store, *tensors) = body(*tensors)``; backward re-runs ``body``. ``store``: a
    :class:`_Store` that receives the matrix products (policy 'matmuls'), or None."""

    @staticmethod
    def forward(*args):
        if isinstance(args[0], torch.autograd.function.FunctionCtx):  # dynamo passes ctx as well
            args = args[1:]
        body, store, *tensors = args
        if store is None:
            return body(*tensors)
        with _SaveMatmuls() as mode:  # sees the unwrapped tensors, below every functorch level
            out = body(*tensors)
        store.tensors = mode.saved
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        body, store, *tensors = inputs
        ctx.body, ctx.store = body, store
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx, grad_out):
        tensors = [t.detach() for t in ctx.saved_tensors]
        grad_out = grad_out.detach()
        if torch.compiler.is_compiling():
            tensors = _after(tensors, grad_out)
        wrt = [i for i, t in enumerate(tensors) if t.is_floating_point()]

        def rerun(*floats):
            args = list(tensors)
            for i, t in zip(wrt, floats):
                args[i] = t
            if ctx.store is not None:
                with _SaveMatmuls(ctx.store.tensors):
                    return ctx.body(*args)
            return ctx.body(*args)

        _, pullback = vjp(rerun, *[tensors[i] for i in wrt])
        grads = pullback(grad_out)
        out: list[Tensor | None] = [None] * len(tensors)
        for i, g in zip(wrt, grads):
            out[i] = g
        return None, None, *out


def _after(tensors: list[Tensor], grad_out: Tensor) -> list[Tensor]:
    """``t + 0`` for every float/int tensor, where the 0 is computed from the incoming gradient.

    Inside one compiled graph the recomputation is the same operations as the forward pass on the
    same values; a data dependency on ``grad_out`` makes sure the compiler can neither merge them
    (common-subexpression elimination would keep the forward's activations alive) nor run the
    recomputation before the backward pass (jax.checkpoint's ``optimization_barrier``). A guard:
    in the traced graph of a 4-block MLP, 3 of the 4 blocks were recomputed with and without it.
    The 0 is exactly 0 even when the gradient is not finite.
    """
    g = grad_out.reshape(-1)[:1].sum()
    zero = torch.where(torch.isfinite(g), g * 0, torch.zeros_like(g))
    out = []
    for t in tensors:
        if t.is_floating_point():
            t = t + zero.to(t.dtype)
        elif t.dtype in (torch.int32, torch.int64, torch.uint8, torch.int16, torch.int8):
            t = t + zero.to(t.dtype)
        out.append(t)
    return out


def remat(f: Callable[..., Tensor], policy: str = "nothing") -> Callable[..., Tensor]:
    """``f`` with its activations recomputed in the backward pass (``jax.checkpoint``).

    ``f(*args, **kwargs) -> Tensor``; tensors anywhere in ``args``/``kwargs`` (params trees,
    inputs, masks, dropout keys) are saved, everything else (configs, flags) is static.
    ``policy``: ``'nothing'`` saves no intermediate (recompute all of ``f``: least memory);
    ``'matmuls'`` saves the results of matrix products and recomputes the rest (norms,
    activations, softmax, dropout), in eager mode; under ``torch.compile`` only ``'nothing'`` is
    supported (dynamo does not trace the dispatch mode that records the products).
    """
    if policy not in POLICIES:
        raise ValueError(f"remat policy must be one of {POLICIES}, got {policy!r}")

    def wrapped(*args: Any, **kwargs: Any) -> Tensor:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        where = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        if policy == "matmuls" and torch.compiler.is_compiling():
            raise NotImplementedError(
                "remat(policy='matmuls') runs eagerly only; use policy='nothing' inside torch.compile"
            )

        def body(*tensors: Tensor) -> Tensor:
            full = list(leaves)
            for i, t in zip(where, tensors):
                full[i] = t
            a, kw = pytree.tree_unflatten(full, spec)
            out = f(*a, **kw)
            if not isinstance(out, Tensor):
                raise TypeError(f"remat: the block must return one tensor, got {type(out).__name__}")
            return out

        store = _Store() if policy == "matmuls" else None
        return _Remat.apply(body, store, *[leaves[i] for i in where])

    return wrapped


def layer_policies(remat_spec: str | Sequence[str | None] | None, n_layers: int) -> list[str | None]:
    """A stack's per-layer switch: ``None`` (no remat), one policy for every layer, or one entry per
    layer (``None`` or a policy), e.g. ``['nothing'] * 6 + [None] * 6``."""
    if remat_spec is None or isinstance(remat_spec, str):
        if remat_spec is not None and remat_spec not in POLICIES:
            raise ValueError(f"remat must be None, one of {POLICIES} or a list of those per layer, got {remat_spec!r}")
        return [remat_spec] * n_layers
    out = list(remat_spec)
    if len(out) != n_layers or any(p is not None and p not in POLICIES for p in out):
        raise ValueError(
            f"remat per layer must list {n_layers} entries, each None or one of {POLICIES}, got {remat_spec!r}"
        )
    return out
