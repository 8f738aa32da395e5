"""Sane bounds on configs, and ``bytes(params) <= memory`` checked before anything is allocated.

:data:`CONFIG_BOUNDS` caps each kind of size a ``config.json`` may declare (well above any
released model: 4,096 layers, widths of 2^17, vocabularies of 2^24, 2^20 positions), so a
config of 10^9 layers is refused in one line at construction. :func:`check_fits` compares the
bytes a config's parameters take (their count from the config, times the dtype's size) with the
machine's physical memory (``os.sysconf``) and the process's address-space limit
(``RLIMIT_AS``), and refuses in one line that says how much is needed and how much there is.
"""

from __future__ import annotations

import math
import os

#: kind of size -> largest accepted value
CONFIG_BOUNDS = {
    "layers": 4096,
    "width": 1 << 17,
    "heads": 4096,
    "vocab": 1 << 24,
    "positions": 1 << 20,
    "labels": 1 << 20,
}


class ConfigMemoryError(ValueError):
    """A config whose parameters alone would not fit in this machine's memory."""


def check_bound(owner: str, name: str, value, kind: str) -> None:
    """``ValueError`` naming ``owner.name`` unless ``value`` is an int in ``[1, CONFIG_BOUNDS[kind]]``."""
    bound = CONFIG_BOUNDS[kind]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= bound:
        raise ValueError(f"{owner}.{name} must be a positive integer <= {bound:,}, got {value!r}")


def check_eps(owner: str, name: str, value) -> None:
    """``ValueError`` unless ``value`` is a finite number > 0 (a LayerNorm epsilon)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}.{name} must be a finite number > 0, got {value!r}")


def available_bytes() -> int | None:
    """``min(physical memory, RLIMIT_AS)`` in bytes (``None`` if neither is known)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    return min(limits) if limits else None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_fits(n_params: int, bytes_per_param: int, where: str) -> None:
    """Raise :class:`ConfigMemoryError` (one line naming ``where``) if ``n_params`` parameters of
    ``bytes_per_param`` bytes exceed :func:`available_bytes`."""
    need, have = n_params * bytes_per_param, available_bytes()
    if have is not None and need > have:
        raise ConfigMemoryError(
            f"{where}: the config implies {n_params:,} parameters, {_gb(need)} in memory, "
            f"more than this machine's {_gb(have)}"
        )


def bert_param_count(cfg) -> int:
    """Parameters of a BERT with pooler, MLM and classifier heads (an upper bound for any head)."""
    V, H, P, T, I, L = (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.max_position_embeddings,
        cfg.type_vocab_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
    )
    layer = 4 * H * H + 4 * H + 2 * H * I + I + H + 4 * H
    return (V + P + T + 2) * H + L * layer + (H * H + H) * 2 + 2 * H + V + (H + 1) * cfg.num_labels


def gpt2_param_count(cfg) -> int:
    """Parameters of a GPT-2 (the LM head tied to the token embeddings)."""
    V, E, P, L, F = cfg.vocab_size, cfg.n_embd, cfg.n_positions, cfg.n_layer, cfg.d_ff
    return (V + P) * E + L * (4 * E * E + 4 * E + 2 * E * F + F + E + 4 * E) + 2 * E
