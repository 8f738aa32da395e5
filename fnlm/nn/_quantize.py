"""Weight-only int8 (gpt-fast's ``quantize.py``): ``W ~= W_q * s``, one scale per output channel.

``s_c = max_i |W_ic| / 127`` and ``W_q = round(W / s)`` (int8, in ``[-127, 127]``), the maximum
over every *input* axis of the weight, so each output channel keeps its own scale. fnlm's weight
layouts put the output axes last: a linear map ``[d_in, d_out]`` (``s: [d_out]``), attention's
``W^Q, W^K, W^V: [d_model, n_heads, d_k]`` (``s: [n_heads, d_k]``) and ``W^O: [n_heads, d_k,
d_model]`` (``s: [d_model]``); the output axes are those of the weight's sibling ``bias`` (the
last axis when there is none).

Quantization is a pure map of the parameter tree: a selected ``{'weight': W, ...}`` becomes
``{'weight_int8': W_q, 'weight_scale': s, ...}`` (other leaves untouched), a quarter of the
bytes. :func:`dequantize_int8` is its inverse up to rounding, and :func:`with_int8_weights` turns
any pure forward ``f(params, ...)`` into one that takes the quantized tree,
``f(dequantize_int8(qparams), ...)``: the weights are stored (and exported) as int8 and expanded
to the compute dtype inside the forward, the matrix products themselves unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from fnlm.tree import Params, Spec, _spec_predicate, flatten_names

INT8_MAX = 127


def _default_spec(name: str, leaf: Any) -> bool:
    """Every matrix that multiplies activations: a ``weight`` of 2+ axes, except the embedding
    tables (rows are gathered, not multiplied)."""
    parts = name.split(".")
    return parts[-1] == "weight" and isinstance(leaf, Tensor) and leaf.ndim >= 2 and "embeddings" not in parts


def quantize_weight(w: Tensor, n_out: int = 1) -> tuple[Tensor, Tensor]:
    """``(W_q int8, s)`` with ``s = max |W| / 127`` over all but the last ``n_out`` axes and
    ``W_q = round(W / s)``; ``s`` has shape ``W.shape[-n_out:]`` (float32)."""
    if not isinstance(w, Tensor) or not w.dtype.is_floating_point:
        raise TypeError(f"quantize_weight needs a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if not 1 <= n_out < w.ndim:
        raise ValueError(f"n_out must be in [1, {w.ndim - 1}] for a weight of shape {tuple(w.shape)}, got {n_out}")
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=tuple(range(w.ndim - n_out)))
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # an all-zero channel stays 0
    w_q = torch.round(w32 / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return w_q, scale


def quantize_int8(params: Params, spec: Spec = None) -> Params:
    """The tree with each selected ``weight`` replaced by ``weight_int8`` + ``weight_scale``.

    ``spec`` (as :func:`fnlm.tree.mask`: glob pattern(s) over dotted names, or a predicate
    ``(name, leaf) -> bool``) picks the weights; default: every ``weight`` with 2+ axes outside
    ``embeddings`` (all linear and attention projections, the pooler and the classifier).
    """
    names = flatten_names(params)
    pred = _default_spec if spec is None else _spec_predicate(spec, list(names), "quantize_int8")
    if not any(pred(n, leaf) for n, leaf in names.items()):
        raise ValueError("quantize_int8: no weight selected (nothing to quantize)")

    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, list):
            return [walk(v, f"{prefix}{i}.") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v, f"{prefix}{k}.") for k, v in node.items() if k != "weight" or isinstance(v, (dict, list))}
        w = node.get("weight")
        if isinstance(w, Tensor):
            if not pred(f"{prefix}weight", w):
                out["weight"] = w
            else:
                bias = node.get("bias")
                n_out = bias.ndim if isinstance(bias, Tensor) else 1
                if isinstance(bias, Tensor) and tuple(w.shape[-n_out:]) != tuple(bias.shape):
                    raise ValueError(
                        f"quantize_int8: {prefix}weight {tuple(w.shape)} does not end in its bias's "
                        f"shape {tuple(bias.shape)}, so its output axes are unknown"
                    )
                out["weight_int8"], out["weight_scale"] = quantize_weight(w, n_out)
        return out

    return walk(params, "")


def dequantize_int8(qparams: Params, dtype: torch.dtype = torch.float32) -> Params:
    """``W = W_q * s`` (in ``dtype``) wherever :func:`quantize_int8` left ``weight_int8``; the tree
    of the original structure (other leaves as they are)."""

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items() if k not in ("weight_int8", "weight_scale")}
        if "weight_int8" in node:
            if "weight_scale" not in node:
                raise ValueError("dequantize_int8: a 'weight_int8' without its 'weight_scale'")
            out["weight"] = node["weight_int8"].to(dtype) * node["weight_scale"].to(dtype)
        return out

    return walk(qparams)


def with_int8_weights(fn: Callable[..., Any], dtype: torch.dtype = torch.float32) -> Callable[..., Any]:
    """``f(qparams, *args, **kw) = fn(dequantize_int8(qparams, dtype), *args, **kw)``: the forward
    ``fn`` on a tree from :func:`quantize_int8` (traceable by ``torch.compile`` and ``torch.export``,
    which then keep the weights as int8 constants)."""

    def forward(qparams: Params, *args: Any, **kwargs: Any) -> Any:
        return fn(dequantize_int8(qparams, dtype), *args, **kwargs)

    return forward
