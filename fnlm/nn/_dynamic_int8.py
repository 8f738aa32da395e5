"""Dynamic int8: int8 weights *and* int8 activations, the activations quantized at every call.

For ``y = x W + b`` with ``W`` stored by :func:`fnlm.nn.quantize_int8` (``W ~= W_q s``, ``W_q``
int8 and one scale ``s_c`` per output channel)::

    a_r  = max_k |x_rk| / 127                 one scale per row (token) of x, computed per call
    x_q  = round(x / a_r)                     int8 in [-127, 127]
    y_rc = (sum_k x_q[r, k] W_q[k, c]) a_r s_c + b_c     the sum an exact int32 product (torch._int_mm)

Unlike weight-only int8 (:func:`fnlm.nn.with_int8_weights`, which expands ``W_q`` back to float
inside the graph and so multiplies in float), the matrix product itself runs on int8 operands
with int32 accumulation. The parameters stay a pytree of ordinary tensors (the very tree of
weight-only int8), and two kernels compute the product (``backend``):

* ``'int_mm'``: the formula above with ``torch._int_mm``, plain aten ops, so ``torch.compile``,
  ``torch.export`` and AOTInductor trace it (the exported ``int8='dynamic'`` package uses it).
  torch's CPU ``_int_mm`` is a plain loop, not a tuned GEMM, on CPUs like this one (AVX2, no
  VNNI): correct, but slower than float32 there.
* ``'fbgemm'``: ``torch.ops.quantized.linear_dynamic`` (fbgemm's int8 GEMM, what ``torch.ao``'s
  ``quantize_dynamic`` runs), the weight packed from ``W_q`` and ``s`` at each call (a cost of
  order ``K N``, against the product's ``M K N`` for ``M`` tokens) so nothing but tensors is
  stored. fbgemm quantizes the activations with one scale per call for the whole tensor, in 7 bits
  (``reduce_range``), so it is a little less accurate than the per-row formula. Eager CPU only.
* ``'auto'`` (what the models use): ``'fbgemm'`` in eager CPU inference where fbgemm is
  available, ``'int_mm'`` under ``torch.compile`` / ``torch.export`` / ``torch.func`` transforms,
  with autograd, or elsewhere.

:func:`fnlm.nn.linear` and multi-head attention's projections use this path whenever their node
holds ``weight_int8`` + ``weight_scale`` instead of ``weight``: ``bert_classifier(quantize_int8(params), ...)``
is the dynamically quantized forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fnlm._checks import is_traced
from fnlm.tree import Params

INT8_MAX = 127


BACKENDS = ("auto", "int_mm", "fbgemm")


def _fbgemm_ok(x: Tensor) -> bool:
    """Eager CPU inference with fbgemm built in: where ``'auto'`` picks ``'fbgemm'``."""
    return (
        x.device.type == "cpu"
        and not is_traced(x)
        and not torch.compiler.is_exporting()
        and not (torch.is_grad_enabled() and x.requires_grad)
        and "fbgemm" in torch.backends.quantized.supported_engines
    )


def _fbgemm_matmul(x2: Tensor, w2: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    n = w2.shape[1]
    qw = torch._make_per_channel_quantized_tensor(
        w2.t().contiguous(), scale.reshape(n).double(), torch.zeros(n, dtype=torch.long), 0
    )
    packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.reshape(n).float())
    return torch.ops.quantized.linear_dynamic(x2.float().contiguous(), packed, True)


def dynamic_int8_matmul(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, *, bias: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """``y = (round(x / a) W_q) a s (+ b)`` with ``a`` = per-row ``max |x| / 127``: ``x [..., K]``,
    ``W_q`` int8 of ``K x N`` elements (any shape whose leading axes flatten to ``K``), ``s`` (and
    ``b``) of ``N`` elements -> ``y [..., N]`` in ``x``'s dtype. ``backend``: see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n = w_scale.numel()
    w2 = w_int8.reshape(-1, n)
    k = w2.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"dynamic_int8_matmul: input has {x.shape[-1]} features, the int8 weight expects {k}")
    lead = x.shape[:-1]
    if backend == "fbgemm" or (backend == "auto" and _fbgemm_ok(x)):
        if backend == "fbgemm" and not _fbgemm_ok(x):
            raise ValueError(
                "backend='fbgemm' runs only in eager CPU inference (no autograd, compile or export) "
                "with fbgemm available; use backend='int_mm'"
            )
        return _fbgemm_matmul(x.reshape(-1, k), w2, w_scale, bias).reshape(*lead, n).to(x.dtype)
    x2 = x.reshape(-1, k).float()
    a = x2.abs().amax(-1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    x_q = torch.round(x2 / a).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    y = torch._int_mm(x_q, w2).float() * a * w_scale.reshape(1, n).float()
    if bias is not None:
        y = y + bias.reshape(1, n).float()
    return y.reshape(*lead, n).to(x.dtype)


def int8_linear(params: Params, x: Tensor, *, backend: str = "auto") -> Tensor:
    """``y = x W + b`` for a node ``{'weight_int8', 'weight_scale', 'bias'?}`` through
    :func:`dynamic_int8_matmul`; the output has the scale's shape as trailing axes (``[..., d_out]``
    for a linear map)."""
    s = params["weight_scale"]
    y = dynamic_int8_matmul(x, params["weight_int8"], s, bias=params.get("bias"), backend=backend)
    return y.reshape(*y.shape[:-1], *s.shape) if s.ndim > 1 else y


def weight_shape(params: Params) -> torch.Size:
    """The shape of a node's weight, float (``weight``) or int8 (``weight_int8``)."""
    return (params["weight"] if "weight" in params else params["weight_int8"]).shape
