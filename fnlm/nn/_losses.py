"""Losses and metrics."""

from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``L = -(1/N) sum_n log softmax(z_n)[y_n]`` over examples with ``y_n != ignore_index``.

    ``logits: [..., C]``, ``labels: [...]`` ints. ``weight: [...]`` (optional, e.g. 0 for rows
    that pad a batch) turns the mean into ``sum_n w_n l_n / sum_n w_n``. ``label_smoothing`` mixes
    the one-hot target with the uniform distribution, as in the paper's §5.4.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
            "expected logits [..., C] and labels [...]"
        )
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0.0:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    w = valid.to(nll.dtype) if weight is None else valid.to(nll.dtype) * weight.to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp(min=1e-12)


def accuracy(logits: Tensor, labels: Tensor, *, weight: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Fraction of (weighted, non-ignored) examples with ``argmax z_n == y_n``."""
    valid = labels != ignore_index
    w = valid.float() if weight is None else valid.float() * weight.float()
    correct = (logits.argmax(-1) == labels).float()
    return (correct * w).sum() / w.sum().clamp(min=1e-12)
