"""Scaled dot-product and multi-head attention (Vaswani et al. 2017, §3.2).

Masks are boolean and **True means "may attend"** (the convention of
``F.scaled_dot_product_attention`` and of BERT's ``attention_mask``), broadcastable to
``[*batch, n_heads, len_q, len_k]``. Additive float biases (e.g. relative position biases) are
passed separately as ``bias``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

from fnlm import random
from fnlm._checks import check_broadcast, check_last_dim
from fnlm.nn import _dropout
from fnlm.nn._dynamic_int8 import int8_linear, weight_shape
from fnlm.tree import Params


# ----------------------------------------------------------------------------- masks
def causal_mask(len_q: int, len_k: int | None = None, device=None) -> Tensor:
    """``M[i, j] = (j <= i)``: position ``i`` sees itself and the past only. Shape ``[len_q, len_k]``."""
    len_k = len_q if len_k is None else len_k
    return torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril()


def padding_mask(attention_mask: Tensor) -> Tensor:
    """``[*batch, len_k]`` (1 = real token, 0 = padding) -> ``[*batch, 1, 1, len_k]`` boolean,
    which broadcasts over heads and queries: padded keys receive no attention."""
    return rearrange(attention_mask.bool(), "... k -> ... 1 1 k")


# ----------------------------------------------------------------------------- attention
def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    dropout: float = 0.0,
    key: random.Key | None = None,
    train: bool = False,
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + B + M) V``, written out.

    ``q: [..., len_q, d_k]``, ``k: [..., len_k, d_k]``, ``v: [..., len_k, d_v]`` ->
    ``[..., len_q, d_v]``. ``M`` is 0 where ``mask`` is True and ``-inf`` elsewhere; ``B`` is an
    optional additive bias. Dropout (if training) acts on the attention probabilities. A query
    whose mask row is all False attends to nothing and gets output 0 (as the fused kernel).
    ``return_probs=True``: ``(output, P)`` with ``P: [..., len_q, len_k]`` the probabilities
    that multiplied ``V`` (after attention dropout, as Hugging Face's ``output_attentions``).
    """
    d_k = q.shape[-1]
    scores = einsum(q, k, "... i d, ... j d -> ... i j") / math.sqrt(d_k)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
        # A query that may attend to no key would get softmax(-inf, ..., -inf) = 0/0 = NaN (and NaN
        # gradients). Give it output 0 instead, as the fused kernel does: softmax over zeros, then 0.
        empty = ~mask.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(empty, 0.0)
    probs = _dropout.dropout(probs, dropout, key=key, train=train)
    out = einsum(probs, v, "... i j, ... j d -> ... i d")
    return (out, probs) if return_probs else out


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    is_causal: bool = False,
    dropout: float = 0.0,
    key: random.Key | None = None,
    train: bool = False,
    impl: str = "auto",
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``softmax(Q K^T / sqrt(d_k) + B + M) V`` — same maths as :func:`attention_reference`.

    ``impl="auto"`` uses ``torch.nn.functional.scaled_dot_product_attention`` (flash /
    memory-efficient kernels on GPU; ``is_causal`` without other masks takes the flash path).
    Attention dropout while training uses the reference formula instead, because the fused
    kernel draws its dropout mask from torch's global RNG and fnlm's randomness comes only from
    explicit keys. ``impl="sdpa"`` keeps the fused kernel even then: its dropout mask comes from
    torch's global generator, which :func:`fnlm.train.make_train_step` (``seed_global_rng=True``)
    seeds from the step's key, so masks are reproducible per key and device but are not the
    explicit-key masks of the formula. ``impl="reference"`` forces the formula. ``return_probs=True`` also forces it
    and returns ``(output, P)`` (see :func:`attention_reference`): the probabilities come from
    the very computation that produced the output.
    """
    if impl not in ("auto", "sdpa", "reference"):
        raise ValueError(f"impl must be 'auto', 'sdpa' or 'reference', got {impl!r}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share d_k: got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must share len_k: got k {tuple(k.shape)} and v {tuple(v.shape)}")
    target = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2])
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be boolean (True = may attend), got {mask.dtype}; pass additive float masks as bias="
            )
        check_broadcast("mask", mask, target, "*batch, len_q, len_k")
    if bias is not None:
        check_broadcast("bias", bias, target, "*batch, len_q, len_k")
    if is_causal:
        causal = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        keyed_dropout = train and dropout > 0 and impl != "sdpa"
        if mask is not None or bias is not None or impl == "reference" or keyed_dropout or return_probs:
            mask = causal if mask is None else mask & causal
            is_causal = False

    if impl == "reference" or (train and dropout > 0.0 and impl != "sdpa") or return_probs:
        return attention_reference(
            q, k, v, mask, bias, dropout=dropout, key=key, train=train, return_probs=return_probs
        )

    attn_mask = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    device = q.device.type
    if train and dropout > 0.0 and torch.is_autocast_enabled(device):
        # autocast's own cast, done by hand: torch.func.grad through the kernel's dropout under
        # autocast fails on CPU ("expected scalar type Float but found BFloat16", torch 2.13)
        dt = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            attn_mask = attn_mask.to(dt) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
            return F.scaled_dot_product_attention(
                q.to(dt), k.to(dt), v.to(dt), attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout
            )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout if train else 0.0
    )


# ----------------------------------------------------------------------------- multi-head
def init_multi_head_attention(
    key: random.Key,
    d_model: int,
    n_heads: int,
    *,
    d_kv: int | None = None,
    bias: bool = True,
    std: float | None = None,
) -> Params:
    """Per-head projections ``W^Q, W^K: [d_model, n_heads, d_k]``, ``W^V: [d_model, n_heads, d_v]``,
    ``W^O: [n_heads, d_v, d_model]`` with ``d_k = d_v = d_model / n_heads``.

    Xavier-uniform over the full ``[d_model, d_model]`` matrices (as ``nn.MultiheadAttention``)
    unless ``std`` is given (``N(0, std^2)``, as BERT). ``d_kv``: the width of the keys/values'
    source, for cross-attention from a memory of another width.
    """
    if n_heads <= 0 or d_model % n_heads != 0:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    d_k = d_model // n_heads
    d_kv = d_model if d_kv is None else d_kv
    kq, kk, kv, ko = random.split(key, 4)

    def w(k, d_in, shape):
        if std is not None:
            return random.normal(k, shape, std=std)
        a = math.sqrt(6.0 / (d_in + d_model))
        return random.uniform(k, shape, low=-a, high=a)

    def proj(k, d_in):
        p = {"weight": w(k, d_in, (d_in, n_heads, d_k))}
        if bias:
            p["bias"] = torch.zeros(n_heads, d_k)
        return p

    out = {"weight": w(ko, d_model, (n_heads, d_k, d_model))}
    if bias:
        out["bias"] = torch.zeros(d_model)
    return {"q": proj(kq, d_model), "k": proj(kk, d_kv), "v": proj(kv, d_kv), "o": out}


def _project(p: dict[str, Tensor], x: Tensor) -> Tensor:
    """``x W_i + b_i`` for every head ``i`` at once: ``[..., len, d] -> [..., n_heads, len, d_k]``.

    All heads in one matrix product, with ``W`` viewed as ``[d, n_heads * d_k]``, then split into
    heads.
    """
    if "weight_int8" in p:  # dynamic int8 (fnlm.nn._dynamic_int8): [..., len, h, k] from the scale's shape
        return rearrange(int8_linear(p, x), "... l h k -> ... h l k")
    n_heads = p["weight"].shape[1]
    y = x @ rearrange(p["weight"], "d h k -> d (h k)")
    if "bias" in p:
        y = y + rearrange(p["bias"], "h k -> (h k)")
    return rearrange(y, "... l (h k) -> ... h l k", h=n_heads)


def multi_head_attention(
    params: Params,
    x_q: Tensor,
    x_kv: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
    key: random.Key | None = None,
    train: bool = False,
    impl: str = "auto",
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O``,
    ``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)``.

    Self-attention: ``Q = K = V = x_q``. Cross-attention: ``Q = x_q``, ``K = V = x_kv`` (the
    lengths may differ). ``x_q: [*batch, len_q, d_model]``, ``x_kv: [*batch, len_k, d_kv]`` ->
    ``[*batch, len_q, d_model]``; ``*batch`` may be empty (handy under ``vmap``).

    Masks: ``mask`` (bool, True = may attend) broadcastable to ``[*batch, n_heads, len_q, len_k]``;
    ``key_padding_mask`` ``[*batch, len_k]`` (True/1 = real token); ``causal=True`` adds
    ``j <= i``; ``bias`` is added to the scores (e.g. :func:`fnlm.positional.relative_bias`).
    ``return_probs=True``: ``(output, P)``, ``P: [*batch, n_heads, len_q, len_k]`` the attention
    probabilities of the same computation (the reference formula instead of the fused kernel).
    """
    x_kv = x_q if x_kv is None else x_kv
    n_heads = weight_shape(params["o"])[0]
    check_last_dim("attention query input x_q", x_q, weight_shape(params["q"])[0])
    check_last_dim("attention key/value input x_kv", x_kv, weight_shape(params["k"])[0], "d_kv")
    if x_q.shape[:-2] != x_kv.shape[:-2]:
        raise ValueError(f"x_q {tuple(x_q.shape)} and x_kv {tuple(x_kv.shape)} have different batch axes")
    batch, len_q, len_k = x_q.shape[:-2], x_q.shape[-2], x_kv.shape[-2]
    target = (*batch, n_heads, len_q, len_k)
    if mask is not None:  # validate the caller's mask before it is combined with the padding mask
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a boolean tensor (True = may attend), got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}; pass additive float masks as bias="
            )
        check_broadcast("mask", mask, target, "*batch, n_heads, len_q, len_k")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (*batch, len_k):
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                f"expected [*batch, len_k] = {[*batch, len_k]}"
            )
        kpm = padding_mask(key_padding_mask)
        mask = kpm if mask is None else mask & kpm
    if bias is not None:
        check_broadcast("bias", bias, target, "*batch, n_heads, len_q, len_k")

    q = _project(params["q"], x_q)  # [..., h, len_q, d_k]
    k = _project(params["k"], x_kv)  # [..., h, len_k, d_k]
    v = _project(params["v"], x_kv)  # [..., h, len_k, d_v]
    heads = scaled_dot_product_attention(
        q,
        k,
        v,
        mask,
        bias,
        is_causal=causal,
        dropout=dropout,
        key=key,
        train=train,
        impl=impl,
        return_probs=return_probs,
    )
    heads, probs = heads if return_probs else (heads, None)
    # MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O
    concat = rearrange(heads, "... h l k -> ... l (h k)")
    if "weight_int8" in params["o"]:
        y = int8_linear(params["o"], concat)
    else:
        y = concat @ rearrange(params["o"]["weight"], "h k d -> (h k) d")
        y = y + params["o"]["bias"] if "bias" in params["o"] else y
    return (y, probs) if return_probs else y
