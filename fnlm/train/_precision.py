"""Which floating-point format the matrix products run in: detect native bf16, pick ``--dtype auto``.

bf16 autocast (float32 master weights, float32 loss and optimizer; :func:`fnlm.train.make_train_step`'s
``autocast_dtype``) is worth it only where the hardware multiplies bf16 natively: NVIDIA GPUs from
Ampere on, and CPUs with AVX512-BF16 or AMX-BF16. On this project's 2-core AMD EPYC (AVX512-BF16)
matmuls and the compiled MiniLM step ran faster in bf16 than in float32, at the same IMDb
accuracy (``docs/benchmarks.md``); on a CPU without those instructions bf16 is emulated and slower.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

#: CPU feature flags (as Linux's /proc/cpuinfo spells them) that mean native bf16 matrix products.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPES = ("auto", "fp32", "bf16")


def _cpu_flags() -> set[str]:
    if sys.platform.startswith("linux"):
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
        return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return set()


def native_bf16(device: str | torch.device = "cpu", *, cpu_flags: set[str] | None = None) -> bool:
    """True when ``device`` multiplies bf16 natively: a CUDA device with bf16 support
    (compute capability >= 8.0), or a CPU whose flags include AVX512-BF16 or AMX-BF16
    (read from ``/proc/cpuinfo``; ``cpu_flags`` overrides, for tests). Detected, never guessed
    from the vendor: other CPUs answer False."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def autocast_dtype(
    choice: str, device: str | torch.device = "cpu", *, cpu_flags: set[str] | None = None
) -> torch.dtype | None:
    """``'fp32'`` -> ``None`` (no autocast), ``'bf16'`` -> ``torch.bfloat16``, ``'auto'`` -> bf16
    where :func:`native_bf16` says the device has it, else ``None``."""
    if choice not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {choice!r}")
    if choice == "auto":
        return torch.bfloat16 if native_bf16(device, cpu_flags=cpu_flags) else None
    return torch.bfloat16 if choice == "bf16" else None


def pick_device(name: str = "auto") -> torch.device:
    """``'auto'`` (cuda when available, else cpu), ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ... as a
    ``torch.device``; a name that is not a device, or CUDA where there is none, is a ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device
