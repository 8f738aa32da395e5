"""What ``torch.func.vmap`` buys a functional framework: per-example gradients, DP-SGD, ensembles.

* :func:`per_example_grads`: ``vmap(grad(loss_fn), in_dims=(None, 0))`` -- one gradient per
  example in one batched pass, instead of a Python loop of ``B`` backward passes.
* :func:`dp_aggregate` / :func:`make_dp_sgd_step`: differentially private SGD (Abadi et al. 2016).
* :func:`make_ensemble_step`: ``N`` models (different seeds, or different learning rates) stacked
  with :func:`fnlm.tree.tree_stack` and trained by ONE compiled step, ``vmap`` over the stacked
  params / optimizer states / keys. The working combination is ``torch.compile(vmap(step))``:
  dynamo traces the ``vmap`` (and the ``grad`` inside it) into one graph with ``fullgraph=True``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.func import grad, vmap

from fnlm import random
from fnlm.optim._transforms import GradientTransformation, apply_updates
from fnlm.train._step import NONFINITE, Step, compile_fn, finite_flags, keep_if_finite, train_step_fn
from fnlm.tree import PyTree, tree_flatten, tree_leaves, tree_map, tree_unflatten


# ----------------------------------------------------------------------------- per-example gradients
def per_example_grads(
    loss_fn: Callable[[PyTree, PyTree], Tensor], params: PyTree, batch: PyTree, *, has_aux: bool = False
) -> PyTree:
    """``g_i = grad_theta loss_fn(theta, batch[i:i+1])`` for every example ``i``, in one pass.

    ``loss_fn(params, batch) -> scalar loss`` (or ``(loss, aux)`` with ``has_aux=True``, then
    ``(grads, aux)`` is returned) sees each example with a batch axis of 1, exactly as it would
    see a batch of one, so an unchanged mean-over-batch loss works. Every batch leaf is split
    along axis 0. Returns the gradient tree with a leading axis ``B`` on every leaf.
    """

    def one(p, example):
        return loss_fn(p, tree_map(lambda x: x.unsqueeze(0), example))

    return vmap(grad(one, has_aux=has_aux), in_dims=(None, 0))(params, batch)


def per_example_grad_norms(grads: PyTree) -> Tensor:
    """``||g_i||_2`` over all leaves, for per-example gradients with a leading axis ``B``: ``[B]``."""
    leaves = tree_leaves(grads)
    sq = sum(g.reshape(g.shape[0], -1).float().pow(2).sum(-1) for g in leaves)
    return sq.sqrt()


def dp_aggregate(grads: PyTree, key: random.Key, *, clip_norm: float, noise_multiplier: float) -> PyTree:
    """The DP-SGD gradient of Abadi et al. 2016 (Algorithm 1) from per-example gradients ``[B, ...]``::

        g_i  <- g_i / max(1, ||g_i||_2 / C)                       (clip each example to norm C)
        g    =  (1/B) (sum_i g_i + N(0, sigma^2 C^2 I))            (sum, add Gaussian noise, average)

    ``C = clip_norm``, ``sigma = noise_multiplier``; the noise comes from ``key`` (one sub-key per
    leaf), so the step is a pure function. ``sigma = 0`` gives clipped-mean SGD.
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    norms = per_example_grad_norms(grads)
    factor = 1.0 / torch.clamp(norms / clip_norm, min=1.0)  # 1 / max(1, ||g_i|| / C)
    flat, spec = tree_flatten(grads)
    keys = random.split(key, len(flat))
    n = flat[0].shape[0]
    out = []
    for g, k in zip(flat, keys):
        summed = torch.einsum("b,b...->...", factor.to(g.dtype), g)
        noise = random.normal(k, summed.shape, std=noise_multiplier * clip_norm, dtype=g.dtype, device=g.device)
        out.append((summed + noise) / n)
    return tree_unflatten(out, spec)


