"""examples/pretrain_gpt.py end to end, run as a user runs it (a subprocess): a tiny configuration on a
few hundred synthetic reviews (every output file, Hugging Face reload, SIGINT then exact resume,
extending a finished run, --config round trip, generation, one-line errors), and (slow) a real run
on IMDb that beats the add-one bigram baseline."""

from __future__ import annotations

import json
import shutil
import signal
import tarfile
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import (
    EXAMPLES,
    GPT_TINY,
    corrupt,
    newest_checkpoint,
    popen_example,
    run_example,
    wait_for,
)
from safetensors.torch import load_file

from fnlm.models import gpt2, load_gpt2

SCRIPT = EXAMPLES / "pretrain_gpt.py"
WORDS = (
    "film movie plot actor scene great bad boring funny story music ending character director camera "
    "love hate watch again never best worst script twist cast"
).split()
TEST_ONLY = "zyxwvtestonly"  # appears only in the test split: the tokenizer must never learn it
TINY = GPT_TINY


def run(*args, script: Path = SCRIPT, timeout: float = 600):
    return run_example(script, *args, timeout=timeout)


def popen(*args):
    return popen_example(SCRIPT, *args)


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same model and the same per-step losses and evaluations."""
    ta, tb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["history"] == mb["history"] and ma["evals"] == mb["evals"]


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


@pytest.fixture(scope="module")
def tiny_run(archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "gpt"
    p = run("--data", archive, "--out", out, *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_tiny_run_writes_every_output(tiny_run):
    out = tiny_run
    for f in (
        "tokenizer/tokenizer.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
        "curves.png",
        "samples.txt",
        "metrics.json",
        "metrics.jsonl",
        "run_config.json",
        "environment.json",
        "README.md",
    ):
        assert (out / f).is_file(), f
    assert not (out.parent / ".gpt.partial").exists()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "samples.txt").read_text().split("\n\n")
    assert [s.split(" ")[0] for s in samples] == ["This", "I", "The", "My"]  # the script's four prompts
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 10 and [e["step"] for e in m["evals"]] == [5, 10]
    assert m["val_perplexity"] == pytest.approx(torch.tensor(m["val_loss"]).exp().item())
    assert 1 < m["bigram_val_perplexity"] < 300 and m["val_perplexity"] > 1
    vocab = json.loads((out / "tokenizer/tokenizer.json").read_text())["model"]["vocab"]
    assert not any("zyx" in t or "testonly" in t for t in vocab)  # the test split's text was never read
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 11))
    assert [r["val_loss"] for r in lines if r["kind"] == "eval"] == [e["val_loss"] for e in m["evals"]]
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["pipeline_tag"] == "text-generation" and front["datasets"] == ["imdb"]
    assert json.loads((out / "environment.json").read_text())["torch"] == torch.__version__


def test_model_loads_in_transformers_with_the_same_logits(tiny_run):
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_run / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_run / "model")
    ids = tok("great film, boring plot", return_tensors="pt").input_ids
    params, cfg = load_gpt2(tiny_run / "model")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, gpt2(params, ids, cfg), atol=1e-4, rtol=0)
    assert tok.decode(ids[0]) == "great film, boring plot"


LONGER = [a if a != "10" else "300" for a in TINY]  # 300 steps: time to interrupt after step 4


@pytest.fixture(scope="module")
def long_run(archive, tmp_path_factory) -> Path:
    """The uninterrupted 300-step run the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("ref") / "gpt"
    p = run("--data", archive, "--out", out, *LONGER)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_sigint_then_resume_is_exact(archive, long_run, tmp_path):
    """SIGINT mid-run: the step finishes, a checkpoint is written, exit 130 with the resume command;
    --resume then ends bitwise as the uninterrupted run (eager CPU steps are deterministic)."""
    out, ck = tmp_path / "gpt", tmp_path / ".gpt.partial" / "checkpoints"
    p = popen("--data", archive, "--out", out, *LONGER)
    wait_for(ck / "step-00000004", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(f"--resume {out} --no-compile")
    assert not out.exists() and 4 <= int(sorted(ck.glob("step-*"))[-1].name[5:]) < 300
    res = run("--resume", out, "--no-compile")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    assert not ck.parent.exists()
    assert_same_run(long_run, out)


def test_sigkill_then_corrupted_newest_checkpoint_resume_is_exact(archive, long_run, tmp_path):
    """SIGKILL after the second checkpoint (no chance to clean up), then the newest checkpoint
    damaged: --resume warns, falls back to the one before and still ends as the uninterrupted run."""
    out, ck = tmp_path / "gpt", tmp_path / ".gpt.partial" / "checkpoints"
    p = popen("--data", archive, "--out", out, *LONGER)
    wait_for(ck / "step-00000008", p)
    p.kill()
    p.communicate()
    newest = newest_checkpoint(ck)
    assert not out.exists() and 8 <= int(newest.name[5:]) < 300 and len(list(ck.glob("step-*"))) >= 2
    corrupt(newest / "tensors.safetensors")
    res = run("--resume", out, "--no-compile")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    assert f"skipping checkpoint {newest.name}" in res.stderr and "checksum mismatch" in res.stderr
    assert not ck.parent.exists()
    assert_same_run(long_run, out)


def test_stop_after_then_resume_with_more_steps_extends_the_run(archive, tiny_run, tmp_path):
    """--stop-after 6, then --resume with --steps 10 (the run's own); then the finished run extended
    with --steps 14: the step count given on resume is the one trained to."""
    out = tmp_path / "gpt"
    p = run("--data", archive, "--out", out, *TINY, "--stop-after", "6")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not out.exists() and (tmp_path / ".gpt.partial" / "checkpoints" / "step-00000006").is_dir()
    p = run("--resume", out, "--steps", "10", "--no-compile")
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_run(tiny_run, out)
    p = run("--resume", out, "--steps", "14", "--no-compile")
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 14 and [h["step"] for h in m["history"]] == list(range(1, 15))
    assert json.loads((out / "run_config.json").read_text())["steps"] == 14
    p = run("--resume", out, "--steps", "12", "--no-compile")
    assert p.returncode == 2 and "--steps can only be raised" in p.stderr
    p = run("--resume", out, "--steps", "20", "--lr", "1e-3", "--no-compile")
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--lr differs" in p.stderr


def test_config_file_plus_a_flag_is_what_print_config_shows_and_the_run_stores(archive, tmp_path):
    cfg_file = tmp_path / "gpt.json"
    cfg_file.write_text(
        json.dumps(
            {
                "data": str(archive),
                "steps": 3,
                "eval_every": 3,
                "save_every": 3,
                "val_reviews": 40,
                "val_tokens": 256,
                "vocab_size": 300,
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 16,
                "block_size": 16,
                "batch_size": 4,
                "max_new_tokens": 4,
                "compile": False,
                "lr": 0.01,
            }
        )
    )
    out = tmp_path / "gpt"
    printed = run("--config", cfg_file, "--lr", "0.005", "--out", out, "--print-config")
    assert printed.returncode == 0, printed.stderr
    shown = json.loads(printed.stdout)
    assert shown["lr"] == 0.005 and shown["steps"] == 3 and not out.exists()
    p = run("--config", cfg_file, "--lr", "0.005", "--out", out)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((out / "run_config.json").read_text()) == shown


def test_generate_from_a_run(tiny_run):
    p = run("--model", tiny_run, "--generate", "great film", "the", "--max-new-tokens", "5")
    assert p.returncode == 0, p.stderr
    printed = p.stdout.strip().split("\n\n")
    assert len(printed) == 2 and printed[0].startswith("great film") and printed[1].startswith("the")


@pytest.mark.parametrize(
    "argv, names",
    [
        (("--dropout", "1.5"), "--dropout"),
        (("--lr", "-1e-4"), "--lr"),
        (("--weight-decay", "-1"), "--weight-decay"),
        (("--top-p", "0"), "--top-p"),
        (("--generate", "hi"), "--generate needs --model"),
        (("--data", "nope.tar.gz"), "--data"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(argv, names, tmp_path):
    out = tmp_path / "runs" / "gpt"
    p = run(*argv, "--out", out, *TINY, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], p.stderr
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


def test_bad_resume_and_model_are_one_line(tmp_path):
    for argv, msg in (
        (("--resume", tmp_path / "empty"), "no run there"),
        (("--model", tmp_path, "--generate", "hi"), "no config.json"),
    ):
        p = run(*argv, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], p.stderr


@pytest.mark.slow
def test_pretraining_on_imdb_beats_the_bigram_baseline(imdb_archive, tmp_path):
    """The default model, shortened to 800 of its 6000 steps, run eagerly (the compiled step is tested
    elsewhere) on 5,000 real IMDb training reviews (about one pass of 800 x 16 x 128 tokens) and validated
    once, to fit the slow-test budget; the bigram baseline counts the same reviews."""
    out = tmp_path / "gpt"
    args = ("--train-reviews", "5000", "--steps", "800", "--eval-every", "800", "--no-compile")
    p = run("--data", imdb_archive, "--out", out, *args, timeout=2400)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_perplexity"] < m["bigram_val_perplexity"], m
