"""LoRA (Hu et al. 2021): low-rank adapters ``W x + (alpha / r) B A x`` for any linear map of a
parameter tree, as pure functions.

fnlm writes a linear map as ``y = x W`` with ``W: [d_in, d_out]``, so an adapter is
``{'lora_A': [d_in, r], 'lora_B': [r, d_out]}`` and the adapted map is

    y = x (W + (alpha / r) A B)          (= W x + (alpha/r) B A x in the paper's column convention)

with ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`` (peft's Kaiming-uniform) and ``B = 0`` at init, so a
fresh adapter changes nothing. Adapters are a separate small pytree with the same dotted names as
the weights they adapt (``bert.encoder.layers.0.attn.q.lora_A``). :func:`merge_lora` folds them
into the weights, ``W' = W + (alpha/r) A B``: inside the loss at every step (the frozen ``W`` is a
constant, the gradient reaches ``A`` and ``B`` through one small matrix product per adapted
weight, and every model works unchanged), and once after training for a plain tree.
Attention weights ``[d_model, n_heads, d_k]`` are adapted as the ``[d_model, n_heads*d_k]``
matrix they are (and ``W^O: [n_heads, d_v, d_model]`` as ``[n_heads*d_v, d_model]``).

Dropout on the adapter's input (peft's ``lora_dropout``) has no place in a merged weight and is
not implemented: :func:`init_lora` refuses a config with ``dropout > 0`` (training would silently
go without it), while :class:`LoraConfig` keeps a loaded adapter's value so that adapters
round-trip with peft, whose dropout acts only while training.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fnlm import random
from fnlm.tree import Params, flatten_names, unflatten_names

#: peft's default for BERT: the attention query and value projections.
DEFAULT_TARGETS = ("*.attn.q", "*.attn.v")


@dataclass(frozen=True)
class LoraConfig:
    """``rank`` r, ``alpha`` (the update is scaled by ``alpha / r``), ``targets``: glob patterns
    (``fnmatch``, ``*`` crosses dots) over the dotted names of the linear maps to adapt, i.e. the
    dicts that hold a ``weight`` (``'*.attn.q'``, ``'*.ffn.w1'``, ``'bert.encoder.layers.5.attn.*'``).
    ``dropout``: peft's ``lora_dropout``, recorded for loaded adapters only (see the module docstring)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoraConfig.targets must be non-empty glob patterns, got {self.targets!r}")
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return float(self.alpha) / self.rank


def linear_modules(params: Params) -> dict[str, Tensor]:
    """``{module name: weight}`` for every dict in the tree holding a ``weight`` of 2+ dims."""
    return {
        n[: -len(".weight")]: w
        for n, w in flatten_names(params).items()
        if n.endswith(".weight") and isinstance(w, Tensor) and w.ndim >= 2
    }


def matrix_dims(name: str, params_flat: dict[str, Any], weight: Tensor) -> tuple[int, int]:
    """``(d_in, d_out)`` of the matrix a weight stands for. The output axes are those of the bias
    (``[d_out]``, or ``[n_heads, d_k]`` for attention's q/k/v); without a bias, a 2-D weight is
    ``[d_in, d_out]``, q/k/v ``[d_in, n_heads, d_k]`` and any other 3-D weight ``[n_heads, d_v, d_out]``."""
    bias = params_flat.get(f"{name}.bias")
    if isinstance(bias, Tensor):
        n_out = bias.ndim
    elif weight.ndim == 2:
        n_out = 1
    else:
        n_out = 2 if name.rsplit(".", 1)[-1] in ("q", "k", "v") else 1
    d_in = math.prod(weight.shape[: weight.ndim - n_out])
    return d_in, math.prod(weight.shape[weight.ndim - n_out :])


