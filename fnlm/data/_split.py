"""A label-balanced, disjoint train / validation split of one labelled pool (e.g. IMDb's training
reviews): the validation slice is never trained on, and the test split is never touched."""
from __future__ import annotations

from typing import Sequence

from fnlm.data._imdb import subset


def train_val_split(labels: Sequence[int], n_train: int, n_val: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train_idx, val_idx)``: ``n_train`` label-balanced indices (0 = all not in validation),
    then ``n_val`` label-balanced ones from the rest (seed ``seed + 1``); disjoint, each sorted.

    Raises ``ValueError`` (naming the sizes) when the pool cannot give them.
    """
    if n_train > len(labels):
        raise ValueError(f"--train-size {n_train}: the pool has only {len(labels)} examples")
    pairs = list(zip(range(len(labels)), labels))
    train_idx = [i for i, _ in subset(pairs, n_train, seed=seed)] if n_train else []
    taken = set(train_idx)
    rest = [(i, lab) for i, lab in pairs if i not in taken]
    try:
        val_idx = [i for i, _ in subset(rest, n_val, seed=seed + 1)]
    except ValueError:
        raise ValueError(f"--val-size {n_val}: only {len(rest)} examples are left beside the --train-size "
                         f"{n_train} subset for a label-balanced validation slice") from None
    if not n_train:
        chosen = set(val_idx)
        train_idx = [i for i in range(len(labels)) if i not in chosen]
    return train_idx, val_idx


def default_val_size(n_train: int) -> int:
    """A tenth of the training examples, at most 1,000 (even, so both labels get the same share)."""
    return min(1000, 2 * round(n_train / 20))
