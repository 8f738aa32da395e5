"""Hugging Face GPT-2 checkpoints <-> fnlm GPT-2 params, both ways, through one mapping table.

* :func:`load_gpt2` reads ``config.json`` + ``model.safetensors`` (or shards listed in
  ``model.safetensors.index.json``, or one ``.safetensors`` file plus ``config=``), names with or
  without the ``transformer.`` prefix of ``GPT2LMHeadModel``. Pickles are refused with the
  conversion command. The causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` are skipped;
  a tied ``lm_head.weight`` must equal ``wte.weight``.
* :func:`save_gpt2` writes a directory ``GPT2LMHeadModel.from_pretrained`` loads, atomically.
* ``scale_attn_by_inverse_layer_idx`` / ``reorder_and_upcast_attn`` checkpoints load as
  equivalent params (:data:`FOLDED`).

Layouts (only :func:`_to_fnlm` / :func:`_to_hf` change them): HF's ``Conv1D`` stores
``[d_in, d_out]`` like fnlm's linear, so MLP weights are copied; the fused ``c_attn``
``[d, 3d]`` is ``[W^Q | W^K | W^V]`` along the output axis and each part becomes fnlm's per-head
``[d, n_head, d_k]`` (output index ``o = head * d_k + j``); ``attn.c_proj`` ``[d, d]`` becomes
``W^O: [n_head, d_k, d]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from fnlm._memory import check_fits, gpt2_param_count
from fnlm.io._safetensors import CheckpointError, torch_dtype
from fnlm.models._gpt2 import GPT2Config
from fnlm.models._hf import (
    owned,
    read_checkpoint,
    read_config_json,
    resolve_config,
    short,
    tokenizer_files,
    unify_dtypes,
    weight_files,
    write_checkpoint,
)
from fnlm.tree import Params, cast, flatten_names, unflatten_names

#: Tokenizer files copied by :func:`save_gpt2` when ``tokenizer_dir`` is given.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
#: HF options whose other values fnlm's GPT-2 does not implement: field -> (the value it
#: implements, why another is refused).
UNSUPPORTED = {
    "scale_attn_weights": (True, "fnlm always scales attention scores by 1/sqrt(d_k)"),
    "add_cross_attention": (False, "fnlm's GPT-2 is decoder-only (no cross-attention)"),
    "tie_word_embeddings": (True, "fnlm's LM head is tied to the token embedding"),
    "is_encoder_decoder": (False, "fnlm's GPT-2 is decoder-only"),
}


#: HF options that load as equivalent fnlm params: ``scale_attn_by_inverse_layer_idx`` (scores of
#: block ``i`` divided by ``i + 1``) is folded into that block's ``W^Q``, ``b^Q`` (``q / (i + 1)``
#: gives the same scores), so saved checkpoints say ``false`` with the folded weights;
#: ``reorder_and_upcast_attn`` computes the same scores in float32 (fnlm's float32 attention is
#: that; under a bf16/fp16 autocast fnlm does not upcast them).
FOLDED = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")


# ----------------------------------------------------------------------------- config.json
def gpt2_config_from_hf(d: Mapping[str, Any]) -> GPT2Config:
    """From a Hugging Face GPT-2 ``config.json`` dict. Options in :data:`UNSUPPORTED` with
    another value are refused, one line naming the field; keys that do not change the model
    (``summary_*``, ``use_cache``, ``architectures``...) are ignored."""
    if not isinstance(d, Mapping):
        raise TypeError(f"a GPT-2 config must be a dict, got {type(d).__name__}")
    model_type = d.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"model_type is {model_type!r}; only 'gpt2' checkpoints are supported")
    for name, (ok, why) in UNSUPPORTED.items():
        if name in d and d[name] is not None and bool(d[name]) != ok:
            raise ValueError(
                f"{name}={json.dumps(d[name])} is not implemented ({why}); only {name}={json.dumps(ok)} is supported"
            )
    kw = {f.name: d[f.name] for f in dataclasses.fields(GPT2Config) if f.name in d}
    return GPT2Config(**kw)


def read_gpt2_config(path: str | os.PathLike) -> GPT2Config:
    """Read a Hugging Face GPT-2 ``config.json``; errors name the file."""
    return read_config_json(path, gpt2_config_from_hf)


def gpt2_config_to_hf(cfg: GPT2Config) -> dict[str, Any]:
    """A ``config.json`` dict that ``transformers.GPT2LMHeadModel`` loads."""
    d: dict[str, Any] = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_ctx": cfg.n_positions}
    d.update({name: ok for name, (ok, _) in UNSUPPORTED.items() if name != "is_encoder_decoder"})
    d.update({name: False for name in FOLDED})
    d.update(dataclasses.asdict(cfg))
    return d


# ----------------------------------------------------------------------------- the mapping table
@dataclass(frozen=True)
class Entry:
    """One HF tensor (name without ``transformer.``) and the fnlm name(s) it becomes; ``kind``
    says how the layout changes; ``shape``: its HF shape in config symbols."""

    hf: str
    fnlm: tuple[str, ...]
    kind: str  # copy | qkv | qkv_bias | out_proj
    shape: tuple[str, ...]


_SYMBOLS = {"V": "vocab_size", "P": "n_positions", "D": "n_embd", "3D": "3 * n_embd", "I": "n_inner (4 * n_embd)"}
_TOP = [
    ("wte.weight", "tok_embed.weight", "copy", ("V", "D")),
    ("wpe.weight", "pos_embed.weight", "copy", ("P", "D")),
]
_LAYER = [  # h.{i}.<hf>  <->  layers.{i}.<fnlm>
    ("ln_1.weight", "norm1.gamma", "copy", ("D",)),
    ("ln_1.bias", "norm1.beta", "copy", ("D",)),
    ("attn.c_attn.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight"), "qkv", ("D", "3D")),
    ("attn.c_attn.bias", ("attn.q.bias", "attn.k.bias", "attn.v.bias"), "qkv_bias", ("3D",)),
    ("attn.c_proj.weight", "attn.o.weight", "out_proj", ("D", "D")),
    ("attn.c_proj.bias", "attn.o.bias", "copy", ("D",)),
    ("ln_2.weight", "norm2.gamma", "copy", ("D",)),
    ("ln_2.bias", "norm2.beta", "copy", ("D",)),
    ("mlp.c_fc.weight", "ffn.w1.weight", "copy", ("D", "I")),
    ("mlp.c_fc.bias", "ffn.w1.bias", "copy", ("I",)),
    ("mlp.c_proj.weight", "ffn.w2.weight", "copy", ("I", "D")),
    ("mlp.c_proj.bias", "ffn.w2.bias", "copy", ("D",)),
]
_FINAL = [
    ("ln_f.weight", "norm.gamma", "copy", ("D",)),
    ("ln_f.bias", "norm.beta", "copy", ("D",)),
]
#: per-layer buffers that are not parameters: the causal mask and its fill value
_BUFFERS = ("attn.bias", "attn.masked_bias")


def param_mapping(cfg: GPT2Config) -> list[Entry]:
    """The HF <-> fnlm table (in the order of :func:`~fnlm.models.init_gpt2`'s tree)."""
    rows = list(_TOP)
    for i in range(cfg.n_layer):
        for h, f, k, s in _LAYER:
            fs = (f,) if isinstance(f, str) else f
            rows.append((f"h.{i}.{h}", tuple(f"layers.{i}.{x}" for x in fs), k, s))
    rows += _FINAL
    return [Entry(h, (f,) if isinstance(f, str) else f, k, s) for h, f, k, s in rows]


def _hf_shape(e: Entry, cfg: GPT2Config) -> tuple[int, ...]:
    d = {"V": cfg.vocab_size, "P": cfg.n_positions, "D": cfg.n_embd, "3D": 3 * cfg.n_embd, "I": cfg.d_ff}
    return tuple(d[s] for s in e.shape)


def _fnlm_shapes(e: Entry, cfg: GPT2Config) -> tuple[tuple[int, ...], ...]:
    D, n, dk = cfg.n_embd, cfg.n_head, cfg.d_k
    return {
        "copy": (_hf_shape(e, cfg),),
        "qkv": ((D, n, dk),) * 3,
        "qkv_bias": ((n, dk),) * 3,
        "out_proj": ((n, dk, D),),
    }[e.kind]


def _to_fnlm(kind: str, t: Tensor, cfg: GPT2Config) -> tuple[Tensor, ...]:
    """HF layout -> fnlm layout (see the module docstring)."""
    D, n, dk = cfg.n_embd, cfg.n_head, cfg.d_k
    if kind == "copy":
        return (t,)
    if kind == "qkv":  # [D, 3D] = [W^Q | W^K | W^V] -> 3 x [D, n, dk]
        return tuple(w.reshape(D, n, dk).contiguous() for w in t.split(D, dim=-1))
    if kind == "qkv_bias":  # [3D] -> 3 x [n, dk]
        return tuple(b.reshape(n, dk).contiguous() for b in t.split(D))
    if kind == "out_proj":  # [D_in = n*dk, D_out] -> [n, dk, D]
        return (t.reshape(n, dk, D).contiguous(),)
    raise AssertionError(kind)


def _to_hf(kind: str, ts: tuple[Tensor, ...], cfg: GPT2Config) -> Tensor:
    """fnlm layout -> HF layout: the inverse of :func:`_to_fnlm`."""
    D = cfg.n_embd
    if kind == "copy":
        return ts[0]
    if kind == "qkv":
        return torch.cat([w.reshape(D, D) for w in ts], dim=-1)
    if kind == "qkv_bias":
        return torch.cat([b.reshape(D) for b in ts])
    if kind == "out_proj":
        return ts[0].reshape(D, D)
    raise AssertionError(kind)


def _canonical(name: str) -> str:
    """Checkpoint name -> table name: drop the ``transformer.`` prefix of ``GPT2LMHeadModel``."""
    return name[len("transformer.") :] if name.startswith("transformer.") else name


def _shape_text(e: Entry, cfg: GPT2Config) -> str:
    return f"{_hf_shape(e, cfg)} [{', '.join(_SYMBOLS[s] for s in e.shape)}]"


# ----------------------------------------------------------------------------- load


def load_gpt2(
    path: str | os.PathLike,
    *,
    config: GPT2Config | str | os.PathLike | Mapping | None = None,
    strict: bool = True,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Params, GPT2Config]:
    """Load a Hugging Face GPT-2 checkpoint (``GPT2Model`` or ``GPT2LMHeadModel``) into fnlm
    params: ``(params, cfg)`` with the tree of :func:`~fnlm.models.init_gpt2`.

    Every shape is checked against the config; missing keys, wrong shapes and (with
    ``strict=True``) unexpected keys are reported together in one
    :class:`~fnlm.io.CheckpointError` naming the file and the keys. ``dtype``:
    ``'fp32'``/``'bf16'``/``'fp16'`` casts every tensor.
    """
    dtype = torch_dtype(dtype)
    path = Path(path)
    files = weight_files(path)
    cfg, cfg_src = resolve_config(config, path, GPT2Config, gpt2_config_from_hf, read_gpt2_config)
    where = files[0] if len(files) == 1 else path
    check_fits(gpt2_param_count(cfg), (dtype or torch.float32).itemsize, cfg_src)
    raw = read_checkpoint(path, files, _canonical, device=str(device))
    unify_dtypes(raw, dtype, where)
    inverse_layer_scale = _hf_flag(config, path, "scale_attn_by_inverse_layer_idx")

    flat: dict[str, Tensor] = {}
    missing: list[str] = []
    problems: list[str] = []
    for e in param_mapping(cfg):
        if e.hf not in raw:
            missing.append(e.hf)
            continue
        t, f, orig = raw.pop(e.hf)
        if tuple(t.shape) != _hf_shape(e, cfg):
            problems.append(f"{f}: {orig}: expected shape {_shape_text(e, cfg)} from {cfg_src}, found {tuple(t.shape)}")
        elif not t.is_floating_point():
            problems.append(f"{f}: {orig}: expected a floating-point tensor, found {t.dtype}")
        else:
            flat.update(zip(e.fnlm, _to_fnlm(e.kind, t, cfg)))
    if "lm_head.weight" in raw:  # tied: must be the token embedding itself
        t, f, orig = raw.pop("lm_head.weight")
        wte = flat.get("tok_embed.weight")
        if wte is not None and not (t.shape == wte.shape and torch.equal(t.to(wte.dtype), wte)):
            problems.append(
                f"{f}: {orig}: differs from wte.weight; fnlm's LM head is tied to the token "
                "embedding, an untied head is not supported"
            )
    for name in [c for c in raw if c.startswith("h.") and c.split(".", 2)[-1] in _BUFFERS]:
        raw.pop(name)

    unexpected = sorted(f"{orig} (in {f.name})" for _, f, orig in raw.values())
    if missing or problems or (unexpected and strict):
        lines = [f"{where}: checkpoint does not match a GPT-2 model with config {cfg_src}"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {short(missing)}")
        if unexpected and strict:
            lines.append(f"  unexpected keys ({len(unexpected)}): {short(unexpected)}")
        lines += [f"  {p}" for p in problems[:20]] + (
            [f"  ... {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise CheckpointError("\n".join(lines))
    if unexpected:
        warnings.warn(f"{where}: ignoring unexpected keys {short(unexpected)}", stacklevel=2)
    if inverse_layer_scale:  # see FOLDED
        for i in range(cfg.n_layer):
            for leaf in ("weight", "bias"):
                flat[f"layers.{i}.attn.q.{leaf}"] = flat[f"layers.{i}.attn.q.{leaf}"] / float(i + 1)
    return cast(unflatten_names(flat), dtype=dtype, device=device), cfg


def _hf_flag(config: Any, path: Path, name: str) -> bool:
    """``name`` in the config.json that ``config`` / ``path`` stands for (a GPT2Config: ``False``)."""
    if isinstance(config, GPT2Config):
        return False
    if isinstance(config, Mapping):
        return bool(config.get(name))
    cfg_path = Path(config) if config is not None else (path if path.is_dir() else path.parent) / "config.json"
    return bool(json.loads(cfg_path.read_text(encoding="utf-8")).get(name))


# ----------------------------------------------------------------------------- save
def save_gpt2(
    params: Params, cfg: GPT2Config, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None
) -> Path:
    """Write ``params`` as a Hugging Face ``GPT2LMHeadModel`` directory: ``model.safetensors``
    (``transformer.``-prefixed names; the tied ``lm_head.weight`` is left out, as HF saves it),
    ``config.json`` and the tokenizer files of ``tokenizer_dir``. Built under a temporary name
    and renamed into place: a failure leaves no ``out_dir`` (an existing one untouched)."""
    if not isinstance(cfg, GPT2Config):
        raise TypeError(f"cfg must be a GPT2Config, got {type(cfg).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    flat = flatten_names(params)
    tensors: dict[str, Tensor] = {}
    problems = []
    for e in param_mapping(cfg):
        parts = []
        for name, shape in zip(e.fnlm, _fnlm_shapes(e, cfg)):
            t = flat.pop(name, None)
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                problems.append(
                    f"{name}: expected a tensor of shape {shape} from the config, found "
                    f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
                )
            parts.append(t)
        if len(parts) == len(e.fnlm) and not any(not isinstance(p, Tensor) for p in parts) and not problems:
            tensors[f"transformer.{e.hf}"] = owned(_to_hf(e.kind, tuple(parts), cfg))
    if flat:
        problems.append(f"entries with no GPT-2 checkpoint name: {short(sorted(flat))}")
    if problems:
        raise ValueError(
            f"cannot save to {out_dir}: params do not match a GPT-2 model with this config:\n  "
            + "\n  ".join(problems[:20])
        )

    tok_files = tokenizer_files(tokenizer_dir, TOKENIZER_FILES)
    return write_checkpoint(out_dir, tensors, gpt2_config_to_hf(cfg), tok_files)
