"""Dynamic int8: int8 weights *and* int8 activations, the activations quantized at every call.

For ``y = x W + b`` with ``W`` stored by :func:`fnlm.nn.quantize_int8` (``W ~= W_q s``, ``W_q``
int8 and one scale ``s_c`` per output channel)::

    a_r  = max_k |x_rk| / 127                 one scale per row (token) of x, computed per call
    x_q  = round(x / a_r)                     int8 in [-127, 127]
    y_rc = (sum_k x_q[r, k] W_q[k, c]) a_r s_c + b_c     the sum an exact int32 product (torch._int_mm)

Unlike weight-only int8 (:func:`fnlm.nn.with_int8_weights`, which expands ``W_q`` back to float
inside the graph and so multiplies in float), the matrix product itself runs on int8 operands
with int32 accumulation. The route is ``torch._int_mm`` on plain tensors rather than
``torch.ops.quantized.linear_dynamic`` on prepacked weights (``torch.ao``'s ``quantize_dynamic``):
the parameters stay a pytree of ordinary tensors (the same tree as weight-only int8), so the pure
forward, ``torch.compile`` and ``torch.export`` / AOTInductor take it unchanged, and per-row
activation scales lose less than ``linear_dynamic``'s one scale per tensor.

:func:`fnlm.nn.linear` and multi-head attention's projections use this path whenever their node
holds ``weight_int8`` + ``weight_scale`` instead of ``weight``: ``bert_classifier(quantize_int8(params), ...)``
is the dynamically quantized forward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fnlm.tree import Params

INT8_MAX = 127


def dynamic_int8_matmul(x: Tensor, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    """``y = (round(x / a) W_q) a s`` with ``a`` = per-row ``max |x| / 127``: ``x [..., K]``,
    ``W_q`` int8 of ``K x N`` elements (any shape whose leading axes flatten to ``K``), ``s`` of
    ``N`` elements -> ``y [..., N]`` in ``x``'s dtype."""
    n = w_scale.numel()
    w2 = w_int8.reshape(-1, n)
    k = w2.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"dynamic_int8_matmul: input has {x.shape[-1]} features, the int8 weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).float()
    a = x2.abs().amax(-1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    x_q = torch.round(x2 / a).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    y = torch._int_mm(x_q, w2).float() * a * w_scale.reshape(1, n).float()
    return y.reshape(*lead, n).to(x.dtype)


def int8_linear(params: Params, x: Tensor) -> Tensor:
    """``y = x W + b`` for a node ``{'weight_int8', 'weight_scale', 'bias'?}`` through
    :func:`dynamic_int8_matmul`; the output has the scale's shape as trailing axes (``[..., d_out]``
    for a linear map)."""
    s = params["weight_scale"]
    y = dynamic_int8_matmul(x, params["weight_int8"], s)
    if s.ndim > 1:
        y = y.reshape(*y.shape[:-1], *s.shape)
    return y + params["bias"] if "bias" in params else y


def weight_shape(params: Params) -> torch.Size:
    """The shape of a node's weight, float (``weight``) or int8 (``weight_int8``)."""
    return (params["weight"] if "weight" in params else params["weight_int8"]).shape
