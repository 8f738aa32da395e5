"""examples/finetune_imdb.py beyond IMDb: labelled CSV/JSON Lines files with any number of classes,
models by hub id, and the knobs fine-tuners reach for (--freeze, --grad-accum,
--early-stopping-patience, --dtype fp16); classify.py --evaluate on a labelled file."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import CLASSIFY, ROOT, SCRIPT
from safetensors.torch import load_file

# three moods, easy to tell apart by their words
ROWS = {
    "happy": [
        "what a joyful, delightful day",
        "I loved every sunny minute",
        "pure happiness and smiles",
        "a cheerful, lovely surprise",
    ],
    "sad": [
        "a gloomy, miserable evening",
        "I cried through the lonely night",
        "grief and tears everywhere",
        "a heartbreaking, sorrowful loss",
    ],
    "angry": [
        "furious about the rude service",
        "I am outraged and livid",
        "a maddening, infuriating mess",
        "rage at the insulting delay",
    ],
}
EAGER = ("--max-len", 32, "--batch-size", 4, "--dtype", "fp32", "--no-compile", "--eval-every", 0)


def run(script, *args, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_csv(path, copies=3):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "mood"])
        for _ in range(copies):
            for mood, texts in ROWS.items():
                for t in texts:
                    w.writerow([t, mood])
    return path


def write_jsonl(path):
    with open(path, "w", encoding="utf-8") as f:
        for mood, texts in ROWS.items():
            for t in texts:
                f.write(json.dumps({"sentence": t, "mood": mood}) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return write_csv(d / "train.csv"), write_jsonl(d / "test.jsonl")


@pytest.fixture(scope="module")
def three_class_run(files, minilm_dir, tmp_path_factory):
    train, test = files
    out = tmp_path_factory.mktemp("runs") / "moods"
    proc = run(
        SCRIPT,
        "--train-file",
        train,
        "--test-file",
        test,
        "--text-column",
        "sentence",
        "--label-column",
        "mood",
        "--weights",
        minilm_dir,
        *EAGER,
        "--epochs",
        3,
        "--lr",
        "1e-4",
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_three_classes_from_csv_and_jsonl_with_their_names(three_class_run, files):
    from transformers import pipeline

    metrics = json.loads((three_class_run / "metrics.json").read_text())
    assert metrics["label_names"] == ["angry", "happy", "sad"]  # sorted, as run_glue.py does
    assert set(metrics["per_class"]) == {"angry", "happy", "sad"} and len(metrics["confusion_matrix"]) == 3
    assert metrics["train_size"] + metrics["val_size"] == 36 and metrics["test_size"] == 12
    config = json.loads((three_class_run / "config.json").read_text())
    assert config["id2label"] == {"0": "angry", "1": "happy", "2": "sad"}
    clf = pipeline("text-classification", model=str(three_class_run), device="cpu")
    assert clf("what a joyful, delightful day")[0]["label"] in {"angry", "happy", "sad"}
    # classify.py --evaluate on the labelled file: the run's own test accuracy
    proc = run(
        CLASSIFY,
        "--model",
        three_class_run,
        "--evaluate",
        "--test-file",
        files[1],
        "--text-column",
        "sentence",
        "--label-column",
        "mood",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        proc.stdout.startswith(f"accuracy {metrics['final_test_accuracy']:.4f}") and "  sad: precision" in proc.stdout
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("--test-file", "t.csv"), "--validation-file and --test-file go with --train-file"),
        (("--train-file", "{train}"), "--train-file needs --test-file too"),
        (("--train-file", "{bad}", "--test-file", "{test}"), "column 'text'"),
    ],
)
def test_file_mistakes_are_one_line(files, minilm_dir, tmp_path, args, message):
    train, test = files
    bad = tmp_path / "bad.csv"
    bad.write_text("review,label\nfine,1\n", encoding="utf-8")
    args = [a.format(train=train, test=test, bad=bad) for a in args]
    proc = run(SCRIPT, *args, "--weights", minilm_dir, "--out", tmp_path / "run", timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_freeze_keeps_the_frozen_weights_and_trains_the_rest(files, tiny_bert, tmp_path):
    train, test = files
    proc = run(
        SCRIPT,
        "--train-file",
        train,
        "--test-file",
        test,
        "--text-column",
        "sentence",
        "--label-column",
        "mood",
        "--weights",
        tiny_bert,
        *EAGER,
        "--freeze",
        "embeddings.*,encoder.layers.0.*",
        "--out",
        tmp_path / "run",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = {k.removeprefix("bert."): v for k, v in load_file(tiny_bert / "model.safetensors").items()}
    after = {k.removeprefix("bert."): v for k, v in load_file(tmp_path / "run" / "model.safetensors").items()}
    changed = {k for k in after if k in before and not torch.equal(before[k], after[k])}
    frozen = {k for k in after if "embeddings" in k or ".layer.0." in k}
    assert frozen and not changed & frozen
    assert any(".layer.1." in k for k in changed)


def test_grad_accum_halves_the_updates_and_early_stopping_ends_cleanly(files, tiny_bert, tmp_path):
    train, test = files
    common = (
        "--train-file",
        train,
        "--test-file",
        test,
        "--text-column",
        "sentence",
        "--label-column",
        "mood",
        "--weights",
        tiny_bert,
        *EAGER,
    )
    proc = run(SCRIPT, *common, "--grad-accum", 2, "--out", tmp_path / "accum")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "accum" / "metrics.json").read_text())
    assert m["steps"] == -(-m["train_size"] // 8)  # one update per 2 x 4 texts
    proc = run(
        SCRIPT,
        *common,
        "--epochs",
        20,
        "--eval-every",
        1,
        "--lr",
        "5e-2",
        "--early-stopping-patience",
        2,
        "--out",
        tmp_path / "early",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "early" / "metrics.json").read_text())
    assert "early stopping at step" in proc.stdout and m["early_stopped_at"] is not None
    evals = [e["step"] for e in m["evals"]]
    assert m["steps"] < 20 * -(-m["train_size"] // 4) and evals[-1] - m["kept"]["step"] >= 2


def test_fp16_with_loss_scaling_trains(files, tiny_bert, tmp_path):
    train, test = files
    proc = run(
        SCRIPT,
        "--train-file",
        train,
        "--test-file",
        test,
        "--text-column",
        "sentence",
        "--label-column",
        "mood",
        "--weights",
        tiny_bert,
        "--max-len",
        32,
        "--batch-size",
        4,
        "--no-compile",
        "--dtype",
        "fp16",
        "--out",
        tmp_path / "run",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(torch.isfinite(torch.tensor(m["train_loss_per_step"]))) and m["autocast"] == "torch.float16"


def test_weights_by_hub_id_download_once(files, tiny_bert, tmp_path):
    from _fake_hub import FakeHub

    repo = {p.name: p.read_bytes() for p in tiny_bert.iterdir() if p.is_file()}
    hub = FakeHub({"org/tiny-bert": {"main": repo}})
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        train, test = files
        for name in ("a", "b"):
            proc = run(
                SCRIPT,
                "--train-file",
                train,
                "--test-file",
                test,
                "--text-column",
                "sentence",
                "--label-column",
                "mood",
                "--weights",
                "org/tiny-bert",
                *EAGER,
                "--out",
                tmp_path / name,
                env=env,
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
            if name == "a":
                downloads = sum(1 for method, path in hub.requests if method == "GET" and "/resolve/" in path)
        # the second run asks which commit "main" is, and downloads no file: they are in the HF cache
        assert sum(1 for method, path in hub.requests if method == "GET" and "/resolve/" in path) == downloads > 0
        proc = run(
            SCRIPT,
            "--train-file",
            train,
            "--test-file",
            test,
            "--text-column",
            "sentence",
            "--label-column",
            "mood",
            "--weights",
            "org/other",
            "--out",
            tmp_path / "c",
            env={**env, "HF_HUB_OFFLINE": "1"},
            timeout=120,
        )
        assert proc.returncode == 2 and "local directory" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        hub.close()
