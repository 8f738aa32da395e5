"""A linear probe: logistic regression on frozen features, fitted with fnlm.optim."""

from __future__ import annotations

import torch
from torch import Tensor

from fnlm import optim, random
from fnlm.nn import cross_entropy


def fit_linear_probe(
    x: Tensor, y: Tensor, *, steps: int = 300, lr: float = 0.05, l2: float = 1e-3, seed: int = 0
) -> dict[str, Tensor]:
    """Logistic regression ``p(y | x) = softmax(((x - mu) / sigma) W + b)`` fitted by full-batch Adam on
    ``L = CE + l2 ||W||^2``; ``x``: ``[N, D]`` features (standardised with their mean ``mu`` and std
    ``sigma``), ``y``: ``[N]`` class ids. Pure: the result depends only on the inputs.
    Returns ``{'w': [D, C], 'b': [C], 'mean': [D], 'std': [D]}`` (apply with :func:`linear_probe_logits`).
    """
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    n_classes = int(y.max()) + 1
    params = {"w": random.normal(random.key(seed), (x.shape[1], n_classes), std=0.01), "b": torch.zeros(n_classes)}
    xs = (x - mean) / std

    def loss_fn(p):
        return cross_entropy(xs @ p["w"] + p["b"], y) + l2 * (p["w"] ** 2).sum()

    optimizer = optim.adam(lr)
    state = optimizer.init(params)
    grad_fn = torch.func.grad(loss_fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny steps: thread hand-offs would cost more than they save
    try:
        for _ in range(steps):
            updates, state = optimizer.update(grad_fn(params), state, params)
            params = optim.apply_updates(params, updates)
    finally:
        torch.set_num_threads(threads)
    return {**params, "mean": mean, "std": std}


def linear_probe_logits(probe: dict[str, Tensor], x: Tensor) -> Tensor:
    """``((x - mean) / std) W + b``: ``[N, C]`` logits of a fitted probe."""
    return ((x - probe["mean"]) / probe["std"]) @ probe["w"] + probe["b"]
