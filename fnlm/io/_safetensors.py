"""Safe file I/O: validated safetensors reads and atomic writes.

Nothing here unpickles: safetensors files hold raw tensors and a JSON header only.
Writes go to a temporary file in the same directory and are moved into place with
``os.replace`` (atomic on POSIX), so a crash never leaves a half-written file under the final
name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, corrupt, or does not match what was expected."""


class MissingHeadError(CheckpointError):
    """The checkpoint has a body but none of the asked head's weights (load with a ``head_key`` to initialise one)."""


class MissingPoolerError(CheckpointError):
    """The checkpoint has no pooler weights (load with ``pooler=False``)."""


def _check_safetensors_header(path: Path) -> None:
    """Give a clear error for truncated or foreign files before the Rust reader sees them."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > 100_000_000 or 8 + n > size:
            raise CheckpointError(
                f"{path}: not a safetensors file, or truncated (header says {n} bytes of JSON, file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: not a safetensors file (header is a JSON {type(header).__name__}, not an object)"
        )
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(
                f"{path}: not a safetensors file (tensor {k!r} has no valid data_offsets [begin, end])"
            )
        if not isinstance(v.get("shape"), list) or not isinstance(v.get("dtype"), str):
            raise CheckpointError(f"{path}: not a safetensors file (tensor {k!r} lacks a shape list or a dtype)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}")


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the string metadata of a ``.safetensors`` file, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise CheckpointError(
            f"{path}: pickle checkpoints are refused (unpickling can run arbitrary code). Convert it once "
            'with: python -c "import torch; from safetensors.torch import save_file; '
            "sd = torch.load('pytorch_model.bin', weights_only=True); "
            "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\""
        )
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            tensors = {k: _aligned(f.get_tensor(k)) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # the Rust reader's errors are terse; name the file
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from None
    return tensors, metadata


def _aligned(t: Tensor) -> Tensor:
    """``t`` in a fresh tensor of its own, allocated as torch allocates any tensor (64-byte aligned on CPU).

    The reader hands out tensors at offsets that follow the header's length (not 64-byte aligned), and
    code may choose kernels by alignment (BLAS, Inductor's generated code); a fresh copy puts a
    checkpoint's tensors in memory as an uninterrupted run's computed ones are, and weights read at
    the start of a run as the same weights read on resume. (With the MKL of torch 2.13 on an AVX2 CPU,
    matrix products gave equal bits at every offset, and eager resume was bitwise exact without it.)"""
    if t.device.type != "cpu":
        return t
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


def _umask() -> int:
    """The process umask (read without changing it where the OS allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_safetensors(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``tensors`` (made contiguous, moved to CPU) to ``path``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_renameat2_fn: Any = None


def _renameat2() -> Any:
    """Linux's ``renameat2`` through ctypes (the libc wrapper, else the raw syscall), or None."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                return None
            fn = getattr(libc, "renameat2", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
            else:
                nr = {"x86_64": 316, "aarch64": 276}.get(platform.machine())
                if nr is not None:
                    _renameat2_fn = lambda *a: libc.syscall(
                        ctypes.c_long(nr),
                        ctypes.c_int(a[0]),
                        ctypes.c_char_p(a[1]),
                        ctypes.c_int(a[2]),
                        ctypes.c_char_p(a[3]),
                        ctypes.c_uint(a[4]),
                    )
    return _renameat2_fn or None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (``renameat2(RENAME_EXCHANGE)``); False where the
    OS or the filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def recover_dir(path: str | os.PathLike) -> bool:
    """Put ``path`` back from the ``.<name>.old`` that a process killed between the two renames of
    :func:`atomic_dir`'s fallback left behind (only where ``path`` itself is missing); True if it did."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not os.path.lexists(path):
        os.rename(old, path)
        return True
    return False


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a whole directory under a temporary name, then rename it to ``path``.

    An existing ``path`` is replaced only after the new one is complete, in one atomic exchange of
    the two directories where Linux allows it (``renameat2``), so that at every instant ``path``
    holds either the previous or the new directory. Elsewhere the previous one is first renamed to
    ``.<name>.old``; a process killed between the two renames leaves it there, and the next
    ``atomic_dir`` on ``path`` (or :func:`recover_dir`) puts it back. On error the temporary
    directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the directory normal permissions
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):  # path: the new directory; tmp: the previous one, deleted below
            pass
        else:
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``'fp32' | 'float32' | 'bf16' | 'bfloat16' | 'fp16' | 'float16'`` -> ``torch.dtype``."""
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(table)}") from None
