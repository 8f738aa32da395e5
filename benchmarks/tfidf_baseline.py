"""TF-IDF + logistic regression on labelled files: the baseline a fine-tuned model must beat.

Reads the files with :func:`fnlm.data.load_labelled_files` (CSV with a header or JSON Lines, as
the fine-tuning example does), fits ``TfidfVectorizer(ngram_range=(1, 2), min_df=2,
sublinear_tf=True)`` + ``LogisticRegression(C=10)`` (the settings of ``imdb_reference.py``) on the
train file and prints accuracy and macro-F1 (scikit-learn's) on the test file (else the
validation file), with the split sizes and the fit time; ``--json`` writes them to a file.

    python benchmarks/tfidf_baseline.py --train-file stars/train.csv --test-file stars/test.csv
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def tfidf_logreg(
    train: tuple[list[str], list[int]], test: tuple[list[str], list[int]], max_features: int = 200_000, c: float = 10.0
) -> dict:
    """Fit on ``train`` = ``(texts, label_ids)``, score on ``test``: accuracy, macro-F1, sizes, fit time."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    t = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=max_features)
    x_train = vec.fit_transform(train[0])
    clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, train[1])
    fit_s = time.perf_counter() - t
    pred = clf.predict(vec.transform(test[0]))
    return {
        "accuracy": float(accuracy_score(test[1], pred)),
        "macro_f1": float(f1_score(test[1], pred, average="macro")),
        "train_size": len(train[0]),
        "test_size": len(test[0]),
        "fit_s": round(fit_s, 2),
    }


def main(argv=None) -> dict:
    from fnlm.data import load_labelled_files

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-file", required=True)
    ap.add_argument("--validation-file")
    ap.add_argument("--test-file")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.test_file is None and args.validation_file is None:
        ap.error("give --test-file or --validation-file to score on")
    splits, names = load_labelled_files(
        args.train_file,
        args.validation_file,
        args.test_file,
        text_column=args.text_column,
        label_column=args.label_column,
    )
    on = "test" if "test" in splits else "validation"
    result = {"scored_on": on, "labels": names, **tfidf_logreg(splits["train"], splits[on])}
    print(
        f"TF-IDF + logistic regression, {len(names)} classes, {result['train_size']} train / "
        f"{result['test_size']} {on}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
        f"(fit {result['fit_s']} s)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
