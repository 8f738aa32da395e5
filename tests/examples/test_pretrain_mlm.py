"""examples/pretrain_mlm.py run as a user runs it (a subprocess), on a tiny model and archive (eager):
the HF BertForMaskedLM output, fill-mask equal to transformers' pipeline, the test split never read,
SIGINT then exact resume, the --config round trip, one-line errors; slow: pretrain MiniLM briefly,
then fine-tune it."""

from __future__ import annotations

import json
import re
import shutil
import signal
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import (
    EXAMPLES,
    ROOT,
    corrupt,
    newest_checkpoint,
    popen_example,
    run_example,
    wait_for,
)
from safetensors.torch import load_file

from fnlm import random
from fnlm.data import load_tokenizer
from fnlm.models import bert_mlm, bert_pretraining, load_bert

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SCRIPT = EXAMPLES / "pretrain_mlm.py"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORDS = (
    "the film movie plot actor scene great bad boring funny story music ending character director love hate "
    "watch again never best worst script twist cast"
).split()


def run(*args, script: Path = SCRIPT, timeout: float = 600):
    return run_example(script, *args, timeout=timeout)


def popen(*args):
    return popen_example(SCRIPT, *args)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_dir):
    """A small random BertModel (pooler, no MLM head) with MiniLM's real WordPiece tokenizer."""
    d = tmp_path_factory.mktemp("tiny_bert")
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """An aclImdb look-alike whose test reviews are not UTF-8: reading them at all would fail the run."""
    base = tmp_path_factory.mktemp("imdb")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for sent, rating in (("pos", 8), ("neg", 2)):
            d = base / "aclImdb" / split / sent
            d.mkdir(parents=True)
            for i in range(10):
                text = " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (14,), generator=g).tolist()) + "."
                (d / f"{i}_{rating}.txt").write_bytes(text.encode() if split == "train" else b"\xff\xfe test \x80")
    path = base / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(base / "aclImdb", arcname="aclImdb")
    shutil.rmtree(base / "aclImdb")
    return path


def tiny(archive, tiny_bert, steps: int = 4) -> list:
    return [
        "--data",
        archive,
        "--weights",
        tiny_bert,
        "--steps",
        steps,
        "--batch-size",
        4,
        "--max-len",
        32,
        "--eval-every",
        2,
        "--eval-size",
        4,
        "--whole-word",
        "--no-compile",
        "--lr",
        1e-3,
    ]


def test_pretrain_then_fill_mask_equals_the_hf_pipeline(tiny_bert, archive, tmp_path):
    out = tmp_path / "mlm"
    p = run(*tiny(archive, tiny_bert), "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "has no MLM head (cls.predictions); training a freshly initialised one, tied" in p.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    hist = metrics["history"]
    assert [h["step"] for h in hist] == [0, 2, 4] and metrics["fresh_mlm_head"] is True
    assert hist[-1]["mlm_loss"] < hist[0]["mlm_loss"]  # a fresh head over 30k words learns fast at first
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]
    for f in ("README.md", "run_config.json", "metrics.jsonl", "environment.json"):
        assert (out / f).is_file(), f
    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["mlm_loss"] for r in logged if r["kind"] == "eval"] == [h["mlm_loss"] for h in hist]

    # HF BertForMaskedLM layout (plus the source's pooler, so the run can be fine-tuned as a classifier)
    hf, info = transformers.BertForMaskedLM.from_pretrained(
        str(out), output_loading_info=True, attn_implementation="eager"
    )
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
    p = run("--model", out, "--predict", text, "--top-k", 5)
    assert p.returncode == 0, p.stderr
    mine = [line.strip().split("\t") for line in p.stdout.splitlines()[1:]]
    pipe = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), top_k=5, device="cpu")
    theirs = pipe(text)
    assert [m[1] for m in mine] == [t["token_str"] for t in theirs]
    assert [m[2] for m in mine] == [t["sequence"] for t in theirs]
    for m, t in zip(mine, theirs):
        assert abs(float(m[0]) - t["score"]) <= 1e-4  # printed with 4 decimals


def _long(archive, tiny_bert) -> list:
    return tiny(archive, tiny_bert, steps=150) + ["--eval-every", 75, "--save-every", 3]


