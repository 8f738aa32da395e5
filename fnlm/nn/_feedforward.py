"""Position-wise feed-forward network (Vaswani et al. 2017, eq. 2)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fnlm import random
from fnlm.nn._linear import init_linear, linear
from fnlm.tree import Params


def gelu(x: Tensor) -> Tensor:
    """``GELU(x) = x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))`` (BERT's ``gelu``)."""
    return F.gelu(x)


def gelu_tanh(x: Tensor) -> Tensor:
    """``x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (GPT-2's and HF's ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "tanh": torch.tanh,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name`` (one of :data:`ACTIVATIONS`); a clear error otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def init_feed_forward(key: random.Key, d_model: int, d_ff: int, *, std: float | None = None) -> Params:
    """``W1: [d_model, d_ff]``, ``W2: [d_ff, d_model]`` (Xavier uniform unless ``std``)."""
    k1, k2 = random.split(key)
    return {"w1": init_linear(k1, d_model, d_ff, std=std), "w2": init_linear(k2, d_ff, d_model, std=std)}


def feed_forward(params: Params, x: Tensor, activation: str = "relu") -> Tensor:
    """``FFN(x) = act(x W1 + b1) W2 + b2``; with ``act = relu`` this is ``max(0, x W1 + b1) W2 + b2``."""
    return linear(params["w2"], get_activation(activation)(linear(params["w1"], x)))
