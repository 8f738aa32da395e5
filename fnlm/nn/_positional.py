"""Positional information: sinusoidal (fixed), learned (absolute table), relative (T5 bias).

* Sinusoidal, Vaswani et al. 2017 §3.5:
  ``PE[pos, 2i] = sin(pos / 10000^(2i/d_model))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model))``.
* Learned absolute, as BERT: a trained table ``P: [max_len, d_model]``, ``x_t + P[t]``.
* Relative, the T5 scheme (Raffel et al. 2020, §2.1): a learned scalar per head and per
  *bucket* of the signed distance ``j - i`` is added to the attention logits,
  ``scores[h, i, j] += b[h, bucket(j - i)]``. Exact buckets for small distances, log-spaced up to
  ``max_distance``. It depends only on ``j - i``, so attention is invariant to shifting all
  positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fnlm import random
from fnlm._checks import check_last_dim


# ----------------------------------------------------------------------------- sinusoidal
def sinusoidal_table(n_positions: int, d_model: int, *, dtype=torch.float32, device=None) -> Tensor:
    """``PE: [n_positions, d_model]`` with ``PE[p, 2i] = sin(p / 10000^(2i/d))``, ``PE[p, 2i+1] = cos(...)``."""
    if d_model % 2 != 0:
        raise ValueError(f"sinusoidal encoding needs an even d_model, got {d_model}")
    pos = torch.arange(n_positions, dtype=torch.float64, device=device)[:, None]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
    angle = pos / 10000.0 ** (two_i / d_model)
    pe = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)  # [n, d/2, 2]: interleave sin, cos
    return pe.reshape(n_positions, d_model).to(dtype)


def sinusoidal_encoding(x: Tensor, offset: int = 0) -> Tensor:
    """``x + PE[offset : offset + len]`` for ``x: [..., len, d_model]``."""
    pe = sinusoidal_table(offset + x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
    return x + pe[offset:]


# ----------------------------------------------------------------------------- learned
def init_learned_positional(key: random.Key, max_len: int, d_model: int, *, std: float = 0.02) -> dict[str, Tensor]:
    """A learned table ``P ~ N(0, std^2)`` of shape ``[max_len, d_model]``."""
    return {"weight": random.normal(key, (max_len, d_model), std=std)}


def check_length(length: int, max_len: int, what: str = "sequence") -> None:
    """Raise a one-line error when a ``length``-token sequence does not fit a ``max_len`` position table."""
    if length > max_len:
        raise ValueError(
            f"{what} length {length} is longer than the position table ({max_len} positions); "
            f"truncate the input to at most {max_len} tokens"
        )


def learned_positional(params: dict[str, Tensor], x: Tensor, offset: int = 0) -> Tensor:
    """``x_t + P[offset + t]`` for ``x: [..., len, d_model]``."""
    P = params["weight"]
    check_last_dim("learned_positional input", x, P.shape[1])
    check_length(offset + x.shape[-2], P.shape[0])
    return x + P[offset : offset + x.shape[-2]]


# ----------------------------------------------------------------------------- relative (T5)
def init_relative_bias(key: random.Key, n_heads: int, n_buckets: int = 32, *, std: float = 0.02) -> dict[str, Tensor]:
    """One learned scalar per (bucket, head): ``b: [n_buckets, n_heads]``."""
    return {"weight": random.normal(key, (n_buckets, n_heads), std=std)}


def relative_position_bucket(
    relative_position: Tensor, *, bidirectional: bool = True, n_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """T5's bucketing of ``r = j - i``.

    Bidirectional: half the buckets for ``r > 0``, half for ``r <= 0``. Within a half of ``n``
    buckets, ``|r| < n/2`` gets its own bucket; larger distances share log-spaced buckets up to
    ``max_distance`` (everything farther lands in the last one). Unidirectional (causal
    decoders): only ``r <= 0`` occurs, all ``n`` buckets are used for it.
    """
    n = n_buckets
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        n //= 2
        bucket = bucket + (relative_position > 0).to(torch.long) * n
        r = relative_position.abs()
    else:
        r = (-relative_position).clamp(min=0)
    max_exact = n // 2
    is_small = r < max_exact
    # log-spaced: max_exact + log(r / max_exact) / log(max_distance / max_exact) * (n - max_exact)
    r_log = max_exact + (
        torch.log(r.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).to(torch.long)
    r_log = r_log.clamp(max=n - 1)
    return bucket + torch.where(is_small, r, r_log)


def relative_bias(
    params: dict[str, Tensor],
    len_q: int,
    len_k: int,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
    offset_q: int = 0,
    offset_k: int = 0,
) -> Tensor:
    """The additive attention bias ``B[h, i, j] = b[bucket(j - i), h]``, shape ``[n_heads, len_q, len_k]``."""
    b = params["weight"]
    device = b.device
    i = torch.arange(len_q, device=device)[:, None] + offset_q
    j = torch.arange(len_k, device=device)[None, :] + offset_k
    buckets = relative_position_bucket(
        j - i, bidirectional=bidirectional, n_buckets=b.shape[0], max_distance=max_distance
    )
    return b[buckets].permute(2, 0, 1)  # [len_q, len_k, h] -> [h, len_q, len_k]
