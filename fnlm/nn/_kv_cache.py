"""A functional key/value cache for auto-regressive decoding (the decoder of GPT-2 and of the
encoder–decoder Transformer).

At step ``t`` a causal layer needs ``K_{<=t} = [k_0 .. k_t]`` and ``V_{<=t}``; the rows ``k_s,
v_s`` for ``s < t`` do not change, so they are computed once and kept::

    K_cache[:, :, t] = x_t W^K,   V_cache[:, :, t] = x_t W^V,
    head_t = softmax(q_t K_cache^T / sqrt(d_k) + M_t) V_cache,   M_t[j] = 0 if start <= j <= t else -inf

The cache is a plain pytree, preallocated to ``max_len`` slots so every decode step has the same
shapes (one compiled graph for all positions)::

    {"layers": [{"k": [batch, n_heads, max_len, d_k], "v": [...]} per layer],
     "pos":   tensor()       # the next free slot (shared by every row)
     "start": [batch]}       # first real slot of each row (left padding before it)

Updating it returns a new tree (``index_copy``, never in place). Left-padded prompts share one
slot axis: row ``b``'s token in slot ``s`` has position ``s - start[b]`` and attends to slots
``start[b] .. s``. An encoder–decoder cache also holds ``"cross": [{"k", "v"}]``, the memory's
keys and values, computed once before decoding.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from fnlm.nn._attention import _project, scaled_dot_product_attention
from fnlm.tree import Params


def init_kv_cache(
    n_layers: int,
    batch: int,
    n_heads: int,
    max_len: int,
    d_k: int,
    *,
    start: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Params:
    """An empty cache: zeros ``[batch, n_heads, max_len, d_k]`` per layer for K and V, ``pos = 0``,
    ``start``: ``[batch]`` first real slot per row (default 0: no left padding)."""
    if min(n_layers, batch, n_heads, max_len, d_k) <= 0:
        raise ValueError(
            f"a KV cache needs positive sizes, got n_layers={n_layers}, batch={batch}, "
            f"n_heads={n_heads}, max_len={max_len}, d_k={d_k}"
        )
    shape = (batch, n_heads, max_len, d_k)
    if start is None:
        start = torch.zeros(batch, dtype=torch.long, device=device)
    if tuple(start.shape) != (batch,):
        raise ValueError(f"start must have shape [batch] = [{batch}], got {tuple(start.shape)}")
    return {
        "layers": [
            {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device)}
            for _ in range(n_layers)
        ],
        "pos": torch.zeros((), dtype=torch.long, device=device),
        "start": start.to(device=device, dtype=torch.long),
    }


def cache_capacity(cache: Params) -> int:
    """``max_len``: the number of slots."""
    return cache["layers"][0]["k"].shape[-2]


def cache_slots(cache: Params, n_new: int) -> Tensor:
    """The slots ``pos, ..., pos + n_new - 1`` that ``n_new`` new tokens occupy: ``[n_new]``."""
    return cache["pos"] + torch.arange(n_new, device=cache["pos"].device)


def cache_positions(cache: Params, n_new: int) -> Tensor:
    """Position ids of the new tokens, ``slot - start[b]`` (0 for left padding): ``[batch, n_new]``."""
    return (cache_slots(cache, n_new)[None, :] - cache["start"][:, None]).clamp(min=0)


def cache_mask(cache: Params, n_new: int) -> Tensor:
    """``M[b, 1, i, j] = start[b] <= j <= slot_i`` (True = may attend): ``[batch, 1, n_new, max_len]``.

    A padding slot (``slot_i < start[b]``) attends to itself only, so its (unused) output stays
    finite and never turns the cache into NaN.
    """
    slot = cache_slots(cache, n_new)[None, :, None]  # [1, n_new, 1]
    j = torch.arange(cache_capacity(cache), device=slot.device)[None, None, :]
    real = j >= cache["start"][:, None, None]
    return rearrange((j <= slot) & (real | (j == slot)), "b i j -> b 1 i j")


def cached_attention(
    params: Params,
    x: Tensor,
    layer: Params,
    slots: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    *,
    inplace: bool = False,
) -> tuple[Tensor, Params]:
    """Causal multi-head self-attention of new tokens ``x: [batch, n_new, d_model]`` over the
    cached and new keys: writes ``k = x W^K, v = x W^V`` into ``slots`` and attends with ``mask``
    (:func:`cache_mask`) and an optional additive ``bias`` ``[n_heads, n_new, max_len]``.
    Returns ``(y [batch, n_new, d_model], new layer cache)``.

    ``inplace=True`` writes into ``layer``'s tensors instead of new ones (same result). Only for a
    caller that owns the cache and never reads the old one again (:func:`fnlm.models.generate`):
    a functional update copies the whole cache every step, which at batch 8 costs as much as
    the weights' reads of GPT-2 small on a CPU.
    """
    q = _project(params["q"], x)  # [b, h, n_new, d_k]
    k_new = _project(params["k"], x).to(layer["k"].dtype)
    v_new = _project(params["v"], x).to(layer["v"].dtype)
    if inplace:
        k, v = layer["k"].index_copy_(-2, slots, k_new), layer["v"].index_copy_(-2, slots, v_new)
    else:
        k, v = layer["k"].index_copy(-2, slots, k_new), layer["v"].index_copy(-2, slots, v_new)
    heads = scaled_dot_product_attention(q, k, v, mask, bias)
    return _merge_heads(params, heads), {"k": k, "v": v}


def cross_kv(params: Params, memory: Tensor) -> Params:
    """The memory's keys and values for cross-attention, computed once: ``{"k", "v"}`` each
    ``[batch, n_heads, len_s, d_k]``."""
    return {"k": _project(params["k"], memory), "v": _project(params["v"], memory)}


def cached_cross_attention(params: Params, x: Tensor, kv: Params, mask: Tensor | None = None) -> Tensor:
    """``MultiHead(x, memory, memory)`` with the memory's K/V from :func:`cross_kv`."""
    heads = scaled_dot_product_attention(_project(params["q"], x), kv["k"], kv["v"], mask)
    return _merge_heads(params, heads)


def _merge_heads(params: Params, heads: Tensor) -> Tensor:
    """``Concat(head_1, ..., head_h) W^O + b^O``: ``[..., h, len, d_v] -> [..., len, d_model]``."""
    y = rearrange(heads, "... h l k -> ... l (h k)") @ rearrange(params["o"]["weight"], "h k d -> (h k) d")
    return y + params["o"]["bias"] if "bias" in params["o"] else y
