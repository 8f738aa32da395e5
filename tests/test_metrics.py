"""fnlm.metrics against scikit-learn and the Wilson interval's closed form computed here."""

import math
import random

import pytest
import torch
from sklearn import metrics as skm

from fnlm import metrics


def test_loss_and_accuracy_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 3, generator=g), -1)
    y = torch.randint(0, 3, (50,), generator=g)
    loss, acc = metrics.loss_and_accuracy(probs, y)
    assert loss == pytest.approx(skm.log_loss(y.numpy(), probs.double().numpy(), labels=[0, 1, 2]), rel=1e-5)
    assert acc == pytest.approx(skm.accuracy_score(y.numpy(), probs.argmax(-1).numpy()))
    assert metrics.loss_and_accuracy(probs, y.tolist()) == (loss, acc)


@pytest.mark.parametrize("seed", range(4))
def test_report_matches_sklearn(seed):
    rng = random.Random(seed)
    c = 3
    y_true = [rng.randrange(c) for _ in range(40)]
    y_pred = [rng.choice([0, 1]) for _ in range(40)]  # class 2 never predicted: zero division
    if seed == 3:
        y_true = [t % 2 for t in y_true]  # class 2 absent from the truth too
    names = ["a", "b", "c"]
    cm = metrics.confusion_matrix(y_true, y_pred, c)
    assert cm.dtype == torch.long
    assert cm.tolist() == skm.confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    rep = metrics.classification_report(y_true, y_pred, names)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    assert rep["confusion_matrix"] == cm.tolist()
    for k, n in enumerate(names):
        pc = rep["per_class"][n]
        assert (pc["precision"], pc["recall"], pc["f1"]) == pytest.approx((p[k], r[k], f[k]))
        assert pc["support"] == s[k]
    assert rep["macro_f1"] == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))


def test_confusion_matrix_rejects_out_of_range():
    with pytest.raises(ValueError, match="y_pred"):
        metrics.confusion_matrix([0, 1], [0, 2], 2)


def _wilson(k, n, z):  # Wilson (1927): roots of (p - phat)^2 = z^2 p (1 - p) / n, solved as a quadratic in p
    phat = k / n
    a, b, c = 1 + z * z / n, -(2 * phat + z * z / n), phat * phat
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (871, 1000), (1, 2)])
def test_wilson_interval(k, n):
    lo, hi = metrics.wilson_interval(k, n)
    elo, ehi = _wilson(k, n, 1.959964)
    assert (lo, hi) == pytest.approx((max(0.0, elo), min(1.0, ehi)), abs=1e-12)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    # a published value: Newcombe (1998), Table I, 81/263 -> 0.2553 to 0.3662
    assert metrics.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


def _keep_best_loop(evals):  # the rule written out: lowest loss, then highest accuracy, first one on a full tie
    best = None
    for e in evals:
        if best is None or e["loss"] < best["loss"] or (e["loss"] == best["loss"] and e["accuracy"] > best["accuracy"]):
            best = e
    return best


def test_is_better_keeps_lowest_loss_then_accuracy():
    rng = random.Random(0)
    evals = [{"loss": rng.choice([0.3, 0.4, 0.5]), "accuracy": rng.choice([0.8, 0.9]), "i": i} for i in range(30)]
    best = None
    for e in evals:
        if metrics.is_better(e, best):
            best = e
    assert best is _keep_best_loop(evals)
    assert metrics.is_better({"accuracy": 0.9}, {"accuracy": 0.8}, metric="accuracy", mode="max", tie_break=None)
    assert not metrics.is_better({"loss": 1.0}, {"loss": 1.0})
    with pytest.raises(ValueError, match="mode"):
        metrics.is_better({"loss": 1}, {"loss": 2}, mode="lowest")
