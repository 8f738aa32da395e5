"""Affine maps: ``y = x W + b``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fnlm import random
from fnlm._checks import check_last_dim
from fnlm.tree import Params


def init_linear(
    key: random.Key,
    d_in: int,
    d_out: int,
    *,
    bias: bool = True,
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """``W: [d_in, d_out]``, ``b: [d_out]`` (zeros).

    Default init is Glorot/Xavier uniform, ``W ~ U(-a, a)``, ``a = sqrt(6 / (d_in + d_out))``;
    pass ``std`` for ``W ~ N(0, std^2)`` (BERT uses 0.02).
    """
    if std is None:
        a = math.sqrt(6.0 / (d_in + d_out))
        w = random.uniform(key, (d_in, d_out), low=-a, high=a, dtype=dtype)
    else:
        w = random.normal(key, (d_in, d_out), std=std, dtype=dtype)
    params = {"weight": w}
    if bias:
        params["bias"] = torch.zeros(d_out, dtype=dtype)
    return params


def linear(params: Params, x: Tensor) -> Tensor:
    """``y = x W + b``; ``x: [..., d_in] -> y: [..., d_out]`` (int8 x int8 when the node holds
    ``weight_int8``, see :mod:`fnlm.nn._dynamic_int8`)."""
    if "weight_int8" in params:
        from fnlm.nn._dynamic_int8 import int8_linear

        return int8_linear(params, x)
    w = params["weight"]
    check_last_dim("linear input", x, w.shape[0], "d_in")
    y = x @ w
    return y + params["bias"] if "bias" in params else y
