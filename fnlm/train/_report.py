"""A classifier run's human-readable outputs: the most confidently wrong examples and the training plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor


def write_errors(
    path: str | Path,
    probs: Tensor,
    labels: Sequence[int],
    texts: Sequence[str],
    ids: Sequence,
    label_names: Sequence[str],
    *,
    limit: int = 100,
    chars: int = 200,
) -> int:
    """``errors.tsv``: the wrongly classified examples, most confident first (probability, predicted,
    label, id, the text's first ``chars`` characters on one line); returns how many were wrong.

    ``probs``: ``[n, num_labels]``, row i for ``texts[i]`` with true label ``labels[i]``.
    """
    pred = probs.argmax(-1)
    wrong = [i for i in range(len(labels)) if int(pred[i]) != labels[i]]
    wrong.sort(key=lambda i: -float(probs[i, pred[i]]))
    lines = ["probability\tpredicted\tlabel\tid\ttext"]
    for i in wrong[:limit]:
        text = " ".join(texts[i].split())
        lines.append(
            f"{float(probs[i, pred[i]]):.4f}\t{label_names[int(pred[i])]}\t{label_names[labels[i]]}\t"
            f"{ids[i]}\t{text[:chars]}"
        )
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(wrong)


def plot_training(
    path: str | Path, step_losses: Sequence[float], evals: Sequence[dict], *, test: tuple[int, float, str] | None = None
) -> bool:
    """``training.png``: the training loss per step (and its running mean) with the validation loss,
    and the validation accuracy with the test accuracy (``test``: ``(step, accuracy, which)``).

    ``evals``: dicts with ``step``, ``val_loss``, ``val_accuracy``. Returns False (and writes nothing)
    when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = range(1, len(step_losses) + 1)
    ax1.plot(steps, step_losses, lw=0.6, alpha=0.4, label="training, per step")
    w = max(1, len(step_losses) // 20)
    mean = torch.tensor(list(step_losses), dtype=torch.float64).cumsum(0)
    smooth = [(mean[i] - (mean[i - w] if i >= w else 0)) / min(w, i + 1) for i in range(len(step_losses))]
    ax1.plot(steps, [float(v) for v in smooth], lw=1.5, label=f"training, mean of {w}")
    if evals:
        ax1.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
        ax2.plot([e["step"] for e in evals], [e["val_accuracy"] for e in evals], "o-", label="validation")
    ax1.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax1.legend()
    if test is not None:
        step, acc, which = test
        ax2.plot([step], [acc], "*", ms=12, label=f"test, {which} parameters (step {step})")
    ax2.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0.0, 1.0))
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
