"""Matrix-vector products while decoding one row on a CPU: ``y_j = sum_i x_i W_ij``, each weight read once.

Decoding one row reads every weight once per token, so its speed is memory bandwidth. On this
project's CPU, MKL's ``x @ W`` for a ``[1, d]`` row streamed the weights at 17-24 GB/s, while the
kernel that Inductor writes for the same sum, when the summed axis ``i`` is contiguous in memory,
streamed them at 32-43 GB/s (a plain read: 46 GB/s). Two pieces make decoding use it:

* :func:`matvec_layout`: the same parameters, with every matrix that multiplies from the right
  stored input-axis-innermost (``W^T`` contiguous, seen as ``W``: same shapes and values, so the
  model code is unchanged). The tied LM head ``E^T`` already is. One copy of the block weights.
* :func:`matvec_pass`: an Inductor graph pass that writes ``mm(x, W)`` with one row ``x`` and such a
  ``W`` as ``(W^T[:, None, :] * x[None]).sum(-1)^T``, which Inductor lowers to one reduction kernel
  per product (``torch._dynamo.utils.counters["inductor"]["fnlm_matvec"]`` counts them). Other
  products are left to the BLAS. (Inductor's own ``decompose_mem_bound_mm`` pass rewrites products
  the same way, but on a CPU only when every size is at most 2048, whatever the layout.)

Batches of 2-8 rows are left to the BLAS too: the same rewrite beat MKL for 8 rows of one
product alone, but inside GPT-2's decode step Inductor fused the products with their
consumers in an order that re-read the weights per row, and the step ran slower than with MKL's products
(``docs/benchmarks.md``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect

import torch
from torch import Tensor

from fnlm.tree import Params

aten = torch.ops.aten
#: Products with at most this many rows are rewritten (see above for why not more).
MAX_ROWS = 1


def input_axes_innermost(w: Tensor, n_in: int) -> Tensor:
    """``w`` (axes ``[in..., out...]``, the first ``n_in`` are inputs) with the same shape and values,
    stored with its input axes innermost: a view of a contiguous ``[out..., in...]`` copy."""
    order = list(range(n_in, w.ndim)) + list(range(n_in))  # [out..., in...]
    back = sorted(range(w.ndim), key=order.__getitem__)
    return w.permute(order).contiguous().permute(back)


def matvec_layout(params: Params) -> Params:
    """GPT-2 parameters (:func:`fnlm.models.init_gpt2`) with every block weight stored input-axis
    innermost (:func:`input_axes_innermost`): ``W^Q, W^K, W^V [d, h, d_k]``, ``W^O [h, d_k, d]`` and
    the FFN's ``W_1, W_2``. Equal values; only the memory order differs."""

    def layer(p: Params) -> Params:
        attn = {
            **p["attn"],
            **{n: {**p["attn"][n], "weight": input_axes_innermost(p["attn"][n]["weight"], 1)} for n in ("q", "k", "v")},
        }
        attn["o"] = {**p["attn"]["o"], "weight": input_axes_innermost(p["attn"]["o"]["weight"], 2)}
        ffn = {n: {**w, "weight": input_axes_innermost(w["weight"], 1)} for n, w in p["ffn"].items()}
        return {**p, "attn": attn, "ffn": ffn}

    return {**params, "layers": [layer(p) for p in params["layers"]]}


def _matvec(x: Tensor, w: Tensor) -> Tensor:
    """``x W`` as ``y^T = (W^T[:, None, :] * x[None]).sum(-1)``: ``[rows, d_in] -> [rows, d_out]``, the
    output axis outermost so that each row of ``W^T`` is read once for every row of ``x``."""
    return (w.t()[:, None, :] * x[None]).sum(-1).t()


def _is_matvec(x: torch.fx.Node, w: torch.fx.Node) -> bool:
    """``x [rows <= MAX_ROWS, d_in]`` times a CPU ``W [d_in, d_out]`` whose ``d_in`` axis is contiguous."""
    xv, wv = x.meta.get("val"), w.meta.get("val")
    return (
        isinstance(xv, Tensor)
        and isinstance(wv, Tensor)
        and xv.device.type == "cpu"
        and xv.ndim == 2
        and wv.ndim == 2
        and xv.shape[0] <= MAX_ROWS
        and wv.stride(0) == 1
        and wv.shape[0] > 1
    )


@functools.cache
def matvec_pass():
    """The pass, for ``compile_options={"post_grad_custom_post_pass": matvec_pass()}`` (as
    :func:`fnlm.models.generate` uses it). Built on first use: it imports Inductor."""
    from torch._dynamo.utils import counters
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from torch._inductor.pattern_matcher import Arg, CallFunction, PatternMatcherPass, register_graph_pattern

    patterns = PatternMatcherPass(pass_name="fnlm_matvec")
    source_hash = hashlib.sha256(inspect.getsource(inspect.getmodule(_is_matvec)).encode()).hexdigest()

    @register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=patterns)
    def mm(match, x, w):
        if _is_matvec(x, w):
            counters["inductor"]["fnlm_matvec"] += 1
            match.replace_by_example(_matvec, [x, w])

    @register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=patterns)
    def addmm(match, b, x, w):
        if _is_matvec(x, w):
            counters["inductor"]["fnlm_matvec"] += 1
            match.replace_by_example(lambda b, x, w: _matvec(x, w) + b, [b, x, w])

    class MatvecPass(CustomGraphPass):
        """Inductor post-grad pass: one-row products with an input-contiguous weight as reductions."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            patterns.apply(graph)

        def uuid(self) -> str:  # part of Inductor's cache key: changes with this file
            return source_hash

    return MatvecPass()