def lora_targets(params: Params, cfg: LoraConfig) -> dict[str, tuple[int, int]]:
    """``{module name: (d_in, d_out)}`` of the linear maps that ``cfg.targets`` selects (every
    pattern must match one, and ``rank <= min(d_in, d_out)``)."""
    modules = linear_modules(params)
    flat = flatten_names(params)
    out: dict[str, tuple[int, int]] = {}
    for pattern in cfg.targets:
        hits = [m for m in modules if fnmatch.fnmatchcase(m, pattern)]
        if not hits:
            example = ", ".join(repr(m) for m in list(modules)[:3])
            raise ValueError(f"LoRA target {pattern!r} matches no linear map (their names look like {example}, ...)")
        for m in hits:
            out[m] = matrix_dims(m, flat, modules[m])
            if cfg.rank > min(out[m]):
                raise ValueError(
                    f"LoRA rank {cfg.rank} is above the width of {m} (d_in={out[m][0]}, "
                    f"d_out={out[m][1]}); choose rank <= {min(out[m])}"
                )
    return dict(sorted(out.items(), key=lambda kv: list(modules).index(kv[0])))


def init_lora(key: random.Key, params: Params, cfg: LoraConfig) -> Params:
    """Adapters for the targets of ``cfg``: ``{..module..: {'lora_A': [d_in, r] ~ U(-1/sqrt(d_in),
    1/sqrt(d_in)), 'lora_B': zeros [r, d_out]}}`` with the modules' dotted names."""
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"cfg must be a LoraConfig, got {type(cfg).__name__}")
    if cfg.dropout > 0:
        raise ValueError(
            f"LoraConfig.dropout={cfg.dropout}: dropout on the adapter input is not implemented (fnlm "
            "merges adapters into the weights, where it has no place); train with dropout=0.0"
        )
    targets = lora_targets(params, cfg)
    flat: dict[str, Tensor] = {}
    for (m, (d_in, d_out)), k in zip(targets.items(), random.split(key, len(targets))):
        w = flatten_names(params)[f"{m}.weight"]
        bound = 1.0 / math.sqrt(d_in)
        flat[f"{m}.lora_A"] = random.uniform(k, (d_in, cfg.rank), low=-bound, high=bound, dtype=w.dtype).to(w.device)
        flat[f"{m}.lora_B"] = torch.zeros(cfg.rank, d_out, dtype=w.dtype, device=w.device)
    return unflatten_names(flat)


def adapter_pairs(adapters: Params) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module name: (A, B)}`` from an adapter tree (each module needs both factors)."""
    flat = flatten_names(adapters)
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for n in flat:
        module, _, leaf = n.rpartition(".")
        if leaf not in ("lora_A", "lora_B"):
            raise ValueError(f"adapters: unexpected entry {n!r} (expected <module>.lora_A / <module>.lora_B)")
        if module not in pairs:
            a, b = flat.get(f"{module}.lora_A"), flat.get(f"{module}.lora_B")
            if a is None or b is None:
                raise ValueError(f"adapters: {module} needs both lora_A and lora_B")
            pairs[module] = (a, b)
    return pairs


def merge_lora(params: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """``W' = W + (alpha / r) A B`` for every adapted weight (reshaped to ``W``'s shape); a plain
    tree with ``params``' structure. Used inside the loss (gradients flow to ``A`` and ``B``) and
    to fold trained adapters into the model for good."""
    flat = flatten_names(params)
    for m, (a, b) in adapter_pairs(adapters).items():
        w = flat.get(f"{m}.weight")
        if w is None:
            raise ValueError(f"adapter for {m!r}, but params have no {m}.weight")
        d_in, d_out = matrix_dims(m, flat, w)
        if tuple(a.shape) != (d_in, cfg.rank) or tuple(b.shape) != (cfg.rank, d_out):
            raise ValueError(
                f"adapter for {m}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                f"a weight {tuple(w.shape)} (d_in={d_in}, d_out={d_out}) at rank {cfg.rank}"
            )
        flat[f"{m}.weight"] = w + (cfg.scale * (a @ b)).reshape(w.shape).to(w.dtype)
    return unflatten_names(flat)
