"""Optax-style functional optimizers over parameter pytrees.

An optimizer is a :class:`GradientTransformation`, a pair of pure functions::

    opt = chain(clip_by_global_norm(1.0), adamw(linear_warmup_linear_decay(3e-4, 100, 1000)))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = apply_updates(params, updates)          # p + u

Conventions (they are what lets a whole training step run under ``torch.compile(fullgraph=True)``
without recompiling, and under ``torch.func.vmap`` for ensembles stacked with ``tree_stack``):

* every state leaf is a tensor, the step count included (an int64 0-dim tensor);
* nothing is mutated in place: ``update`` and ``apply_updates`` return new trees;
* a learning rate is a float or a *schedule*, a pure tensor function ``step -> lr`` (float64).
  The schedule is evaluated at the number of updates already done, so the first update uses
  ``schedule(0)``: the convention of ``torch.optim.lr_scheduler.LambdaLR`` (``scheduler.step()``
  after ``optimizer.step()``).

Numerics follow torch's single-tensor (``foreach=False``) optimizers operation by operation:
scalars (bias corrections, step sizes, ``1 - lr*wd``) are computed in float64 and rounded to the
parameter dtype only where torch rounds them, and the same fused kernels (``lerp``, ``addcmul``,
``add(alpha=)``) are used, so fnlm and ``torch.optim`` agree to a few ulps after many steps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import Tensor

from fnlm.optim._schedules import ScalarOrSchedule, Schedule, _check_lr
from fnlm.tree import PyTree, tree_flatten, tree_leaves, tree_map, tree_map_with_name, tree_unflatten

Mask = Union[PyTree, Callable[[PyTree], PyTree], None]


# --------------------------------------------------------------------------------------------
# Core types
# --------------------------------------------------------------------------------------------


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(grads, state, params=None) -> (updates, new_state)``."""

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


class ScaleByScheduleState(NamedTuple):
    count: Tensor  # int64 [], number of updates done


class SgdState(NamedTuple):
    count: Tensor  # int64 [], number of updates done
    momentum: PyTree  # momentum buffers (zeros tree; EmptyState() when momentum == 0)


class RmspropState(NamedTuple):
    count: Tensor  # int64 [], number of updates done
    nu: PyTree  # running mean of g^2 (torch's square_avg)
    mu: PyTree  # running mean of g (torch's grad_avg; EmptyState() unless centered)
    momentum: PyTree  # momentum buffers (EmptyState() when momentum == 0)


class AdamState(NamedTuple):
    count: Tensor  # int64 [], number of updates done
    mu: PyTree  # first moment m
    nu: PyTree  # second moment v


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``p_new = p + u`` for every leaf (new tensors; ``params`` is not modified).

    The update is cast to the parameter's dtype first, so bf16 params stay bf16.
    """
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def global_norm(tree: PyTree) -> Tensor:
    """``||g||_2`` over all leaves, as ``torch.nn.utils.clip_grad_norm_`` computes it:
    ``vector_norm(stack([vector_norm(g_i) for g_i in leaves]))``."""
    leaves = [x for x in tree_leaves(tree) if isinstance(x, Tensor)]
    if not leaves:
        raise ValueError("global_norm: expected a tree with at least one tensor leaf, got none")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in leaves]))


def _zero_count(params: PyTree) -> Tensor:
    leaves = [x for x in tree_leaves(params) if isinstance(x, Tensor)]
    device = leaves[0].device if leaves else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _lr_at(lr: ScalarOrSchedule, count: Tensor) -> float | Tensor:
    """The learning rate for the update that follows ``count`` updates (a float or a tensor)."""
    return lr(count) if callable(lr) else float(lr)


def _as_dtype(x: float | Tensor, like: Tensor) -> float | Tensor:
    """Round a (float64) scalar to ``like``'s dtype, as torch does when it uses a Python scalar."""
    return x.to(like.dtype) if isinstance(x, Tensor) else x


def _require_params(name: str, params: PyTree | None) -> PyTree:
    if params is None:
        raise ValueError(f"{name}.update: this transformation needs `params` (update(grads, state, params))")
    return params


