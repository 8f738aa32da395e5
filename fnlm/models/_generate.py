"""Auto-regressive generation from a GPT-2 with a KV cache: sampling rules and the decode loop.

::

    logits_P, cache = prefill(params, cache, prompt)                  the prompt, once
    y_1 ~ sample(logits_P)
    logits_t, cache = decode_step(params, cache, y_{t-1})             one compiled graph for every t
    y_t ~ sample(logits_t, key_t)

``sample`` is greedy (``temperature == 0``) or draws from ``softmax(z / T)`` restricted to the
``top_k`` largest logits and/or the smallest set of tokens whose probability reaches ``top_p``
(nucleus). Draws use the Gumbel-max trick, ``argmax(z + g)``, ``g = -log(-log u)``, with ``u``
from an explicit key, so the same key gives the same tokens.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from fnlm import random
from fnlm.models._gpt2 import GPT2Config, decode_step, init_gpt2_cache, prefill
from fnlm.models._matvec import MAX_ROWS, matvec_layout, matvec_pass
from fnlm.nn._embedding import check_token_ids
from fnlm.tree import Params


def filter_logits(
    logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """``z / T`` with ``-inf`` outside the ``top_k`` largest and outside the nucleus: the smallest
    set of most likely tokens whose probability mass reaches ``top_p``. ``[..., vocab]``."""
    _check_sampling(temperature, top_k, top_p, greedy_ok=False)
    z = logits.float() / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # keep token i while the mass before it is < p
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_logits(
    logits: Tensor,
    key: random.Key | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """One token per row, ``[..., vocab] -> [...]``: ``argmax`` if ``temperature == 0``, else
    ``argmax(filter_logits(z) + g)`` with Gumbel noise ``g`` drawn from ``key`` (a sample of
    ``softmax`` of the filtered logits)."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    if key is None:
        raise ValueError("sampling (temperature > 0) needs key=fnlm.random.key(seed)")
    z = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    u = random.uniform(key, z.shape, device=z.device) + 2.0**-25  # in (0, 1)
    return (z - torch.log(-torch.log(u))).argmax(-1)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, greedy_ok: bool = True) -> None:
    """One-line ``ValueError`` naming the argument: ``temperature`` a finite number ``>= 0``
    (``> 0`` unless ``greedy_ok``), ``top_k`` a positive int (not a bool), ``top_p`` in ``(0, 1]``."""
    if (
        not isinstance(temperature, numbers.Real)
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or not (temperature >= 0 if greedy_ok else temperature > 0)
    ):
        want = ">= 0 (0 = greedy)" if greedy_ok else "> 0"
        raise ValueError(f"temperature must be a finite number {want}, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (a number) or None, got {top_p!r}")


def _check_ids(ids, what: str) -> list[int]:
    """``ids`` as a list of Python ints; floats, bools and other types are refused naming ``what``."""
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{what} must be integer token ids, got a {ids.dtype} tensor")
        return ids.reshape(-1).tolist()
    out = list(ids)
    bad = next((t for t in out if not _is_int(t)), None)
    if bad is not None:
        raise ValueError(f"{what} must be integer token ids, got {bad!r} ({type(bad).__name__})")
    return [int(t) for t in out]


@functools.lru_cache(maxsize=32)
def _step_fn(
    cfg: GPT2Config, temperature: float, top_k: int | None, top_p: float | None, compile, matvec: bool = False
):
    """``(params, cache, tokens, key) -> (next tokens, cache)``: :func:`decode_step` then
    :func:`sample_logits`, compiled once per model config and sampling rule (``matvec``: with
    :func:`fnlm.models.matvec_pass`)."""
    from fnlm.train._step import compile_fn  # fnlm.train imports fnlm.models

    def step(params, cache, tokens, key):
        logits, cache = decode_step(params, cache, tokens, cfg, inplace=True)  # generate owns the cache
        return sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p), cache

    options = {"post_grad_custom_post_pass": matvec_pass()} if matvec else None
    return compile_fn(step, compile=compile, max_shapes=8, compile_options=options)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths -> ``(ids [batch, max_len], start [batch])``, padded on the left
    so that every row's last prompt token sits in the same slot; ``start[b]``: first real slot."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        empty = [i for i, n in enumerate(lengths) if n == 0]
        raise ValueError(
            f"empty prompt(s) at row(s) {empty}: every row needs at least one token" if prompts else "no prompts given"
        )
    L = max(lengths)
    if not _is_int(pad_id):
        raise ValueError(f"pad_id must be an integer token id, got {pad_id!r}")
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :] = torch.as_tensor(_check_ids(p, f"prompts[{b}]"), dtype=torch.long)
    return ids, torch.tensor([L - n for n in lengths], dtype=torch.long)


