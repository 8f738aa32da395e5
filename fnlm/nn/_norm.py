"""Layer normalisation (Ba et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fnlm._checks import check_last_dim
from fnlm.tree import Params


def init_layer_norm(d_model: int, dtype: torch.dtype = torch.float32) -> Params:
    """``gamma = 1``, ``beta = 0``."""
    return {"gamma": torch.ones(d_model, dtype=dtype), "beta": torch.zeros(d_model, dtype=dtype)}


def layer_norm(params: Params, x: Tensor, eps: float = 1e-5) -> Tensor:
    """``LN(x) = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta`` over the last axis ``d_model``.

    ``mu``, ``sigma^2``: mean and biased variance of ``x[..., :]``. Computed by
    ``F.layer_norm`` (one fused kernel); :func:`layer_norm_reference` is the formula itself.
    """
    check_last_dim("layer_norm input", x, params["gamma"].shape[0])
    return F.layer_norm(x, x.shape[-1:], params["gamma"], params["beta"], eps)


def layer_norm_reference(params: Params, x: Tensor, eps: float = 1e-5) -> Tensor:
    """The formula, line by line (used to test :func:`layer_norm`)."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return params["gamma"] * (x - mu) / torch.sqrt(var + eps) + params["beta"]
