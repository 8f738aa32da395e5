"""Hostile and careless inputs (issue 21): each case builds its input in milliseconds and
asserts the one-line error or the safe outcome, and that nothing ran, was written outside its
directory, or was lost. Memory cases run in a subprocess under ``RLIMIT_AS`` = 2 GB."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import fnlm
from fnlm.data import WordPieceTokenizer
from fnlm.models import (
    BertConfig,
    TamperedPackageError,
    UntrustedPackageError,
    export_classifier,
    init_bert_classifier,
    load_classifier_package,
    package_status,
)

WORDS = "a great film awful boring the plot was".split()
CFG = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=16, id2label=("neg", "pos"))


def one_line(e: BaseException | str) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert msg and "\n" not in msg.strip(), msg
    return msg


# ============================================================================ 1. consent before code
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return WordPieceTokenizer.from_vocab(vocab)


@pytest.fixture(scope="module")
def program_package(tokenizer, tmp_path_factory):
    params = init_bert_classifier(fnlm.random.key(0), CFG)
    return export_classifier(params, CFG, tokenizer, tmp_path_factory.mktemp("pkg") / "export", max_len=16,
                             form="program")


def copy_package(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class WriteMarker:
    """Unpickling this writes ``path`` (what a malicious pickle would do, harmlessly)."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return Path.write_text, (self.path, "pwned")


def malicious_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": WriteMarker(marker)}, buf)
    return buf.getvalue()