def generate(
    params: Params,
    cfg: GPT2Config,
    prompts: Sequence[Sequence[int]] | Tensor,
    *,
    max_new_tokens: int,
    key: random.Key | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    attention_mask: Tensor | None = None,
    cache_len: int | None = None,
    compile: bool | str = True,
    pad_id: int = 0,
    matvec: bool | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new tokens per row
    (up to and including its first stop token).

    ``prompts``: lists of token ids of any lengths (left-padded here), or ``[batch, len]`` ids
    with ``attention_mask`` (left padding only). ``temperature=0``: greedy; else sampling from
    ``key`` with optional ``top_k`` / ``top_p``. ``stop_tokens``: ids that end a row (one list
    for all rows, or one list per row); generation stops early once every row has stopped.
    ``cache_len``: KV-cache slots (default: prompt + ``max_new_tokens``). ``compile``: the decode
    step through ``torch.compile`` (once per config and sampling rule; any dynamo backend name
    works), or ``False`` for eager. ``matvec``: decode with Inductor's matrix-vector kernels over a
    copy of the block weights stored input-axis innermost (:mod:`fnlm.models._matvec`; the same
    tokens, faster on a CPU, one more copy of the block weights in memory during the call);
    ``None`` (default): when one row is decoded on a CPU with Inductor (faster for the 124M GPT-2 on
    this project's CPU: ``docs/benchmarks.md``, ``benchmarks/generate.py``). Every argument is checked
    before any compute.
    """
    _check_sampling(temperature, top_k, top_p)
    if not _is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature > 0:
        if key is None:
            raise ValueError("sampling (temperature > 0) needs key=fnlm.random.key(seed)")
        random._check_key(key)
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
            raise ValueError(f"prompts must be integer token ids, got a {prompts.dtype} tensor")
        ids = prompts.to(torch.long)
        if ids.ndim != 2 or ids.shape[-1] == 0:
            raise ValueError(f"prompt ids must be a non-empty [batch, len] tensor, got shape {tuple(ids.shape)}")
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(torch.long)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected the prompts' {tuple(ids.shape)}")
        start = (mask == 0).sum(-1)
        slot = torch.arange(ids.shape[-1])[None, :]
        if not torch.equal(mask.bool(), slot >= start[:, None]):
            raise ValueError("attention_mask must be left padding (zeros, then ones in each row)")
        if bool((start == ids.shape[-1]).any()):
            raise ValueError(f"empty prompt(s) at row(s) {(start == ids.shape[-1]).nonzero().flatten().tolist()}")
    else:
        ids, start = left_pad(prompts, pad_id)
    check_token_ids(ids, cfg.vocab_size, "prompt token ids")
    batch, length = ids.shape
    need = length + max_new_tokens
    if need > cfg.n_positions:
        raise ValueError(
            f"prompt length {length} + max_new_tokens {max_new_tokens} = {need} is longer than "
            f"the position table (n_positions={cfg.n_positions})"
        )
    cache_len = need if cache_len is None else cache_len
    if cache_len < need:
        raise ValueError(
            f"cache_len={cache_len} is too small: prompt length {length} + max_new_tokens "
            f"{max_new_tokens} needs {need} slots"
        )
    stop = torch.zeros(batch, cfg.vocab_size, dtype=torch.bool)
    if stop_tokens is not None:
        rows = list(stop_tokens)
        per_row = (
            bool(rows)
            and not isinstance(rows[0], numbers.Number)
            and not (isinstance(rows[0], Tensor) and rows[0].ndim == 0)
        )
        if per_row and len(rows) != batch:
            raise ValueError(f"stop_tokens has {len(rows)} rows for {batch} prompts")
        for b in range(batch):
            ids_b = torch.as_tensor(_check_ids(rows[b] if per_row else rows, "stop_tokens"), dtype=torch.long)
            check_token_ids(ids_b, cfg.vocab_size, "stop_tokens")
            stop[b, ids_b] = True

    device = params["tok_embed"]["weight"].device
    dtype = params["tok_embed"]["weight"].dtype
    keys = random.split(key, max_new_tokens) if key is not None and temperature > 0 else [None] * max_new_tokens
    if matvec is None:
        matvec = batch <= MAX_ROWS and device.type == "cpu" and compile in (True, "inductor")
    step = _step_fn(cfg, float(temperature), top_k, top_p, compile, bool(matvec))
    with torch.no_grad():
        decode_params = matvec_layout(params) if matvec else params
        cache = init_gpt2_cache(cfg, batch, cache_len, start=start, dtype=dtype, device=device)
        logits, cache = prefill(params, cache, ids.to(device), cfg, inplace=True)
        tokens = sample_logits(logits, keys[0], temperature=temperature, top_k=top_k, top_p=top_p)
        out = [tokens.cpu()]
        stop, done = stop.to(device), torch.zeros(batch, dtype=torch.bool, device=device)
        for i in range(1, max_new_tokens):
            done = done | stop.gather(1, tokens[:, None])[:, 0]
            if bool(done.all()):
                break
            tokens, cache = step(decode_params, cache, tokens, keys[i])
            out.append(tokens.cpu())
    new = torch.stack(out, dim=1).tolist()
    result = []
    for b, row in enumerate(new):
        hits = [i for i, t in enumerate(row) if stop[b, t]]
        result.append(row[: hits[0] + 1] if hits else row)
    return result
