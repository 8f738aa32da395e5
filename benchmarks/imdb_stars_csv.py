"""IMDb's star ratings as a 4-class task, written to CSV for the labelled-file route.

The ratings are in the review file names ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``
(1-4 stars for ``neg``, 7-10 for ``pos``); classes ``1-2``, ``3-4``, ``7-8``, ``9-10`` stars.
Writes ``train.csv`` and ``test.csv`` (columns ``text,label``; ``<br />`` replaced by spaces)
into ``--out-dir``, optionally a class-balanced random subset of each split (``fnlm.data.subset``).

    python benchmarks/imdb_stars_csv.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --out-dir stars
    python benchmarks/tfidf_baseline.py --train-file stars/train.csv --test-file stars/test.csv
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

from fnlm.data import html_clean, load_imdb_splits, subset
from fnlm.io import atomic_path

#: star rating -> class name
CLASSES = {1: "1-2", 2: "1-2", 3: "3-4", 4: "3-4", 7: "7-8", 8: "7-8", 9: "9-10", 10: "9-10"}


def star_class(rating: int) -> str:
    """The 4-class label of an IMDb rating (1-4 or 7-10 stars)."""
    if rating not in CLASSES:
        raise ValueError(f"IMDb ratings are 1-4 or 7-10 stars, got {rating}")
    return CLASSES[rating]


def write_csv(rows: list[tuple[str, str]], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def main(argv=None) -> dict[str, Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="aclImdb_v1.tar.gz or a folder containing aclImdb/")
    ap.add_argument("--out-dir", required=True, help="where train.csv and test.csv go")
    ap.add_argument("--train-size", type=int, default=None, help="class-balanced subset of the training split")
    ap.add_argument("--test-size", type=int, default=None, help="class-balanced subset of the test split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, data in load_imdb_splits(args.data).items():
        rows = [(html_clean(t), star_class(r)) for t, r in zip(data.texts, data.ratings)]
        n = args.train_size if split == "train" else args.test_size
        if n is not None:
            rows = subset(rows, n, seed=args.seed)
        write_csv(rows, out_dir / f"{split}.csv")
        counts = Counter(label for _, label in rows)
        print(
            f"{out_dir / f'{split}.csv'}: {len(rows)} reviews; "
            + ", ".join(
                f"{c} stars: {counts[c]}" for c in sorted(set(CLASSES.values()), key=lambda c: int(c.split("-")[0]))
            )
        )
        written[split] = out_dir / f"{split}.csv"
    return written


if __name__ == "__main__":
    main()
