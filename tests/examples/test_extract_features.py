"""examples/extract_features.py: embeddings of command-line texts, text files and IMDb, the
linear probe, nearest neighbours, and its one-line errors. Run as a subprocess, as a user runs it
(eager forward, a tiny archive); the slow test probes a few hundred real reviews."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_imdb_archive
from safetensors import safe_open
from safetensors.torch import load_file

from fnlm.data import load_tokenizer
from fnlm.models import load_bert, sentence_embedding

ROOT = Path(__file__).resolve().parents[2]


def run(*argv, capsys):
    """The script as a user runs it: a subprocess (capsys is unused, kept for the call sites)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "extract_features.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    params, cfg = load_bert(minilm_dir)
    return params, cfg, load_tokenizer(minilm_dir)


def reference(minilm, texts, max_len=256):
    params, cfg, tok = minilm
    b = tok.encode(texts, max_len=max_len)
    with torch.no_grad():
        return sentence_embedding(
            params, b["input_ids"], cfg, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
        )


def test_texts_and_file(minilm, minilm_dir, tmp_path, capsys):
    texts = ["A wonderful film.", "Two hours I will never get back, sadly.", "ok"]
    out = tmp_path / "e.safetensors"
    rc, o, _ = run("--texts", *texts, "--weights", minilm_dir, "--no-compile", "--out", out, capsys=capsys)
    assert rc == 0 and "embedded 3 texts (384 features)" in o
    t = load_file(out)
    assert t["ids"].tolist() == [0, 1, 2]
    assert (t["embeddings"] - reference(minilm, texts)).abs().max() <= 1e-5
    f = tmp_path / "s.txt"
    f.write_text(f"{texts[0]}\n\n  {texts[1]}  \n", encoding="utf-8")
    rc, _, _ = run(
        "--file",
        f,
        "--weights",
        minilm_dir,
        "--no-compile",
        "--out",
        out,
        "--layers=-2,-1",
        "--combine",
        "mean",
        "--pooling",
        "max",
        capsys=capsys,
    )
    t = load_file(out)
    assert rc == 0 and t["ids"].tolist() == [1, 3]  # line numbers of the non-blank lines
    params, cfg, tok = minilm
    b = tok.encode(texts[:2])
    with torch.no_grad():
        ref = sentence_embedding(
            params,
            b["input_ids"],
            cfg,
            attention_mask=b["attention_mask"],
            layers=[-2, -1],
            combine="mean",
            pooling="max",
        )
    assert (t["embeddings"] - ref).abs().max() <= 1e-5
    with safe_open(out, "pt") as fh:
        assert fh.metadata()["pooling"] == "max"


def test_bf16_embeddings_stay_within_cosine_0999_of_float32(minilm, minilm_dir, tmp_path, capsys):
    texts = [
        "A wonderful film.",
        "Two hours I will never get back, sadly.",
        "The plot made no sense at all but the acting was superb and the music unforgettable.",
    ]
    out = tmp_path / "e.safetensors"
    rc, o, _ = run(
        "--texts", *texts, "--weights", minilm_dir, "--no-compile", "--dtype", "bf16", "--out", out, capsys=capsys
    )
    assert rc == 0, o
    e, ref = load_file(out)["embeddings"], reference(minilm, texts)
    assert e.dtype == torch.float32 and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-6)
    cos = (e * ref).sum(-1)
    assert cos.min() >= 0.999 and (e - ref).abs().max() > 1e-5  # close, and really computed in bf16
    with safe_open(out, "pt") as fh:
        assert fh.metadata()["dtype"] == "bf16"


