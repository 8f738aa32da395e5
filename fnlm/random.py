"""Explicit, splittable random keys, as in JAX.

A key is a tiny int64 tensor of shape ``[2]`` holding two 32-bit words. Random numbers are a
pure function of (key, position): ``bits[i] = hash(key, i)``, computed with integer tensor
arithmetic (a counter-based generator). Consequences that the rest of fnlm relies on:

* same key => same numbers, on any device and under ``torch.compile`` (no global RNG state);
* keys are ordinary tensors, so they pass through ``vmap`` (one key per ensemble member) and
  into compiled steps without recompiling when their *values* change;
* ``split(key, n)`` gives ``n`` keys whose streams are independent for practical purposes.

The mixing function is Chris Wellons' ``lowbias32`` integer hash applied in three rounds. It is
statistically good, not cryptographic. Its multipliers are below 2**31, so no int64 product ever
overflows (signed overflow is undefined behaviour in compiled kernels).

Compiling code that draws random numbers: each xorshift step of the hash reads its input twice
(``x ^ (x >> 16)``), and Inductor, which inlines chains of pointwise ops into their consumers,
then re-traces the chain exponentially (a model with dropout: minutes of compile). Compile with
:func:`fnlm.compile_fn` (or pass ``options=fnlm.train.COMPILE_OPTIONS`` to ``torch.compile``),
which tells Inductor to store such chains: the hash then compiles in seconds and still fuses into
one kernel (wrapping it in an opaque custom op instead was measured many times slower at run time).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Key = Tensor  # int64[2], values in [0, 2**32)

_M32 = 0xFFFFFFFF
_SPLIT = 0x9E3779B9  # domain separation: split / fold_in / bits never share a counter stream
_FOLD = 0x85EBCA6B
_BITS = 0xC2B2AE35
_SEED = 0x27D4EB2F


# Both multipliers are below 2**31, so for x < 2**32 the product x * c stays below 2**63: exact in
# int64 (no overflow, which would be undefined behaviour in compiled kernels), then reduced mod 2**32.
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons' hash-prospector, 2022 constants), a bijection on 32-bit words:
    ``x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15``."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 15)


def _mix(key: Key, counter: Tensor, domain: int) -> Tensor:
    """A 32-bit word for each counter value: hash(hash(hash(i ^ k0 ^ d) ^ k1) + k0)."""
    k0, k1 = key[..., 0:1], key[..., 1:2]  # keep a trailing axis so counters broadcast
    x = _hash32(counter ^ k0 ^ domain)
    x = _hash32(x ^ k1)
    return _hash32(x + k0)


def _check_key(key: Tensor) -> None:
    if not isinstance(key, Tensor) or key.dtype != torch.int64 or key.shape[-1:] != (2,):
        raise TypeError(
            f"expected a random key (an int64 tensor of shape [2] from fnlm.random.key), got "
            f"{type(key).__name__} {getattr(key, 'dtype', '')} {tuple(getattr(key, 'shape', ()))}"
        )


def key(seed: int) -> Key:
    """A key from an integer seed: ``key(0)`` and ``key(1)`` give unrelated streams."""
    s = int(seed) & (2**64 - 1)
    words = torch.tensor([s & _M32, (s >> 32) & _M32], dtype=torch.int64)
    return torch.stack([_hash32(words[0] ^ _SPLIT), _hash32(words[1] ^ _hash32(words[0] ^ _FOLD) ^ _BITS)])


def seed_of(key: Key) -> int:
    """A 63-bit integer derived from ``key`` (its own stream, separate from every draw of
    :func:`bits`), to seed torch's global generator for the kernels that draw from it, such as
    fused attention dropout. Reads the key's value (a host sync on an accelerator)."""
    _check_key(key)
    if key.ndim != 1:
        raise ValueError(f"seed_of: expected one key of shape [2], got shape {tuple(key.shape)}")
    hi, lo = (int(w) for w in _mix(key.cpu(), torch.arange(2, dtype=torch.int64), _SEED).tolist())
    return ((hi << 32) | lo) & (2**63 - 1)


def split(key: Key, num: int = 2) -> Tensor:
    """``num`` new keys, shape ``[num, 2]``; unpack with ``k1, k2 = split(key)``."""
    _check_key(key)
    i = torch.arange(2 * num, dtype=torch.int64, device=key.device)
    return _mix(key, i, _SPLIT).reshape(*key.shape[:-1], num, 2)


def split_or_none(key: Key | None, num: int) -> list:
    """``num`` sub-keys, or ``num`` Nones when there is no key (evaluation: no dropout)."""
    return [None] * num if key is None else list(split(key, num))


def fold_in(key: Key, data: int | Tensor) -> Key:
    """A new key that depends on ``key`` and an integer (e.g. the step number)."""
    _check_key(key)
    d = torch.as_tensor(data, dtype=torch.int64, device=key.device) & _M32
    c = torch.stack([d * 2, d * 2 + 1]).reshape(2)
    return _mix(key, c, _FOLD).reshape(key.shape)


def bits(key: Key, shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None) -> Tensor:
    """Uniform random 32-bit words (as int64) of the given shape: ``bits[i] = hash(key, i)``."""
    _check_key(key)
    n = math.prod(shape)
    if n >= 2**32:
        raise ValueError(f"cannot draw {n} random numbers from one key (limit 2**32); split the key")
    device = key.device if device is None else torch.device(device)
    i = torch.arange(n, dtype=torch.int64, device=device)
    return _mix(key.to(device), i, _BITS).reshape(shape)


def uniform(
    key: Key,
    shape: tuple[int, ...] | torch.Size,
    *,
    low: float = 0.0,
    high: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """U[low, high) with 24 bits of resolution (exact in float32)."""
    u = (bits(key, shape, device) >> 8).to(torch.float32) * 2.0**-24
    return (low + (high - low) * u).to(dtype)


def normal(
    key: Key,
    shape: tuple[int, ...] | torch.Size,
    *,
    std: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """N(0, std^2) by Box–Muller: ``z = sqrt(-2 ln u1) cos(2 pi u2)``, ``u1`` in (0, 1]."""
    k1, k2 = split(key)
    u1 = ((bits(k1, shape, device) >> 8).to(torch.float32) + 1.0) * 2.0**-24
    u2 = (bits(k2, shape, device) >> 8).to(torch.float32) * 2.0**-24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (std * z).to(dtype)


def truncated_normal(
    key: Key,
    shape: tuple[int, ...] | torch.Size,
    *,
    std: float = 1.0,
    bound: float = 2.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """N(0, std^2) truncated to [-bound*std, bound*std] by inverting the normal CDF."""
    a = 0.5 * (1.0 + math.erf(-bound / math.sqrt(2.0)))
    u = uniform(key, shape, low=a, high=1.0 - a, dtype=torch.float64, device=device)
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    return (std * z).to(dtype)


def bernoulli(key: Key, p: float, shape: tuple[int, ...] | torch.Size, device=None) -> Tensor:
    """Boolean mask, True with probability ``p``. Pure integer compare: identical on every device."""
    threshold = int(round(p * 2**24))
    return (bits(key, shape, device) >> 8) < threshold
