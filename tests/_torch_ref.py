"""Copy fnlm params into ``torch.nn`` reference modules (the one weight mapping of the parity tests).

fnlm layouts (docs/design.md) -> ``torch.nn`` layouts:

* linear ``weight [d_in, d_out]`` -> ``nn.Linear.weight [d_out, d_in]`` (transpose);
* attention ``q/k/v.weight [d_model, n_heads, d_k]`` -> rows of ``in_proj_weight [3 d, d]``
  (``nn.MultiheadAttention`` splits the projected ``d`` axis head-major, ``h * d_k + k``);
  ``q/k/v.bias [n_heads, d_k]`` -> ``in_proj_bias [3 d]``;
  ``o.weight [n_heads, d_k, d_model]`` -> ``out_proj.weight [d_model, d]``;
* layer norm ``gamma, beta`` -> ``weight, bias``.

Masks: fnlm's boolean masks mean True = may attend; ``nn``'s boolean masks mean True = masked
out, so the reference gets ``~mask``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fnlm import random
from fnlm.tree import tree_flatten, tree_unflatten


def perturb(params, key: random.Key, std: float = 0.3):
    """A copy of ``params`` with every leaf replaced by ``N(0, std^2)`` noise (plus 1 for layer-norm
    gains), so that zero-initialised biases and unit gains cannot hide a mapping mistake."""
    leaves, spec = tree_flatten(params)
    keys = random.split(key, len(leaves))
    new = [random.normal(k, x.shape, std=std, dtype=x.dtype) for k, x in zip(keys, leaves)]
    return tree_unflatten(new, spec)


def linear_sd(p: dict, prefix: str) -> dict[str, Tensor]:
    sd = {f"{prefix}.weight": p["weight"].T}
    if "bias" in p:
        sd[f"{prefix}.bias"] = p["bias"]
    return sd


def layer_norm_sd(p: dict, prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}.weight": p["gamma"], f"{prefix}.bias": p["beta"]}


def mha_sd(p: dict, prefix: str) -> dict[str, Tensor]:
    """fnlm multi-head attention params -> ``nn.MultiheadAttention`` state dict entries."""

    def w(name):  # [d_in, h, d_k] -> [h * d_k, d_in]
        x = p[name]["weight"]
        return x.reshape(x.shape[0], -1).T

    o = p["o"]["weight"]  # [h, d_k, d_model]
    sd = {
        f"{prefix}.in_proj_bias": torch.cat([p[n]["bias"].reshape(-1) for n in ("q", "k", "v")]),
        f"{prefix}.out_proj.weight": o.reshape(-1, o.shape[-1]).T,
        f"{prefix}.out_proj.bias": p["o"]["bias"],
    }
    if p["k"]["weight"].shape[0] == p["q"]["weight"].shape[0]:  # packed, as nn.MHA stores it
        sd[f"{prefix}.in_proj_weight"] = torch.cat([w("q"), w("k"), w("v")], 0)
    else:  # keys/values of another width (nn.MHA(kdim=, vdim=)): separate matrices
        sd.update({f"{prefix}.{n}_proj_weight": w(n) for n in ("q", "k", "v")})
    return sd


def encoder_layer_sd(p: dict, prefix: str = "") -> dict[str, Tensor]:
    """``init_encoder_block`` params -> ``nn.TransformerEncoderLayer``."""
    pre = f"{prefix}." if prefix else ""
    return {
        **mha_sd(p["attn"], f"{pre}self_attn"),
        **linear_sd(p["ffn"]["w1"], f"{pre}linear1"),
        **linear_sd(p["ffn"]["w2"], f"{pre}linear2"),
        **layer_norm_sd(p["norm1"], f"{pre}norm1"),
        **layer_norm_sd(p["norm2"], f"{pre}norm2"),
    }


def decoder_layer_sd(p: dict, prefix: str = "") -> dict[str, Tensor]:
    """``init_decoder_block`` params -> ``nn.TransformerDecoderLayer``."""
    pre = f"{prefix}." if prefix else ""
    return {
        **mha_sd(p["self_attn"], f"{pre}self_attn"),
        **mha_sd(p["cross_attn"], f"{pre}multihead_attn"),
        **linear_sd(p["ffn"]["w1"], f"{pre}linear1"),
        **linear_sd(p["ffn"]["w2"], f"{pre}linear2"),
        **layer_norm_sd(p["norm1"], f"{pre}norm1"),
        **layer_norm_sd(p["norm2"], f"{pre}norm2"),
        **layer_norm_sd(p["norm3"], f"{pre}norm3"),
    }


def transformer_sd(params: dict) -> dict[str, Tensor]:
    """``init_transformer`` params (with final norms) -> ``nn.Transformer`` (embeddings and the output
    projection are not part of ``nn.Transformer``; the tests apply them outside)."""
    sd: dict[str, Tensor] = {}
    for i, layer in enumerate(params["encoder"]["layers"]):
        sd.update(encoder_layer_sd(layer, f"encoder.layers.{i}"))
    for i, layer in enumerate(params["decoder"]["layers"]):
        sd.update(decoder_layer_sd(layer, f"decoder.layers.{i}"))
    sd.update(layer_norm_sd(params["encoder"]["norm"], "encoder.norm"))
    sd.update(layer_norm_sd(params["decoder"]["norm"], "decoder.norm"))
    return sd


def load(module: torch.nn.Module, sd: dict[str, Tensor]) -> torch.nn.Module:
    """Load ``sd`` strictly (every parameter of ``module`` must be mapped) and switch to eval mode."""
    module.load_state_dict({k: v.detach().clone().contiguous() for k, v in sd.items()}, strict=True)
    return module.eval()


def nn_mask(mask: Tensor | None) -> Tensor | None:
    """fnlm boolean mask (True = may attend) -> ``nn`` boolean mask (True = masked out)."""
    return None if mask is None else ~mask
