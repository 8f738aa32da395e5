"""Token embeddings: a lookup table ``E: [vocab_size, d_model]``, ``embed(t) = E[t]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fnlm import random
from fnlm._checks import is_traced
from fnlm.tree import Params


def init_embedding(
    key: random.Key, vocab_size: int, d_model: int, *, std: float | None = None, dtype=torch.float32
) -> Params:
    """``E ~ N(0, std^2)``, default ``std = d_model^-1/2`` (so that ``E[t] * sqrt(d_model)``,
    the paper's scaling, has unit variance)."""
    std = d_model**-0.5 if std is None else std
    return {"weight": random.normal(key, (vocab_size, d_model), std=std, dtype=dtype)}


def check_token_ids(ids: Tensor, vocab_size: int, name: str = "token ids") -> None:
    """Raise ``ValueError`` if any id is outside ``[0, vocab_size)``.

    Checked on the host before the lookup: on GPU an out-of-range index is a device-side assert
    that kills the CUDA context. Skipped under ``torch.compile`` / ``vmap`` (the value is not
    known there); the eager data pipeline validates instead.
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if is_traced(ids) or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contain {bad}, outside the vocabulary [0, {vocab_size})")


def embedding(params: Params, ids: Tensor) -> Tensor:
    """``x = E[ids]``; ``ids: [...] int -> x: [..., d_model]``."""
    E = params["weight"]
    check_token_ids(ids, E.shape[0])
    # F.embedding rather than E[ids]: the same lookup, but the backward of advanced indexing sums
    # repeated ids with atomic adds on multi-threaded CPUs, so gradients would vary run to run.
    return F.embedding(ids, E)