def make_dp_sgd_step(
    loss_fn: Callable[[PyTree, PyTree], Tensor],
    optimizer: GradientTransformation,
    *,
    clip_norm: float,
    noise_multiplier: float,
    compile: bool | str = True,
    nonfinite: str = "raise",
) -> Step:
    """A DP-SGD step ``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``:
    per-example gradients (:func:`per_example_grads`), :func:`dp_aggregate`, then ``optimizer``
    (plain ``sgd`` for the paper's algorithm). ``metrics``: ``loss`` (mean over the batch),
    ``clipped_fraction`` (examples whose gradient norm exceeded ``C``) and the non-finite flags
    of :func:`~fnlm.train.make_train_step` (same ``nonfinite`` modes). Compiled in one graph."""

    def step(params, opt_state, batch, key):
        def one(p, example):
            loss = loss_fn(p, tree_map(lambda x: x.unsqueeze(0), example))
            return loss, loss

        grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0))(params, batch)
        norms = per_example_grad_norms(grads)
        g = dp_aggregate(grads, key, clip_norm=clip_norm, noise_multiplier=noise_multiplier)
        loss = losses.mean()
        finite, grads_finite = finite_flags(loss, g)
        updates, new_state = optimizer.update(g, opt_state, params)
        new_params = apply_updates(params, updates)
        if nonfinite == "skip":
            new_params = keep_if_finite(finite, new_params, params)
            new_state = keep_if_finite(finite, new_state, opt_state)
        metrics = {
            "loss": loss,
            "clipped_fraction": (norms > clip_norm).float().mean(),
            "finite": finite,
            "grads_finite": grads_finite,
        }
        return new_params, new_state, metrics

    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    return Step(
        step,
        compile_fn(step, compile=compile),
        check_args=lambda p, s, b, key: random._check_key(key),
        nonfinite=nonfinite,
    )


# ----------------------------------------------------------------------------- ensembles
def make_ensemble_step(
    loss_fn: Callable[[PyTree, Any, Tensor], tuple[Tensor, dict]],
    optimizer: GradientTransformation | Callable[[Mapping[str, Tensor]], GradientTransformation],
    *,
    shared_batch: bool = True,
    compile: bool | str = True,
    nonfinite: str = "raise",
    accum_steps: int = 1,
) -> Step:
    """Train ``N`` stacked models in one compiled step: ``vmap`` of :func:`fnlm.train.train_step_fn`.

    ``step(params, opt_state, batch, keys[, hparams]) -> (params, opt_state, metrics)`` where
    ``params`` and ``opt_state`` have a leading member axis ``N`` (``tree_stack``; stack the
    states of ``opt.init`` or ``vmap(opt.init)(params)``), ``keys`` is ``[N, 2]``
    (``random.split(key, N)``) and every metric comes back as ``[N]``. ``shared_batch=True``:
    all members see the same batch; ``False``: batch leaves carry the member axis too.

    ``optimizer`` may be a *factory* ``hparams -> GradientTransformation``; the step then takes
    ``hparams``, a dict of ``[N]`` tensors, and each member gets its own values, e.g. ``N``
    learning rates: ``lambda hp: optim.adam(lambda count: hp['lr'])`` (a schedule that returns
    the member's lr). Non-finite members: ``'raise'`` names the members; ``'skip'`` keeps just
    those members unchanged (a ``torch.where`` per member) and warns.
    """
    factory = not isinstance(optimizer, GradientTransformation)
    if factory and not callable(optimizer):
        raise TypeError(
            f"optimizer must be a GradientTransformation or a factory hparams -> one, got {type(optimizer).__name__}"
        )

    def member(params, opt_state, batch, key, hparams):
        opt = optimizer(hparams) if factory else optimizer
        pure = train_step_fn(
            loss_fn, opt, accum_steps=accum_steps, nonfinite="skip" if nonfinite == "skip" else "raise"
        )
        return pure(params, opt_state, batch, key)

    batched = vmap(member, in_dims=(0, 0, None if shared_batch else 0, 0, 0 if factory else None))

    def pure_step(params, opt_state, batch, keys, hparams=None):
        return batched(params, opt_state, batch, keys, hparams)

    def check_args(params, opt_state, batch, keys, hparams=None):
        if factory and hparams is None:
            raise ValueError("this ensemble's optimizer is a factory: pass hparams (a dict of [N] tensors)")
        if keys.ndim != 2 or keys.shape[-1] != 2:
            raise ValueError(f"keys must be [N, 2] (random.split(key, N)), got {tuple(keys.shape)}")

    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    return Step(
        pure_step, compile_fn(pure_step, compile=compile), check_args=check_args, nonfinite=nonfinite, members=True
    )
