"""Helpers shared by the tests: running an example as a user does (a fresh interpreter, the command
line), waiting for a file a running example writes, damaging a file, and writing a small archive in
the official aclImdb layout. Tests import from here, never from another test module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPT = EXAMPLES / "finetune_imdb.py"  # the main job
CLASSIFY = EXAMPLES / "classify.py"
# a tiny eager pretrain_gpt.py configuration (seconds per run)
GPT_TINY = [
    "--val-reviews",
    "40",
    "--val-tokens",
    "256",
    "--vocab-size",
    "300",
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "16",
    "--block-size",
    "16",
    "--batch-size",
    "4",
    "--steps",
    "10",
    "--eval-every",
    "5",
    "--save-every",
    "4",
    "--warmup",
    "2",
    "--max-new-tokens",
    "8",
    "--no-compile",
]

POS = [
    "a wonderful, moving film with superb acting",
    "great fun from start to finish, I loved it",
    "the best movie I have seen this year<br /><br />ten stars",
    "brilliant script and a beautiful score",
    "charming, funny and smart; see it twice",
    "an excellent cast in a touching story",
]
NEG = [
    "a dull, boring mess that wastes its cast",
    "awful acting and a terrible, stupid plot",
    "the worst film I have seen this year<br /><br />one star",
    "two hours I will never get back",
    "lazy writing, ugly sets and no laughs at all",
    "a tedious, badly edited disappointment",
]


def example_env() -> dict:
    """The environment of an example's process: this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_example(script: Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python script args...`` from the repository root, to completion (text output captured)."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=ROOT,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_script(*args, timeout: float = 600, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    """The main job (or ``script``) run to completion: ``run_example(script, *args)``."""
    return run_example(script, *args, timeout=timeout)


def popen_example(script: Path, *args) -> subprocess.Popen:
    """``python script args...`` started in the background (to be signalled or killed)."""
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=ROOT,
        env=example_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``path`` exists; fail if ``proc`` ends first or ``timeout`` seconds pass."""
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.communicate()[1][-2000:]}"
        assert time.time() - t0 < timeout, f"no {path} after {timeout}s"
        time.sleep(0.01)


def corrupt(path: Path) -> None:
    """Flip every bit of the middle byte of a file (its checksum no longer matches)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def write_imdb_archive(path: Path, n_per_class: int = 12) -> Path:
    """An ``aclImdb_v1.tar.gz`` look-alike: ``aclImdb/{train,test}/{pos,neg}/{id}_{rating}.txt``."""
    root = path.parent / "tree"
    for split, offset in (("train", 0), ("test", 3)):
        for sent, texts, rating in (("pos", POS, 8), ("neg", NEG, 2)):
            d = root / "aclImdb" / split / sent
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                text = f"{texts[(i + offset) % len(texts)]}. {texts[(2 * i + 1 + offset) % len(texts)]}."
                (d / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
        (root / "aclImdb" / split / "urls_pos.txt").write_text("http://www.imdb.com/title/tt0000001/\n")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root / "aclImdb", arcname="aclImdb")
    shutil.rmtree(root)
    return path


def newest_checkpoint(checkpoints: Path) -> Path:
    """The highest-numbered ``step-*`` folder of a run's ``checkpoints/``."""
    return sorted(checkpoints.glob("step-*"))[-1]


def fnlm_logits(model_dir: Path, texts: list[str], max_len: int) -> torch.Tensor:
    """A saved classifier's logits for ``texts`` (HTML breaks removed, head+tail truncation), by fnlm."""
    from fnlm.data import load_tokenizer
    from fnlm.models import bert_classifier, load_bert

    params, cfg = load_bert(model_dir, head="classifier")
    tok = load_tokenizer(model_dir)
    batch = tok.encode([t.replace("<br />", " ") for t in texts], max_len=max_len, truncation="head+tail")
    with torch.no_grad():
        return bert_classifier(
            params,
            batch["input_ids"],
            cfg,
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        )


def byte_level_bpe(out: Path, texts, specials, vocab_size: int = 400) -> Path:
    """``vocab.json`` + ``merges.txt`` of a byte-level BPE (GPT-2's, RoBERTa's kind) trained on ``texts``."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=specials)
    out.mkdir(parents=True)
    bpe.save_model(str(out))
    return out