def _check_float(name: str, value: float, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        rng = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name}: expected a value in {rng}, got {value}")


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def default_decay_mask(params: PyTree) -> PyTree:
    """A tree of bools: True only for leaves whose last name component is ``weight``.

    fnlm names linear/embedding matrices ``weight`` (decayed); biases ``bias`` and LayerNorm
    ``gamma``/``beta`` are not decayed.
    """
    return tree_map_with_name(lambda name, _: name.rsplit(".", 1)[-1] == "weight", params)


def _resolve_mask(mask: Mask, params: PyTree) -> PyTree:
    """A tree of Python bools with the structure of ``params`` (None = every leaf selected)."""
    p_leaves, p_spec = tree_flatten(params)
    if mask is None:
        return tree_unflatten([True] * len(p_leaves), p_spec)
    m = mask(params) if callable(mask) else mask
    m_leaves, m_spec = tree_flatten(m)
    if m_spec != p_spec:
        raise ValueError(f"mask: expected a tree with the structure of params {p_spec}, got {m_spec}")
    out = []
    for x in m_leaves:
        if isinstance(x, Tensor):
            raise TypeError("mask: leaves must be Python bools (masks are static, not tensors)")
        out.append(bool(x))
    return tree_unflatten(out, p_spec)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def identity() -> GradientTransformation:
    """``u = g``."""
    return GradientTransformation(lambda params: EmptyState(), lambda grads, state, params=None: (grads, state))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order: the updates of one are the gradients of the next.

    State is the tuple of the transforms' states.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain: argument {i} must be a GradientTransformation, got {type(t).__name__}")

    def init(params: PyTree) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(grads: PyTree, state: tuple, params: PyTree | None = None) -> tuple[PyTree, tuple]:
        if len(state) != len(transforms):
            raise ValueError(f"chain.update: expected a state of {len(transforms)} entries, got {len(state)}")
        new_states = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    return GradientTransformation(init, update)


def scale(factor: float) -> GradientTransformation:
    """``u = factor * g`` (e.g. ``scale(-lr)`` for plain gradient descent)."""

    def update(grads, state, params=None):
        return tree_map(lambda g: g * factor, grads), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """``u = schedule(t) * g`` with ``t`` the number of updates already done (first update: ``t=0``)."""
    if not callable(schedule):
        raise TypeError(f"scale_by_schedule: expected a callable step -> factor, got {type(schedule).__name__}")

    def init(params):
        return ScaleByScheduleState(_zero_count(params))

    def update(grads, state, params=None):
        s = schedule(state.count)
        return tree_map(lambda g: g * _as_dtype(s, g), grads), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float, mask: Mask = None) -> GradientTransformation:
    """``u = g + wd * p`` on masked leaves (coupled / L2 weight decay, optax style)."""
    _check_float("weight_decay", weight_decay, 0.0, math.inf)

    def update(grads, state, params=None):
        params = _require_params("add_decayed_weights", params)
        sel = _resolve_mask(mask, params)
        return tree_map(lambda g, p, m: torch.add(g, p, alpha=weight_decay) if m else g, grads, params, sel), state

    return GradientTransformation(lambda params: EmptyState(), update)


