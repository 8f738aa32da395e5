"""Evaluation metrics: loss and accuracy from probabilities, per-class precision/recall/F1, the
confusion matrix, the Wilson interval of a proportion, and the keep-best rule.

Plain functions over tensors and lists; results are Python numbers (JSON-ready). The definitions
follow scikit-learn (``confusion_matrix``, ``precision_recall_fscore_support`` with
``zero_division=0``) and ``transformers.Trainer`` (keep the lowest validation loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["loss_and_accuracy", "confusion_matrix", "classification_report", "wilson_interval", "is_better"]


def loss_and_accuracy(probs: torch.Tensor, labels) -> tuple[float, float]:
    """``(mean_i -log probs[i, y_i], mean_i [argmax_c probs[i, c] == y_i])`` for probs ``[N, C]``, labels ``[N]``.

    Probabilities are clamped at 1e-12 before the log, so a confidently wrong row costs at most ~27.6.
    """
    y = torch.as_tensor(labels, dtype=torch.long)
    if probs.ndim != 2 or y.ndim != 1 or probs.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [N, C] and labels [N]; got {tuple(probs.shape)} and {tuple(y.shape)}")
    probs = probs.float()
    nll = -torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12))
    return float(nll.mean()), float((probs.argmax(-1) == y).float().mean())


def confusion_matrix(y_true, y_pred, num_classes: int) -> torch.Tensor:
    """``M[t, p] = #{i : y_true[i] = t, y_pred[i] = p}``, a LongTensor ``[C, C]`` (rows true, columns predicted)."""
    t = torch.as_tensor(y_true, dtype=torch.long).reshape(-1)
    p = torch.as_tensor(y_pred, dtype=torch.long).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.numel()} and {p.numel()}")
    for name, v in (("y_true", t), ("y_pred", p)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(y_true, y_pred, label_names: Sequence[str]) -> dict:
    """Confusion matrix, precision ``tp/(tp+fp)``, recall ``tp/(tp+fn)``, F1 ``2pr/(p+r)`` per class (0 where
    undefined, as scikit-learn's ``zero_division=0``), macro F1 and accuracy.

    Returns ``{"confusion_matrix": [[int]], "per_class": {name: {precision, recall, f1, support}},
    "macro_f1": float, "accuracy": float}``.
    """
    c = len(label_names)
    cm = confusion_matrix(y_true, y_pred, c)
    per_class = {}
    for k, name in enumerate(label_names):
        tp, predicted, actual = int(cm[k, k]), int(cm[:, k].sum()), int(cm[k].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    n = int(cm.sum())
    return {
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
        "macro_f1": sum(v["f1"] for v in per_class.values()) / c if c else 0.0,
        "accuracy": int(cm.diagonal().sum()) / n if n else 0.0,
    }


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n: ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``.

    ``z`` = 1.959964 gives the 95% interval; ``n = 0`` gives ``(0, 1)``.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n; got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def is_better(
    new: dict,
    best: dict | None,
    *,
    metric: str = "loss",
    mode: str = "min",
    tie_break: str | None = "accuracy",
    tie_mode: str = "max",
) -> bool:
    """The keep-best rule: ``new[metric]`` beats ``best[metric]`` (lower for ``mode="min"``), ties broken by
    ``new[tie_break]`` (higher for ``tie_mode="max"``); anything beats ``best=None``; a full tie is not better.

    The default is ``transformers.Trainer``'s: lowest validation loss, then highest accuracy. A
    ``tie_break`` key missing from either dict is ignored.
    """
    for m in (mode, tie_mode):
        if m not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {m!r}")
    if best is None:
        return True
    if metric not in new or metric not in best:
        raise ValueError(f"is_better: metric {metric!r} is missing from {'new' if metric not in new else 'best'}")

    def key(d):
        k = [d[metric] if mode == "min" else -d[metric]]
        if tie_break is not None and tie_break in new and tie_break in best:
            k.append(-d[tie_break] if tie_mode == "max" else d[tie_break])
        return tuple(k)

    return key(new) < key(best)
