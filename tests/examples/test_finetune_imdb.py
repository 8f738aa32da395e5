"""examples/finetune_imdb.py end to end, run as a user runs it: a fresh interpreter, the command line.

Fast tests use a small archive in the official aclImdb layout that they write themselves (so they
run everywhere) and the real all-MiniLM-L6-v2 checkpoint; one variant reads the shared archive.
The slow test fine-tunes on 1,000 real reviews and checks the accuracy on 1,000 held-out ones.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import CLASSIFY, byte_level_bpe, fnlm_logits, run_script

from fnlm.data import load_tokenizer
from fnlm.models import bert_classifier, load_bert

MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "vocab.txt",
    "tokenizer.json",
    "metrics.json",
    "errors.tsv",
    "training.png",
    "README.md",
    "metrics.jsonl",
    "run_config.json",
    "environment.json",
)


def check_run_dir(out: Path, texts: list[str], labels: list[int], max_len: int) -> dict:
    """Every output file is there and loadable; the reloaded model reproduces the reported accuracy
    and the --predict output; transformers loads the directory and agrees with fnlm."""
    for name in MODEL_FILES:
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary directories left behind"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["max_len"] == max_len and len(metrics["epochs"]) == metrics["args"]["epochs"]
    for e in metrics["epochs"]:
        assert set(e) >= {"train_loss", "val_loss", "val_accuracy", "train_seconds", "train_examples_per_s"}
    assert len(metrics["train_loss_per_step"]) == metrics["steps"]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # fnlm reload: the accuracy the script reported
    logits = fnlm_logits(out, texts, max_len)
    correct = int((logits.argmax(-1) == torch.tensor(labels)).sum())
    assert correct == round(metrics["final_test_accuracy"] * len(labels))

    # classify.py --predict prints label and probability per review, as a direct computation gives them
    shown = texts[:3]
    proc = run_script("--model", out, "--predict", *shown, timeout=120, script=CLASSIFY)
    assert proc.returncode == 0, proc.stderr
    lines = [ln.split("\t") for ln in proc.stdout.strip().splitlines()]
    assert len(lines) == len(shown)
    probs = torch.softmax(logits[:3], -1)
    for (label, p, excerpt), pr, text in zip(lines, probs, shown):
        i = int(pr.argmax())
        assert label == ("neg", "pos")[i] and float(p) == pytest.approx(float(pr[i]), abs=1e-4)
        assert excerpt[:20] == text[:20]

    # transformers: the same directory, the same logits
    from transformers import AutoTokenizer, BertForSequenceClassification

    hf = BertForSequenceClassification.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    enc = hf_tok(
        [t.replace("<br />", " ") for t in texts[:8]],
        padding=True,
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
    )
    ours = load_tokenizer(out).encode([t.replace("<br />", " ") for t in texts[:8]], max_len=max_len)
    assert torch.equal(enc["input_ids"], ours["input_ids"])  # same tokenizer, same head truncation
    params, cfg = load_bert(out, head="classifier")
    with torch.no_grad():  # on the very same (head-truncated) ids: real reviews are longer than max_len
        hf_logits = hf(**enc).logits
        our_logits = bert_classifier(
            params, ours["input_ids"], cfg, attention_mask=ours["attention_mask"], token_type_ids=ours["token_type_ids"]
        )
    torch.testing.assert_close(hf_logits, our_logits, atol=1e-4, rtol=0)
    return metrics


def test_finetune_small_archive_end_to_end(small_archive, minilm_dir, tmp_path):
    out = tmp_path / "runs" / "tiny"
    proc = run_script(
        "--data",
        small_archive,
        "--weights",
        minilm_dir,
        "--train-size",
        0,
        "--test-size",
        0,
        "--max-len",
        64,
        "--batch-size",
        8,
        "--epochs",
        2,
        "--no-compile",
        "--out",
        out,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test accuracy" in proc.stdout and "epoch 2/2" in proc.stderr  # tqdm bars go to stderr
    from fnlm.data import load_imdb

    test = load_imdb(small_archive, "test")
    metrics = check_run_dir(out, test.texts, test.labels, 64)
    # a tenth of the 24 training reviews is the validation slice (not trained on)
    assert metrics["train_size"] == 22 and metrics["val_size"] == 2 and metrics["test_size"] == 24
    assert metrics["steps"] == 6 and [e["step"] for e in metrics["evals"]] == [2, 3, 4, 6]  # every 2 steps + epoch ends


def test_finetune_a_roberta_directory_end_to_end(small_archive, tmp_path):
    """--weights a RoBERTa directory (random weights, a byte-level BPE tokenizer trained here): the main
    job fine-tunes it and saves a directory that transformers' RobertaForSequenceClassification loads,
    with the label names, giving fnlm's logits on the same ids."""
    transformers = pytest.importorskip("transformers")
    from fnlm.data import load_imdb

    texts = load_imdb(small_archive, "train").texts
    bpe = byte_level_bpe(tmp_path / "bpe", texts, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], vocab_size=300)
    weights = tmp_path / "roberta"
    hf_tok = transformers.RobertaTokenizerFast(vocab=str(bpe / "vocab.json"), merges=str(bpe / "merges.txt"))
    hf_tok.save_pretrained(str(weights))
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=hf_tok.pad_token_id,
        bos_token_id=hf_tok.cls_token_id,
        eos_token_id=hf_tok.sep_token_id,
    )
    transformers.RobertaModel(cfg, add_pooling_layer=False).save_pretrained(str(weights))

    out = tmp_path / "run"
    flags = ("--train-size", 0, "--test-size", 0, "--max-len", 64, "--batch-size", 8, "--no-compile")
    proc = run_script("--data", small_archive, "--weights", weights, *flags, "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["train_size"] == 22
        and metrics["test_size"] == 24
        and metrics["model_config"]["model_type"] == "roberta"
    )

    from fnlm.models import classifier_logits, load_classifier

    hf = transformers.RobertaForSequenceClassification.from_pretrained(str(out)).eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    test = load_imdb(small_archive, "test").texts[:6]
    enc = transformers.AutoTokenizer.from_pretrained(str(out))(
        test, padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    params, cfg = load_classifier(out)
    with torch.no_grad():
        ours = classifier_logits(params, enc["input_ids"], cfg, attention_mask=enc["attention_mask"])
        torch.testing.assert_close(ours, hf(**enc).logits, atol=1e-4, rtol=0)
        hf_probs = torch.softmax(hf(**enc).logits, -1)

    # classify.py --predict on the RoBERTa run prints transformers' label and probability
    proc = run_script("--model", out, "--predict", test[0], timeout=120, script=CLASSIFY)
    assert proc.returncode == 0, proc.stderr
    label, p, _ = proc.stdout.strip().split("\t")
    assert label == ("neg", "pos")[int(hf_probs[0].argmax())] and float(p) == pytest.approx(
        float(hf_probs[0].max()), abs=1e-4
    )

    # LoRA is BERT's only here: one line, before any training
    proc = run_script(
        "--data", small_archive, "--weights", weights, *flags, "--lora-rank", 4, "--out", tmp_path / "lora", timeout=120
    )
    assert (
        proc.returncode == 2 and "--lora-rank and --remat need a BERT" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_same_seed_same_result(small_archive, minilm_dir, tmp_path):
    """Randomness is key-based: the same --seed gives the same losses and accuracy (CPU)."""
    runs = []
    for name in ("a", "b"):
        proc = run_script(
            "--data",
            small_archive,
            "--weights",
            minilm_dir,
            "--train-size",
            16,
            "--test-size",
            8,
            "--max-len",
            32,
            "--batch-size",
            8,
            "--no-compile",
            "--out",
            tmp_path / name,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0]["train_loss_per_step"] == runs[1]["train_loss_per_step"]
    assert runs[0]["final_test_accuracy"] == runs[1]["final_test_accuracy"]


def test_finetune_shared_archive(imdb_archive, minilm_dir, tmp_path):
    """The same on a few dozen real reviews of the shared archive, with the compiled steps."""
    out = tmp_path / "run"
    proc = run_script(
        "--data",
        imdb_archive,
        "--weights",
        minilm_dir,
        "--train-size",
        32,
        "--test-size",
        32,
        "--max-len",
        64,
        "--out",
        out,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from fnlm.data import load_imdb, subset

    test = subset(load_imdb(imdb_archive, "test"), 32, seed=0)
    check_run_dir(out, test.texts, test.labels, 64)


# ----------------------------------------------------------------------------- bad input
def assert_clean_failure(proc: subprocess.CompletedProcess, out: Path, *patterns: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: "), proc.stderr
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in {err!r}"
    assert not out.exists()
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def test_missing_data(minilm_dir, tmp_path):
    out = tmp_path / "runs" / "x"
    proc = run_script("--data", tmp_path / "nope.tar.gz", "--weights", minilm_dir, "--out", out, timeout=120)
    assert_clean_failure(proc, out, r"nope\.tar\.gz", "does not exist")


def test_wrong_layout_archive(minilm_dir, tmp_path):
    bad = tmp_path / "other.tar.gz"
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("not reviews")
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(tmp_path / "stuff", arcname="stuff")
    out = tmp_path / "runs" / "x"
    proc = run_script("--data", bad, "--weights", minilm_dir, "--out", out, timeout=120)
    assert_clean_failure(proc, out, r"other\.tar\.gz", "layout")


def test_truncated_archive(small_archive, minilm_dir, tmp_path):
    cut = tmp_path / "cut.tar.gz"
    data = small_archive.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "runs" / "x"
    proc = run_script("--data", cut, "--weights", minilm_dir, "--out", out, timeout=120)
    assert_clean_failure(proc, out, r"cut\.tar\.gz")


def test_weights_without_config(small_archive, minilm_dir, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(minilm_dir / "vocab.txt", weights / "vocab.txt")
    out = tmp_path / "runs" / "x"
    # (the data are read first, since the label names size the head: this archive's sizes are valid)
    proc = run_script(
        "--data", small_archive, "--train-size", 0, "--test-size", 0, "--weights", weights, "--out", out, timeout=120
    )
    assert_clean_failure(proc, out, "config.json")


def test_max_len_above_position_table(small_archive, minilm_dir, tmp_path):
    out = tmp_path / "runs" / "x"
    proc = run_script(
        "--data",
        small_archive,
        "--train-size",
        0,
        "--test-size",
        0,
        "--weights",
        minilm_dir,
        "--max-len",
        1024,
        "--out",
        out,
        timeout=120,
    )
    assert_clean_failure(proc, out, "--max-len 1024", "max_position_embeddings=512")


# ----------------------------------------------------------------------------- real fine-tuning
@pytest.mark.slow
def test_finetune_minilm_learns(minilm_imdb_run):
    """MiniLM fine-tuned on 400 real training reviews (128 tokens, 2 epochs; conftest's minilm_imdb_run)
    classifies 400 held-out test reviews well above chance (0.5). This only proves learning; the default
    run's accuracy is measured on the benchmarks page."""
    metrics = json.loads((minilm_imdb_run / "metrics.json").read_text())
    assert metrics["test_size"] == 400 and metrics["train_size"] == 400
    assert metrics["final_test_accuracy"] >= 0.75, metrics["epochs"]