def add_l1(l1: float, mask: Mask = None) -> GradientTransformation:
    """``u = g + l1 * sign(p)`` on masked leaves: the (sub)gradient of ``l1 * sum_i |p_i|`` (L1
    regularisation, sign(0) = 0 as autograd's ``abs``), added to the loss gradient like
    :func:`add_decayed_weights` adds the L2 term. Chain it before the optimizer."""
    _check_float("l1", l1, 0.0, math.inf)

    def update(grads, state, params=None):
        params = _require_params("add_l1", params)
        sel = _resolve_mask(mask, params)
        return tree_map(lambda g, p, m: torch.add(g, torch.sign(p), alpha=l1) if m else g, grads, params, sel), state

    return GradientTransformation(lambda params: EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """``g <- g * min(1, max_norm / (||g||_2 + 1e-6))``, exactly ``torch.nn.utils.clip_grad_norm_``.

    ``max_norm`` 0 or ``inf`` means no clipping (the identity), as ``transformers``' ``max_grad_norm=0``.
    Branch-free (a ``clamp``, no Python ``if``), so it compiles; under ``vmap`` each ensemble
    member is clipped by its own norm.
    """
    _check_float("max_norm", max_norm, 0.0, math.inf)
    max_norm = float(max_norm)
    if max_norm == 0.0 or math.isinf(max_norm):
        return identity()

    def update(grads, state, params=None):
        coef = torch.clamp(max_norm / (global_norm(grads) + 1e-6), max=1.0)
        return tree_map(lambda g: g * coef.to(g.dtype), grads), state

    return GradientTransformation(lambda params: EmptyState(), update)


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Stochastic gradient descent as ``torch.optim.SGD`` (dampening 0)::

        g   <- g + wd * p                    (coupled weight decay, if wd != 0)
        buf <- momentum * buf + g            (buf starts at 0, so after step 1 buf = g, as torch)
        g   <- g + momentum * buf  if nesterov  else  buf
        u    = -lr * g

    torch applies the last line as ``p.add_(g, alpha=-lr)``, a fused multiply-add (one rounding);
    ``p + u`` rounds twice, so fnlm's SGD agrees with torch to about an ulp per step (a few 1e-7
    relative after 50 steps), while Adam/AdamW agree bit for bit or nearly.
    """
    _check_lr("lr", lr)
    _check_float("momentum", momentum, 0.0, math.inf)
    _check_float("weight_decay", weight_decay, 0.0, math.inf)
    if nesterov and momentum <= 0:
        raise ValueError(f"nesterov: requires momentum > 0, got momentum={momentum}")
    use_momentum = momentum != 0

    def init(params: PyTree) -> SgdState:
        buf = tree_map(torch.zeros_like, params) if use_momentum else EmptyState()
        return SgdState(_zero_count(params), buf)

    def update(grads: PyTree, state: SgdState, params: PyTree | None = None) -> tuple[PyTree, SgdState]:
        if weight_decay != 0:
            params = _require_params("sgd", params)
            grads = tree_map(lambda g, p: torch.add(g, p, alpha=weight_decay), grads, params)
        new_buf = state.momentum
        if use_momentum:
            # zeros * momentum + g == g exactly: the first step reproduces torch's buf = g.clone()
            new_buf = tree_map(lambda b, g: b * momentum + g, state.momentum, grads)
            if nesterov:
                grads = tree_map(lambda g, b: torch.add(g, b, alpha=momentum), grads, new_buf)
            else:
                grads = new_buf
        lr_t = _lr_at(lr, state.count)
        updates = tree_map(lambda g: g * _as_dtype(-lr_t, g), grads)
        return updates, SgdState(state.count + 1, new_buf)

    return GradientTransformation(init, update)


def rmsprop(
    lr: ScalarOrSchedule,
    alpha: float = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    centered: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """RMSProp as ``torch.optim.RMSprop`` (``foreach=False``)::

        g   <- g + wd * p                                  (coupled weight decay, if wd != 0)
        v   <- alpha v + (1 - alpha) g^2                   (v starts at 0)
        m   <- alpha m + (1 - alpha) g                     (centered only; torch.lerp)
        d    = sqrt(v - m^2) + eps   if centered  else  sqrt(v) + eps
        buf <- momentum buf + g / d ;  u = -lr * buf       (momentum > 0)
        u    = -lr * g / d                                 (momentum == 0)

    No bias correction (unlike Adam). As with :func:`sgd`, torch fuses the last step into the
    parameter (``addcdiv_``/``add_(alpha=)``) while ``p + u`` rounds twice: about an ulp per step.
    """
    _check_lr("lr", lr)
    _check_float("alpha", alpha, 0.0, 1.0)
    _check_float("eps", eps, 0.0, math.inf)
    _check_float("momentum", momentum, 0.0, math.inf)
    _check_float("weight_decay", weight_decay, 0.0, math.inf)
    use_momentum = momentum > 0

    def init(params: PyTree) -> RmspropState:
        zeros = lambda: tree_map(torch.zeros_like, params)  # noqa: E731
        return RmspropState(
            _zero_count(params),
            zeros(),
            zeros() if centered else EmptyState(),
            zeros() if use_momentum else EmptyState(),
        )

    def update(grads: PyTree, state: RmspropState, params: PyTree | None = None) -> tuple[PyTree, RmspropState]:
        if weight_decay != 0:
            params = _require_params("rmsprop", params)
            grads = tree_map(lambda g, p: torch.add(g, p, alpha=weight_decay), grads, params)
        nu = tree_map(lambda v, g: torch.addcmul(v * alpha, g, g, value=1 - alpha), state.nu, grads)
        mu = state.mu
        if centered:
            mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - alpha), state.mu, grads)
            denom = tree_map(lambda v, m: torch.addcmul(v, m, m, value=-1).sqrt() + eps, nu, mu)
        else:
            denom = tree_map(lambda v: v.sqrt() + eps, nu)
        lr_t = _lr_at(lr, state.count)
        buf = state.momentum
        if use_momentum:
            buf = tree_map(lambda b, g, d: torch.addcdiv(b * momentum, g, d), state.momentum, grads, denom)
            updates = tree_map(lambda b: b * _as_dtype(-lr_t, b), buf)
        else:
            updates = tree_map(lambda g, d: g / d * _as_dtype(-lr_t, g), grads, denom)
        return updates, RmspropState(state.count + 1, nu, mu, buf)

    return GradientTransformation(init, update)


def _adam_like(
    name: str,
    lr: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    mask: Mask,
) -> GradientTransformation:
    _check_lr("lr", lr)
    _check_float("b1", b1, 0.0, 1.0, hi_open=True)
    _check_float("b2", b2, 0.0, 1.0, hi_open=True)
    _check_float("eps", eps, 0.0, math.inf)
    _check_float("weight_decay", weight_decay, 0.0, math.inf)

    def init(params: PyTree) -> AdamState:
        return AdamState(_zero_count(params), tree_map(torch.zeros_like, params), tree_map(torch.zeros_like, params))

    def update(grads: PyTree, state: AdamState, params: PyTree | None = None) -> tuple[PyTree, AdamState]:
        lr_t = _lr_at(lr, state.count)
        count = state.count + 1
        t = count.to(torch.float64)
        # Scalars in float64, as torch computes them from Python floats.
        bias_correction1 = 1 - torch.pow(b1, t)
        bias_correction2_sqrt = torch.sqrt(1 - torch.pow(b2, t))
        step_size = lr_t / bias_correction1

        mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - b1), state.mu, grads)
        nu = tree_map(lambda v, g: torch.addcmul(v * b2, g, g, value=1 - b2), state.nu, grads)

        def adam_update(m: Tensor, v: Tensor) -> Tensor:
            denom = v.sqrt() / bias_correction2_sqrt.to(v.dtype) + eps
            return (-step_size).to(m.dtype) * m / denom  # same rounding as addcdiv(value=-step_size)

        updates = tree_map(adam_update, mu, nu)
        if weight_decay != 0:
            params = _require_params(name, params)
            sel = _resolve_mask(mask, params)
            keep = 1 - lr_t * weight_decay  # torch: param.mul_(1 - lr * wd), then the Adam step

            def decay(u: Tensor, p: Tensor, m: bool) -> Tensor:
                # (p * keep - p) is exact (Sterbenz), so p + this == torch's p * keep before the step
                return (p * _as_dtype(keep, p) - p) + u if m else u

            updates = tree_map(decay, updates, params, sel)
        return updates, AdamState(count, mu, nu)

    return GradientTransformation(init, update)


def adam(lr: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam as ``torch.optim.Adam`` (t = update count, starting at 1)::

        m_t = b1 m + (1 - b1) g                       (torch.lerp(m, g, 1 - b1))
        v_t = b2 v + (1 - b2) g^2
        u   = -(lr / (1 - b1^t)) * m_t / (sqrt(v_t) / sqrt(1 - b2^t) + eps)

    i.e. ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with eps scaled the way torch scales it.
    """
    return _adam_like("adam", lr, b1, b2, eps, 0.0, None)


def adamw(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    mask: Mask = default_decay_mask,
) -> GradientTransformation:
    """AdamW as ``torch.optim.AdamW``: decoupled weight decay, then the Adam step::

        p <- p - lr * wd * p        (only on leaves where mask is True; computed as p * (1 - lr*wd))
        p <- p + adam_update        (see :func:`adam`)

    ``mask``: a callable ``params -> tree of bools``, a tree of bools, or None (decay everything).
    The default, :func:`default_decay_mask`, decays only leaves named ``weight``.
    """
    return _adam_like("adamw", lr, b1, b2, eps, weight_decay, mask)
