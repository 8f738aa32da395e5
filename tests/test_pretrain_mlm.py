"""examples/pretrain_mlm.py: continued MLM pretraining end to end on a tiny model and archive
(in-process, eager), the HF BertForMaskedLM output, fill-mask equal to transformers' pipeline,
the test split never read, one-line errors; slow: pretrain MiniLM briefly, then fine-tune it."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnlm import random
from fnlm.data import load_tokenizer
from fnlm.models import bert_mlm, load_bert
from test_finetune_imdb import write_imdb_archive

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pretrain_mlm", ROOT / "examples" / "pretrain_mlm.py")
pm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pm)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def run(*argv, capsys):
    rc = pm.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_dir):
    """A small random BertModel (pooler, no MLM head) with MiniLM's real WordPiece tokenizer."""
    d = tmp_path_factory.mktemp("tiny_bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz", n_per_class=6)


def test_pretrain_then_fill_mask_equals_the_hf_pipeline(tiny_bert, archive, tmp_path, capsys, monkeypatch):
    read = []
    real_load = pm.load_imdb_splits
    monkeypatch.setattr(pm, "load_imdb_splits", lambda p, splits: read.append(tuple(splits)) or real_load(p, splits))
    out = tmp_path / "mlm"
    rc, o, err = run("--data", archive, "--weights", tiny_bert, "--steps", 4, "--batch-size", 4, "--max-len", 32,
                     "--eval-every", 2, "--eval-size", 4, "--whole-word", "--no-compile", "--lr", 1e-3, "--out", out,
                     capsys=capsys)
    assert rc == 0, err
    assert "has no MLM head (cls.predictions); training a freshly initialised one, tied" in o
    assert read and all("test" not in s for s in read)  # the test split's text is never even loaded
    metrics = json.loads((out / "metrics.json").read_text())
    hist = metrics["history"]
    assert [h["step"] for h in hist] == [0, 2, 4] and metrics["fresh_mlm_head"] is True
    assert hist[-1]["mlm_loss"] < hist[0]["mlm_loss"]  # a fresh head over 30k words learns fast at first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # HF BertForMaskedLM layout (plus the source's pooler, so the run can be fine-tuned as a classifier)
    hf, info = transformers.BertForMaskedLM.from_pretrained(str(out), output_loading_info=True,
                                                            attn_implementation="eager")
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith("bert.pooler.") for k in info["unexpected_keys"])
    params, cfg = load_bert(out, head="mlm")
    tok = load_tokenizer(out)
    b = tok.encode(["the film was [MASK] .", "a [MASK] and moving story"])
    with torch.no_grad():
        ref = hf.eval()(**b).logits
    assert (bert_mlm(params, b["input_ids"], cfg, attention_mask=b["attention_mask"]) - ref).abs().max() <= 1e-5
    load_bert(out, head="classifier", head_key=random.key(0))  # what finetune_imdb.py --weights does

    text = "the film was [MASK] ."
    rc, o, _ = run("--model", out, "--predict", text, "--top-k", 5, capsys=capsys)
    assert rc == 0
    mine = [line.strip().split("\t") for line in o.splitlines()[1:]]
    pipe = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), top_k=5, device="cpu")
    theirs = pipe(text)
    assert [m[1] for m in mine] == [t["token_str"] for t in theirs]
    assert [m[2] for m in mine] == [t["sequence"] for t in theirs]
    for m, t in zip(mine, theirs):
        assert abs(float(m[0]) - t["score"]) <= 1e-4  # printed with 4 decimals
    exact = pm.fill_mask(params, cfg, tok, text, 5)[0]
    assert max(abs(p - t["score"]) for (_, p, _), t in zip(exact, theirs)) <= 1e-5


def test_nsp_writes_a_bert_for_pretraining_with_both_losses(tiny_bert, archive, tmp_path, capsys, monkeypatch):
    read = []
    real_load = pm.load_imdb_splits
    monkeypatch.setattr(pm, "load_imdb_splits", lambda p, splits: read.append(tuple(splits)) or real_load(p, splits))
    out = tmp_path / "nsp"
    rc, o, err = run("--data", archive, "--weights", tiny_bert, "--nsp", "--steps", 3, "--batch-size", 4,
                     "--max-len", 32, "--eval-every", 3, "--eval-size", 4, "--no-compile", "--lr", 1e-3, "--out", out,
                     capsys=capsys)
    assert rc == 0, err
    assert read and all("test" not in s for s in read)
    assert "no NSP head (cls.seq_relationship); training a fresh one" in o and "BertForPreTraining" in o
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in hist] == [0, 3]
    assert all(h["nsp_pairs"] >= 1 and 0.0 <= h["nsp_accuracy"] <= 1.0 and h["nsp_loss"] > 0 for h in hist)
    hf, info = transformers.BertForPreTraining.from_pretrained(str(out), output_loading_info=True,
                                                               attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    params, cfg = load_bert(out, head="pretraining")
    assert set(params) == {"bert", "mlm", "nsp"}


def test_bad_input_is_one_line(tiny_bert, minilm_dir, archive, tmp_path, capsys):
    cases = [
        (("--data", archive, "--weights", tiny_bert, "--max-len", 32, "--splits", "train,test", "--out", tmp_path / "o"),
         "refusing to pretrain on the IMDb test split's text"),
        (("--model", minilm_dir, "--predict", "the film was [MASK] ."), "no MLM head (cls.predictions) to fill"),
        (("--data", tmp_path / "nope.tar.gz", "--weights", tiny_bert, "--max-len", 32, "--out", tmp_path / "o"),
         "not found"),
        (("--data", archive, "--weights", tiny_bert, "--max-len", 100, "--out", tmp_path / "o"),
         "longer than the model's position table"),
    ]
    for argv, msg in cases:
        rc, _, err = run(*argv, capsys=capsys)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_pretrain_minilm_briefly_then_finetune(imdb_archive, minilm_dir, tmp_path):
    """MiniLM's fresh MLM head learns in-domain (held-out loss falls), and finetune_imdb.py fine-tunes the result."""
    env_run = lambda script, *a: subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, a)],
                                                cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = tmp_path / "mlm"
    p = env_run("pretrain_mlm.py", "--data", imdb_archive, "--weights", minilm_dir, "--steps", 15, "--batch-size", 8,
                "--max-len", 64, "--train-size", 1000, "--eval-size", 32, "--eval-every", 15, "--lr", 1e-4,
                "--no-compile", "--out", out)
    assert p.returncode == 0, p.stderr[-2000:]
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert hist[-1]["mlm_loss"] < hist[0]["mlm_loss"] - 0.5
    f = env_run("finetune_imdb.py", "--data", imdb_archive, "--weights", out, "--train-size", 1000, "--test-size", 200,
                "--max-len", 64, "--no-compile", "--out", tmp_path / "ft")
    assert f.returncode == 0, f.stderr[-2000:]
    acc = float(re.search(r"test accuracy (\d\.\d+)", f.stdout)[1])
    assert acc >= 0.70, f.stdout[-1000:]  # chance 0.5; MiniLM itself reaches >= 0.80 on 1,000 at 256 tokens