@pytest.fixture(scope="module")
def long_run(tiny_bert, archive, tmp_path_factory) -> Path:
    """The uninterrupted 150-step run the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("ref") / "mlm"
    p = run(*_long(archive, tiny_bert), "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def assert_same_run(a: Path, b: Path) -> None:
    ta, tb = (load_file(d / "model.safetensors") for d in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["history"] == mb["history"] and ma["train_loss_per_step"] == mb["train_loss_per_step"]


def test_sigint_then_resume_is_exact(tiny_bert, archive, long_run, tmp_path):
    """SIGINT mid-run: a checkpoint, exit 130 and the resume command; a resume with another --lr is
    refused naming it; --resume then ends bitwise as the uninterrupted run (eager CPU steps)."""
    out, ck = tmp_path / "mlm", tmp_path / ".mlm.partial" / "checkpoints"
    p = popen(*_long(archive, tiny_bert), "--out", out)
    wait_for(ck / "step-00000003", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(f"--resume {out} --no-compile")
    assert not out.exists() and 3 <= int(sorted(ck.glob("step-*"))[-1].name[5:]) < 150
    p = run("--resume", out, "--lr", 1e-2, "--no-compile")
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--lr differs" in p.stderr, p.stderr
    p = run("--resume", out, "--no-compile")
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    assert_same_run(long_run, out)


def test_sigkill_then_corrupted_newest_checkpoint_resume_is_exact(tiny_bert, archive, long_run, tmp_path):
    """SIGKILL after the second checkpoint, then the newest checkpoint damaged: --resume warns, falls
    back to the one before and still ends bitwise as the uninterrupted run."""
    out, ck = tmp_path / "mlm", tmp_path / ".mlm.partial" / "checkpoints"
    p = popen(*_long(archive, tiny_bert), "--out", out)
    wait_for(ck / "step-00000006", p)
    p.kill()
    p.communicate()
    newest = newest_checkpoint(ck)
    assert not out.exists() and 6 <= int(newest.name[5:]) < 150 and len(list(ck.glob("step-*"))) >= 2
    corrupt(newest / "tensors.safetensors")
    p = run("--resume", out, "--no-compile")
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    assert f"skipping checkpoint {newest.name}" in p.stderr and "checksum mismatch" in p.stderr
    assert not ck.parent.exists()
    assert_same_run(long_run, out)


def test_config_file_plus_a_flag_is_what_print_config_shows_and_the_run_stores(tiny_bert, archive, tmp_path):
    cfg_file = tmp_path / "mlm.json"
    cfg_file.write_text(
        json.dumps(
            {
                "data": str(archive),
                "weights": str(tiny_bert),
                "steps": 2,
                "batch_size": 4,
                "max_len": 32,
                "eval_every": 2,
                "eval_size": 4,
                "compile": False,
                "lr": 1e-3,
            }
        )
    )
    out = tmp_path / "mlm"
    printed = run("--config", cfg_file, "--mask-prob", 0.2, "--out", out, "--print-config")
    assert printed.returncode == 0, printed.stderr
    shown = json.loads(printed.stdout)
    assert shown["mask_prob"] == 0.2 and shown["lr"] == 1e-3 and not out.exists()
    p = run("--config", cfg_file, "--mask-prob", 0.2, "--out", out)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((out / "run_config.json").read_text()) == shown


def test_bad_input_is_one_line_and_leaves_nothing(tiny_bert, minilm_dir, archive, tmp_path):
    out = tmp_path / "runs" / "o"
    base = ("--data", archive, "--weights", tiny_bert, "--max-len", 32, "--no-compile", "--out", out)
    cases = [
        (("--lr", -1e-4, *base), "--lr must be > 0"),
        (("--warmup", -0.1, *base), "--warmup"),
        (("--weight-decay", -1, *base), "--weight-decay"),
        (("--mask-prob", 0, *base), "--mask-prob"),
        (("--splits", "train,test", *base), "refusing to pretrain on the IMDb test split's text"),
        (("--model", minilm_dir, "--predict", "the film was [MASK] ."), "no MLM head (cls.predictions) to fill"),
        (("--data", tmp_path / "nope.tar.gz", "--weights", tiny_bert, "--max-len", 32, "--out", out), "not found"),
        ((*base[:4], "--max-len", 100, "--out", out), "longer than the model's position table"),
        (("--resume", tmp_path / "nothing"), "no run there"),
    ]
    for argv, msg in cases:
        p = run(*argv, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (
            argv,
            p.stderr,
        )
        assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


@pytest.fixture(scope="module")
def pair_archive(tmp_path_factory) -> Path:
    """As ``archive``, with reviews of six sentences (next-sentence pairs need two or more); the test
    reviews are again not UTF-8."""
    base = tmp_path_factory.mktemp("imdb_pairs")
    g = torch.Generator().manual_seed(1)
    for split in ("train", "test"):
        for sent, rating in (("pos", 8), ("neg", 2)):
            d = base / "aclImdb" / split / sent
            d.mkdir(parents=True)
            for i in range(10):
                text = " ".join(
                    " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (6,), generator=g).tolist()) + "."
                    for _ in range(6)
                )
                (d / f"{i}_{rating}.txt").write_bytes(text.encode() if split == "train" else b"\xff\xfe test \x80")
    path = base / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(base / "aclImdb", arcname="aclImdb")
    shutil.rmtree(base / "aclImdb")
    return path


def test_nsp_run_saves_a_bert_for_pretraining_with_equal_logits(tiny_bert, pair_archive, tmp_path):
    """--nsp: the losses and held-out NSP accuracy are logged; the output loads in transformers as
    BertForPreTraining (no missing or unexpected keys) and its MLM and NSP logits on a sentence
    pair equal fnlm's."""
    out = tmp_path / "nsp"
    p = run(*tiny(pair_archive, tiny_bert), "--nsp", "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "has no NSP head (cls.seq_relationship)" in p.stdout and "BertForPreTraining layout" in p.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    hist = metrics["history"]
    assert [h["step"] for h in hist] == [0, 2, 4] and metrics["fresh_nsp_head"] is True
    for h in hist:
        assert {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"} <= h.keys() and h["pairs"] >= 2
        assert 0 <= h["nsp_accuracy"] <= 1 and h["nsp_loss"] > 0
    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:  # the step's loss is L_MLM + L_NSP
        assert abs(r["loss"] - (r["mlm_loss"] + r["nsp_loss"])) <= 1e-5 * r["loss"]
    assert [r["nsp_accuracy"] for r in logged if r["kind"] == "eval"] == [h["nsp_accuracy"] for h in hist]
    assert json.loads((out / "run_config.json").read_text())["nsp"] is True
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForPreTraining"]

    hf, info = transformers.BertForPreTraining.from_pretrained(
        str(out), output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info
    hf_tok = transformers.BertTokenizerFast.from_pretrained(str(out))
    b = hf_tok(
        ["the film was great .", "a boring plot"],
        ["i would watch it again .", "the cast was bad ."],
        padding=True,
        return_tensors="pt",
    )
    assert b["token_type_ids"].any()
    with torch.no_grad():
        ref = hf.eval()(**b)
    params, cfg = load_bert(out, head="pretraining")
    mlm, nsp = bert_pretraining(
        params, b["input_ids"], cfg, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
    )
    assert (nsp - ref.seq_relationship_logits).abs().max() <= 1e-5
    assert (mlm - ref.prediction_logits).abs().max() <= 1e-4


def test_nsp_sigint_then_resume_is_exact_and_keeps_nsp(tiny_bert, pair_archive, tmp_path):
    """A stopped --nsp run: --resume refuses --no-nsp naming it, then ends bitwise as the
    uninterrupted run (the pairs are redrawn each epoch from the seed, so the data order resumes too)."""
    args = tiny(pair_archive, tiny_bert, steps=60) + ["--nsp", "--eval-every", 30, "--save-every", 3]
    ref = tmp_path / "ref"
    p = run(*args, "--out", ref)
    assert p.returncode == 0, p.stderr[-3000:]
    ma = json.loads((ref / "metrics.json").read_text())
    assert 3 * ma["pairs_per_epoch"] < 60 * 4  # three epochs or more: the resumed run crosses epochs
    out, ck = tmp_path / "nsp", tmp_path / ".nsp.partial" / "checkpoints"
    p = popen(*args, "--out", out)
    wait_for(ck / "step-00000003", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert not out.exists() and 3 <= int(sorted(ck.glob("step-*"))[-1].name[5:]) < 60
    p = run("--resume", out, "--no-nsp", "--no-compile")
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--nsp differs" in p.stderr, p.stderr
    p = run("--resume", out, "--no-compile")
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    ta, tb = (load_file(d / "model.safetensors") for d in (ref, out))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    mb = json.loads((out / "metrics.json").read_text())
    assert ma["history"] == mb["history"] and ma["train_loss_per_step"] == mb["train_loss_per_step"]


@pytest.mark.slow
def test_pretrain_minilm_briefly_then_finetune(imdb_archive, minilm_dir, tmp_path):
    """MiniLM's fresh MLM head learns in-domain (held-out loss falls), and finetune_imdb.py fine-tunes the result."""
    out = tmp_path / "mlm"
    p = run(
        "--data",
        imdb_archive,
        "--weights",
        minilm_dir,
        "--steps",
        15,
        "--batch-size",
        8,
        "--max-len",
        64,
        "--train-size",
        1000,
        "--eval-size",
        32,
        "--eval-every",
        15,
        "--lr",
        1e-4,
        "--no-compile",
        "--out",
        out,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert hist[-1]["mlm_loss"] < hist[0]["mlm_loss"] - 0.5
    f = run(
        "--data",
        imdb_archive,
        "--weights",
        out,
        "--train-size",
        1000,
        "--test-size",
        200,
        "--max-len",
        64,
        "--no-compile",
        "--out",
        tmp_path / "ft",
        script=ROOT / "examples" / "finetune_imdb.py",
        timeout=900,
    )
    assert f.returncode == 0, f.stderr[-2000:]
    acc = float(re.search(r"test accuracy (\d\.\d+)", f.stdout)[1])
    assert acc >= 0.70, f.stdout[-1000:]  # chance 0.5; MiniLM itself reaches >= 0.80 on 1,000 at 256 tokens
