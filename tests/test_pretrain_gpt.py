"""examples/pretrain_gpt.py end to end: a tiny configuration on a few hundred synthetic reviews
(every output file, Hugging Face reload, exact resume, generation, bad input), and (slow) a real
run on IMDb that beats the add-one bigram baseline."""
from __future__ import annotations

import importlib.util
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import transformers

from fnlm.models import gpt2, load_gpt2

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("film movie plot actor scene great bad boring funny story music ending character director camera "
         "love hate watch again never best worst script twist cast").split()
TEST_ONLY = "zyxwvtestonly"  # appears only in the test split: the tokenizer must never learn it


def load_example():
    spec = importlib.util.spec_from_file_location("pretrain_gpt", ROOT / "examples" / "pretrain_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """An aclImdb look-alike: 300 training reviews (word salad with structure), 20 test reviews."""
    base = tmp_path_factory.mktemp("imdb")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 150), ("test", 10)):
        for sent, rating in (("pos", 8), ("neg", 2)):
            d = base / "aclImdb" / split / sent
            d.mkdir(parents=True)
            for i in range(n):
                idx = torch.randint(0, len(WORDS), (12,), generator=g).tolist()
                text = " ".join(WORDS[j] for j in idx) + ("<br /><br />the end." if i % 3 == 0 else ".")
                if split == "test":
                    text = f"{TEST_ONLY} {TEST_ONLY} {text} {TEST_ONLY}"
                (d / f"{i}_{rating}.txt").write_text(text)
    path = base / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(base / "aclImdb", arcname="aclImdb")
    shutil.rmtree(base / "aclImdb")
    return path


TINY = ["--val-reviews", "40", "--val-tokens", "256", "--vocab-size", "300", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--block-size", "16", "--batch-size", "4", "--steps", "10", "--eval-every", "5", "--save-every", "4",
        "--warmup", "2", "--max-new-tokens", "8", "--no-compile"]


@pytest.fixture(scope="module")
def tiny_run(example, archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "gpt"
    assert example.main(["--data", str(archive), "--out", str(out), *TINY]) == 0
    return out


def test_tiny_run_writes_every_output(tiny_run, example):
    out = tiny_run
    for f in ("tokenizer/tokenizer.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json",
              "model/tokenizer_config.json", "curves.png", "samples.txt", "metrics.json"):
        assert (out / f).is_file(), f
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "samples.txt").read_text().split("\n\n")
    assert [s.split(" ")[0] for s in samples] == [p.split(" ")[0] for p in example.PROMPTS]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 10 and [e["step"] for e in m["evals"]] == [5, 10]
    assert m["val_perplexity"] == pytest.approx(torch.tensor(m["val_loss"]).exp().item())
    assert 1 < m["bigram_val_perplexity"] < 300 and m["val_perplexity"] > 1
    vocab = json.loads((out / "tokenizer/tokenizer.json").read_text())["model"]["vocab"]
    assert not any("zyx" in t or "testonly" in t for t in vocab)  # the test split's text was never read


def test_model_loads_in_transformers_with_the_same_logits(tiny_run):
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_run / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_run / "model")
    ids = tok("great film, boring plot", return_tensors="pt").input_ids
    params, cfg = load_gpt2(tiny_run / "model")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, gpt2(params, ids, cfg), atol=1e-4, rtol=0)
    assert tok.decode(ids[0]) == "great film, boring plot"


def test_resume_is_exact(example, archive, tiny_run, tmp_path):
    out = tmp_path / "gpt"
    assert example.main(["--data", str(archive), "--out", str(out), *TINY, "--stop-after", "6"]) == 0
    assert not (out / "model").exists() and (out / "checkpoints").is_dir()
    assert example.main(["--resume", str(out), "--data", str(archive), "--no-compile"]) == 0
    a, _ = load_gpt2(tiny_run / "model")
    b, _ = load_gpt2(out / "model")
    assert all(torch.equal(x, y) for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)))
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tiny_run, out))
    assert ma["history"] == mb["history"] and ma["evals"] == mb["evals"]


def test_generate_from_a_run(example, tiny_run, capsys):
    assert example.main(["--model", str(tiny_run), "--generate", "great film", "the", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip().split("\n\n")
    assert len(printed) == 2 and printed[0].startswith("great film") and printed[1].startswith("the")


def test_bad_input(example, archive, tmp_path, capsys):
    assert example.main(["--data", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert example.main(["--resume", str(tmp_path / "empty")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert example.main(["--model", str(tmp_path), "--generate", "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example.main(["--generate", "hi"])
    assert "--generate needs --model" in capsys.readouterr().err


@pytest.mark.slow
def test_pretraining_on_imdb_beats_the_bigram_baseline(example, imdb_archive, tmp_path):
    """The default configuration, shortened to 800 of its 6000 steps and run eagerly (the compiled
    step is tested elsewhere) to fit the slow-test budget, on the real IMDb train split."""
    out = tmp_path / "gpt"
    assert example.main(["--data", str(imdb_archive), "--out", str(out), "--steps", "800", "--eval-every", "400",
                         "--no-compile"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_perplexity"] < m["bigram_val_perplexity"], m
