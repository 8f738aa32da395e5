"""A label-balanced, disjoint train / validation split of one labelled pool (e.g. IMDb's training
reviews): the validation slice is never trained on, and the test split is never touched."""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

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
        raise ValueError(
            f"--val-size {n_val}: only {len(rest)} examples are left beside the --train-size "
            f"{n_train} subset for a label-balanced validation slice"
        ) from None
    if not n_train:
        chosen = set(val_idx)
        train_idx = [i for i in range(len(labels)) if i not in chosen]
    return train_idx, val_idx


def default_val_size(n_train: int) -> int:
    """A tenth of the training examples, at most 1,000 (even, so both labels get the same share)."""
    return min(1000, 2 * round(n_train / 20))


class Split(NamedTuple):
    """One split of a labelled text dataset: ``texts[i]`` has label id ``labels[i]`` and id ``ids[i]``."""

    texts: list[str]
    labels: list[int]
    ids: list


IMDB_LABELS = ("neg", "pos")  # label 0 = negative review (rating <= 4), 1 = positive (rating >= 7)


def classification_splits(
    *,
    data: str | os.PathLike | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    text_column: str = "text",
    label_column: str = "label",
    train_size: int = 0,
    val_size: int | None = None,
    test_size: int = 0,
    seed: int = 0,
) -> tuple[dict[str, Split], tuple[str, ...]]:
    """``({'train', 'val', 'test'}: Split, label_names)`` for a text classifier.

    IMDb (``data``: the archive or folder, downloaded when None; label-balanced subsets of
    ``train_size``/``test_size`` reviews, 0 = all), or labelled files (``train_file`` and
    ``test_file``, CSV or JSON Lines, all rows; :func:`load_labelled_files`). The validation split
    is ``validation_file``, else ``val_size`` examples (default :func:`default_val_size`) carved from
    the training ones and never trained on; the test split is never touched before the end.
    """
    if train_file is None:
        from fnlm.data._imdb import download_imdb, load_imdb_splits

        splits = load_imdb_splits(data if data is not None else download_imdb(), ("train", "test"))
        pool, test = splits["train"], splits["test"]
        if test_size > len(test):
            raise ValueError(f"--test-size {test_size}: the data has only {len(test)} test reviews")
        n_val = val_size if val_size is not None else default_val_size(train_size or len(pool))
        train_idx, val_idx = train_val_split(pool.labels, train_size, n_val, seed=seed)
        test = subset(test, test_size, seed=seed) if test_size else test
        parts = {"train": pool.select(train_idx), "val": pool.select(val_idx), "test": test}
        return {k: Split(list(d.texts), list(d.labels), list(d.ids)) for k, d in parts.items()}, IMDB_LABELS
    from fnlm.data._labelled import load_labelled_files

    if test_file is None:
        raise ValueError("--train-file needs --test-file too (the split evaluated once, at the end)")
    files, names = load_labelled_files(
        train_file, validation_file, test_file, text_column=text_column, label_column=label_column
    )
    out = {k: Split(t, y, list(range(1, len(t) + 1))) for k, (t, y) in files.items()}  # ids: row numbers
    out["val"] = out.pop("validation", None)
    if out["val"] is None:
        texts, labels, ids = out["train"]
        n_val = val_size if val_size is not None else default_val_size(len(texts))
        train_idx, val_idx = train_val_split(labels, 0, n_val, seed=seed)
        out["train"], out["val"] = (
            Split([texts[i] for i in idx], [labels[i] for i in idx], [ids[i] for i in idx])
            for idx in (train_idx, val_idx)
        )
    return out, tuple(names)
