"""Input validation shared by the layers: fail early, naming the argument and the shapes."""

from __future__ import annotations

import torch
from torch import Tensor


def is_traced(x: Tensor) -> bool:
    """True under torch.compile or a torch.func transform (vmap/grad), where data-dependent
    Python checks (``bool(tensor)``) are impossible. Shape checks still run there."""
    if torch.compiler.is_compiling():
        return True
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def check_last_dim(name: str, x: Tensor, expected: int, what: str = "d_model") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != expected:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, but its last axis must be {what}={expected}")


def check_broadcast(name: str, x: Tensor, target: tuple[int, ...], axes: str) -> None:
    """Raise if ``x`` does not broadcast to ``target`` (named by ``axes`` in the message)."""
    ok = x.ndim <= len(target) and all(s == 1 or s == t for s, t in zip(reversed(x.shape), reversed(target)))
    if not ok:
        raise ValueError(f"{name} of shape {tuple(x.shape)} does not broadcast to [{axes}] = {list(target)}")