def test_imdb_probe_then_similar(minilm, minilm_dir, tmp_path, capsys):
    archive = write_imdb_archive(tmp_path / "aclImdb_v1.tar.gz", n_per_class=6)
    out = tmp_path / "imdb.safetensors"
    common = (
        "--imdb",
        "--data",
        archive,
        "--size",
        0,
        "--weights",
        minilm_dir,
        "--no-compile",
        "--max-len",
        32,
        "--out",
        out,
    )
    rc, o, _ = run(*common, "--probe", capsys=capsys)
    assert rc == 0, o
    acc = float(re.search(r"test accuracy (\d\.\d+)", o)[1])
    assert acc >= 0.75  # 12 short, clearly worded reviews per split
    t = load_file(out)
    assert t["train.embeddings"].shape == (12, 384) and t["test.labels"].tolist() == [0] * 6 + [1] * 6
    from fnlm.data import html_clean, load_imdb

    test = load_imdb(archive, "test")
    i = int(t["test.index"][7])
    assert (t["test.embeddings"][7] - reference(minilm, [html_clean(test.texts[i])], 32)[0]).abs().max() <= 1e-5
    rc, o, _ = run(*common, "--probe", capsys=capsys)  # the same settings: the file is reused
    assert rc == 0 and f"using the embeddings in {out}" in o
    rc, o, _ = run(*common, "--probe", "--layers=-2,-1", capsys=capsys)  # other vectors: embedded anew
    assert rc == 0 and "using the embeddings" not in o and "embedded 24 reviews" in o
    rc, o, _ = run(*common, "--probe", capsys=capsys)
    assert rc == 0 and "using the embeddings" not in o  # back to the last layer: the file held --layers=-2,-1
    rc, o, _ = run(*common, "--similar", "a wonderful and moving film", "--top-k", 3, capsys=capsys)
    lines = o.strip().splitlines()
    assert rc == 0 and len(lines) == 3
    scores = [float(x.split("\t")[0]) for x in lines]
    assert scores == sorted(scores, reverse=True) and "wonderful" in lines[0] and "/pos/" in lines[0]


def test_probe_reaches_100_percent_on_separable_toy_embeddings():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    direction = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    x = 0.05 * torch.randn(400, 32, generator=g)  # unit-norm-embedding scale
    x = x + ((2 * y - 1) * (0.05 + (x @ direction).abs()))[:, None] * direction  # class sign along direction
    assert ((x @ direction > 0) == (y == 1)).all()  # linearly separable, margin >= 0.05
    from fnlm.models import fit_linear_probe, linear_probe_logits

    probe = fit_linear_probe(x[:200], y[:200])
    for xs, ys in ((x[:200], y[:200]), (x[200:], y[200:])):
        assert (linear_probe_logits(probe, xs).argmax(-1) == ys).all()
    assert torch.equal(fit_linear_probe(x[:200], y[:200])["w"], probe["w"])  # pure: same inputs, same probe


def test_bad_input_is_one_line(minilm_dir, tmp_path, capsys):
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    latin.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    out = tmp_path / "e.safetensors"
    cases = [
        (("--file", empty), "no text in the file"),
        (("--file", latin), "not UTF-8 text"),
        (("--imdb", "--similar", "a film"), "no embeddings file"),
        (("--texts", "hi", "--layers", "7"), "layer index 7 is out of range"),
    ]
    for argv, msg in cases:
        rc, _, err = run(*argv, "--weights", minilm_dir, "--no-compile", "--out", out, capsys=capsys)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(".e.safetensors*"))


@pytest.mark.slow
def test_probe_on_real_embeddings_beats_chance(imdb_archive, minilm_dir, tmp_path, capsys):
    rc, o, _ = run(
        "--imdb",
        "--data",
        imdb_archive,
        "--size",
        300,
        "--max-len",
        128,
        "--weights",
        minilm_dir,
        "--probe",
        "--out",
        tmp_path / "e.safetensors",
        capsys=capsys,
    )
    acc = float(re.search(r"test accuracy (\d\.\d+)", o)[1])
    assert rc == 0 and acc >= 0.65, o  # chance is 0.5 on the balanced 300 test reviews