def rewrite_zip(file: Path, replace: dict[str, bytes]) -> None:
    """Rewrite the zip ``file`` with the members whose names end in a key of ``replace`` replaced."""
    src = zipfile.ZipFile(io.BytesIO(file.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = src.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            z.writestr(info.filename, data)
    file.write_bytes(out.getvalue())


def reseal(pkg: Path) -> None:
    """Recompute export.json's checksums, as an attacker who controls the whole folder can."""
    import hashlib

    meta = json.loads((pkg / "export.json").read_text())
    meta["files"] = {n: hashlib.sha256((pkg / n).read_bytes()).hexdigest() for n in meta["files"]}
    (pkg / "export.json").write_text(json.dumps(meta))


def plant_pickle(pkg: Path, marker: Path, where: str) -> None:
    """A marker-writing pickle inside program.pt2: as the sample inputs (torch falls back to
    weights_only=False on them), or as a weight flagged ``use_pickle`` (loaded unrestricted)."""
    prog = pkg / "program.pt2"
    if where == "sample_inputs":
        rewrite_zip(prog, {"data/sample_inputs/model.pt": malicious_pickle(marker)})
    else:
        z = zipfile.ZipFile(io.BytesIO(prog.read_bytes()))
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        cfg = json.loads(z.read(name))
        fqn, meta = next(iter(cfg["config"].items()))
        meta["use_pickle"] = True
        rewrite_zip(prog, {name: json.dumps(cfg).encode(), "data/weights/" + meta["path_name"]: malicious_pickle(marker)})


def test_package_checksums_written_and_trusted_load_works(program_package, tokenizer):
    import hashlib

    meta = json.loads((program_package / "export.json").read_text())
    files = sorted(p.name for p in program_package.iterdir() if p.name != "export.json")
    assert sorted(meta["files"]) == files and "program.pt2" in files
    for name, digest in meta["files"].items():
        assert hashlib.sha256((program_package / name).read_bytes()).hexdigest() == digest
    assert package_status(program_package, trust_package=True) is None
    clf = load_classifier_package(program_package, trust_package=True)
    assert clf.predict_proba(["a great film"]).shape == (1, 2)


def test_package_untrusted_is_refused_and_status_says_why(program_package):
    with pytest.raises(UntrustedPackageError) as e:
        load_classifier_package(program_package)
    assert "trust_package=True" in one_line(e)
    status = package_status(program_package, trust_package=False)
    assert "not trusted" in one_line(status)


@pytest.mark.parametrize("where", ["sample_inputs", "use_pickle_weight"])
def test_planted_pickle_really_runs_in_torch_export_load(program_package, tmp_path, where):
    """The threat is real: torch.export.load itself unpickles the planted object (reference)."""
    pkg = copy_package(program_package, tmp_path / "pkg")
    marker = tmp_path / "MARKER"
    plant_pickle(pkg, marker, where)
    try:
        torch.export.load(str(pkg / "program.pt2"))
    except Exception:
        pass
    assert marker.exists()


@pytest.mark.parametrize("where", ["sample_inputs", "use_pickle_weight"])
def test_planted_pickle_never_unpickled(program_package, tmp_path, where):
    pkg = copy_package(program_package, tmp_path / "pkg")
    marker = tmp_path / "MARKER"
    plant_pickle(pkg, marker, where)
    with pytest.raises(UntrustedPackageError):  # no consent
        load_classifier_package(pkg)
    with pytest.raises(TamperedPackageError) as e:  # consent, but the file changed after export
        load_classifier_package(pkg, trust_package=True)
    assert "sha256" in one_line(e)
    reseal(pkg)  # consent and matching checksums: still never unpickled
    with pytest.raises(TamperedPackageError) as e:
        load_classifier_package(pkg, trust_package=True)
    assert "pickle" in one_line(e)
    assert "pickle" in package_status(pkg, trust_package=True)
    assert not marker.exists()


def marker_library(tmp_path: Path, marker: Path) -> bytes:
    """A shared library whose constructor writes ``marker`` (gcc), else fake bytes."""
    src = tmp_path / "evil.c"
    src.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void evil(void) {{
            FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("pwned", f); fclose(f); }}
        }}"""))
    so = tmp_path / "evil.so"
    if shutil.which("gcc") and subprocess.run(["gcc", "-shared", "-fPIC", "-o", so, src]).returncode == 0:
        return so.read_bytes()
    return b"\x7fELF fake shared library"


def aoti_package(program_package: Path, tmp_path: Path, marker: Path) -> Path:
    """An 'aoti' package whose model.pt2 holds the marker-writing library, sealed with checksums."""
    pkg = copy_package(program_package, tmp_path / "aoti")
    (pkg / "program.pt2").unlink()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model/archive_format", "pt2")
        z.writestr("model/data/aotinductor/model/model.so", marker_library(tmp_path, marker))
    (pkg / "model.pt2").write_bytes(buf.getvalue())
    meta = json.loads((pkg / "export.json").read_text())
    meta.update(form="aoti", file="model.pt2")
    meta["files"]["model.pt2"] = meta["files"].pop("program.pt2")
    (pkg / "export.json").write_text(json.dumps(meta))
    reseal(pkg)
    return pkg


def test_marker_library_is_real(tmp_path):
    """Reference: dlopen-ing the library writes the marker (when gcc built it)."""
    import ctypes

    marker = tmp_path / "MARKER"
    lib = marker_library(tmp_path, marker)
    if not lib.startswith(b"\x7fELF\x02") and not lib.startswith(b"\x7fELF\x01"):
        pytest.skip("no C compiler: the fake library cannot run anyway")
    ctypes.CDLL(str(tmp_path / "evil.so"))
    assert marker.exists()


def test_native_library_not_loaded_without_consent_or_when_tampered(program_package, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    pkg = aoti_package(program_package, tmp_path, marker)
    loads = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: loads.append(a))
    with pytest.raises(UntrustedPackageError) as e:
        load_classifier_package(pkg)
    assert "model.pt2" in one_line(e)
    assert "not trusted" in package_status(pkg, trust_package=False)
    with (pkg / "model.pt2").open("ab") as f:
        f.write(b"\0")  # tampered after sealing
    with pytest.raises(TamperedPackageError) as e:
        load_classifier_package(pkg, trust_package=True)
    assert "model.pt2" in one_line(e) and "sha256" in str(e.value)
    assert "sha256" in package_status(pkg, trust_package=True)
    assert not loads and not marker.exists()


@pytest.mark.parametrize("change", ["extra_file", "symlink", "missing", "no_checksums"])
def test_package_file_set_must_match(program_package, tmp_path, change):
    pkg = copy_package(program_package, tmp_path / "pkg")
    if change == "extra_file":
        (pkg / "extra.so").write_bytes(b"x")
    elif change == "symlink":
        (pkg / "vocab.txt").unlink()
        (pkg / "vocab.txt").symlink_to(tmp_path / "elsewhere")
    elif change == "missing":
        (pkg / "vocab.txt").unlink()
    else:
        meta = json.loads((pkg / "export.json").read_text())
        del meta["files"]
        (pkg / "export.json").write_text(json.dumps(meta))
    with pytest.raises(TamperedPackageError) as e:
        load_classifier_package(pkg, trust_package=True)
    one_line(e)
