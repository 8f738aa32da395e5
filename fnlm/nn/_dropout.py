"""Dropout driven by an explicit key (Srivastava et al. 2014)."""

from __future__ import annotations

from torch import Tensor

from fnlm import random


def dropout(x: Tensor, rate: float, *, key: random.Key | None = None, train: bool = False) -> Tensor:
    """``y = x * m / (1 - rate)``, ``m ~ Bernoulli(1 - rate)`` elementwise; identity unless training.

    The mask is a pure function of ``key`` (same key => same mask, on every device).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if not train or rate == 0.0:
        return x
    if key is None:
        raise ValueError("dropout with train=True needs a random key (pass key=...)")
    keep = ~random.bernoulli(key, rate, x.shape, device=x.device)
    # The mask is multiplied in x's dtype (as torch's own CPU dropout keeps it): what the backward
    # then saves is a float mask, which Inductor's CPU kernels store ~10x faster than a bool one
    # (measured: the bool masks were ~8% of a compiled BERT training step).
    return x * keep.to(x.dtype) / (1.0 - rate)
