"""LoRA adapters of a BERT classifier in Hugging Face ``peft``'s layout, both ways.

A directory that ``peft.PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), dir)``
loads: ``adapter_config.json`` (``peft_type: LORA``, ``task_type: SEQ_CLS``, ``r``,
``lora_alpha``, ``target_modules``, ``modules_to_save: [classifier, score]``) and
``adapter_model.safetensors`` with peft's names::

    base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight   [r, d_in]
    base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight   [d_out, r]
    base_model.model.classifier.weight / .bias                                  (modules_to_save)

peft stores ``nn.Linear`` factors as ``[out, in]``; fnlm's ``lora_A [d_in, r]`` and ``lora_B
[r, d_out]`` are their transposes, and the HF <-> fnlm module names come from the BERT mapping
table of :mod:`fnlm.models._bert_hf`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from fnlm.io._safetensors import CheckpointError, atomic_dir, read_safetensors, write_json, write_safetensors
from fnlm.models._bert import BertConfig
from fnlm.models._bert_hf import TOKENIZER_FILES, param_mapping
from fnlm.models._hf import owned as _owned
from fnlm.models._hf import tokenizer_files
from fnlm.nn._lora import LoraConfig, adapter_pairs, linear_modules, matrix_dims
from fnlm.tree import Params, flatten_names, unflatten_names

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LINEAR_KINDS = ("linear", "in_proj", "out_proj")
#: peft config entries fnlm implements only at these values (anything else is refused by name).
_UNSUPPORTED_UNLESS = {
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "layers_pattern": (None, [], ""),
    "layer_replication": (None,),
    "exclude_modules": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "megatron_config": (None,),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
}


def _module_table(cfg: BertConfig) -> dict[str, str]:
    """fnlm module name (``bert.encoder.layers.0.attn.q``) -> HF module name of a
    ``BertForSequenceClassification`` (``bert.encoder.layer.0.attention.self.query``)."""
    return {
        e.fnlm[: -len(".weight")]: e.hf_name("classifier")[: -len(".weight")]
        for e in param_mapping(cfg, "classifier")
        if e.kind in _LINEAR_KINDS
    }


def _target_modules(hf_modules: list[str], all_hf: list[str]) -> list[str]:
    """peft's ``target_modules``: a module's last name (``query``) where every module of that name is
    adapted, else the full names."""
    out: list[str] = []
    for short in dict.fromkeys(m.rsplit(".", 1)[-1] for m in hf_modules):
        everyone = [m for m in all_hf if m.rsplit(".", 1)[-1] == short]
        mine = [m for m in hf_modules if m.rsplit(".", 1)[-1] == short]
        out += [short] if set(everyone) == set(mine) else mine
    return out


def save_lora(
    out_dir: str | os.PathLike,
    adapters: Params,
    lora_cfg: LoraConfig,
    cfg: BertConfig,
    *,
    head: Params | None = None,
    base_model_name_or_path: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``adapters`` (of a classifier tree, names ``bert....``) and the trained ``head``
    (``params['classifier']``, saved as peft's ``modules_to_save``) as a peft LoRA directory,
    atomically, with the tokenizer files of ``tokenizer_dir``. ``base_model_name_or_path`` is
    recorded for peft's ``AutoPeftModel``."""
    table = _module_table(cfg)
    tensors: dict[str, Tensor] = {}
    hf_modules = []
    for m, (a, b) in adapter_pairs(adapters).items():
        if m not in table:
            raise ValueError(
                f"save_lora: {m!r} is not a linear map of a BERT classifier "
                f"(peft names exist for {', '.join(list(table)[:3])}, ...)"
            )
        hf = table[m]
        hf_modules.append(hf)
        tensors[f"{_PREFIX}{hf}.lora_A.weight"] = _owned(a.mT)
        tensors[f"{_PREFIX}{hf}.lora_B.weight"] = _owned(b.mT)
        if a.shape[-1] != lora_cfg.rank:
            raise ValueError(f"save_lora: {m}.lora_A has rank {a.shape[-1]} but lora_cfg.rank={lora_cfg.rank}")
    if not hf_modules:
        raise ValueError("save_lora: adapters hold no lora_A/lora_B pair")
    if head is not None:
        if set(head) - {"weight", "bias"} or "weight" not in head:
            raise ValueError(f"save_lora: head must be params['classifier'] ({{'weight', 'bias'}}), got {sorted(head)}")
        tensors[f"{_PREFIX}classifier.weight"] = _owned(head["weight"].mT)
        if "bias" in head:
            tensors[f"{_PREFIX}classifier.bias"] = _owned(head["bias"])
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": _target_modules(hf_modules, list(table.values())),
        "modules_to_save": ["classifier", "score"] if head is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tok_files = tokenizer_files(tokenizer_dir, TOKENIZER_FILES)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        write_json(config, tmp / CONFIG_FILE)
        for f in tok_files:
            shutil.copyfile(f, tmp / f.name)
    return out_dir


def read_lora_config(path: str | os.PathLike) -> LoraConfig:
    """The :class:`LoraConfig` of a peft adapter directory; peft features fnlm does not implement
    are one error naming them all."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (not a peft adapter directory)")
    try:
        d: dict[str, Any] = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f}: not a JSON object")
    for key, kinds, what in (
        ("r", (int,), "a positive integer (the rank)"),
        ("lora_alpha", (int, float), "a positive number"),
    ):
        v = d.get(key)
        if not isinstance(v, kinds) or isinstance(v, bool) or not v > 0:
            raise CheckpointError(f"{f}: {key!r} must be {what}, got {'nothing' if key not in d else repr(v)}")
    drop = d.get("lora_dropout") or 0.0
    if not isinstance(drop, (int, float)) or isinstance(drop, bool) or not 0.0 <= drop < 1.0:
        raise CheckpointError(f"{f}: 'lora_dropout' must be a number in [0, 1), got {drop!r}")
    if not isinstance(d.get("modules_to_save") or [], list):
        raise CheckpointError(f"{f}: 'modules_to_save' must be a list, got {d['modules_to_save']!r}")
    if d.get("peft_type") != "LORA":
        raise CheckpointError(f"{f}: peft_type {d.get('peft_type')!r} is not supported (only 'LORA')")
    bad = [f"{k}={d[k]!r}" for k, ok in _UNSUPPORTED_UNLESS.items() if k in d and d[k] not in ok]
    extra = [m for m in (d.get("modules_to_save") or []) if m not in ("classifier", "score")]
    if extra:
        bad.append(f"modules_to_save={extra!r}")
    if d.get("task_type") not in ("SEQ_CLS", None):
        bad.append(f"task_type={d['task_type']!r}")
    if bad:
        raise CheckpointError(f"{f}: peft features fnlm does not implement: {', '.join(bad)}")
    return LoraConfig(
        rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout") or 0.0), targets=("*",)
    )


def load_lora(path: str | os.PathLike, params: Params, cfg: BertConfig) -> tuple[Params, LoraConfig, Params | None]:
    """Read a peft LoRA directory made for a ``BertForSequenceClassification`` onto fnlm's
    classifier tree ``params``: ``(adapters, lora_cfg, head)``, ``head`` the saved classifier
    (``modules_to_save``) or ``None``. ``lora_cfg.targets`` lists the adapted modules by name.
    Every factor's shape is checked against ``params`` (a base of another shape is an error)."""
    path = Path(path)
    lora_cfg = read_lora_config(path)
    f = path / WEIGHTS_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} (fnlm reads safetensors adapters only)")
    tensors, _ = read_safetensors(f)
    by_hf = {hf: m for m, hf in _module_table(cfg).items()}
    modules = linear_modules(params)
    flat_params = flatten_names(params)
    flat: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    for name, t in tensors.items():
        key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        key = key.replace(".modules_to_save.default.", ".").replace(".default.", ".")
        if key in ("classifier.weight", "classifier.bias"):
            head[key.rsplit(".", 1)[-1]] = t.mT.contiguous() if key.endswith("weight") else t
            continue
        hf, _, factor = key.rpartition(".lora_")
        if factor not in ("A.weight", "B.weight") or hf not in by_hf:
            raise CheckpointError(f"{f}: {name!r} is not a LoRA factor of a BERT classifier linear map")
        m = by_hf[hf]
        if m not in modules:
            raise CheckpointError(f"{f}: {name!r} adapts {m}, which the base params do not have")
        d_in, d_out = matrix_dims(m, flat_params, modules[m])
        want = (lora_cfg.rank, d_in) if factor == "A.weight" else (d_out, lora_cfg.rank)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{f}: {name} has shape {tuple(t.shape)} but the base model's {m} "
                f"(d_in={d_in}, d_out={d_out}) at r={lora_cfg.rank} needs {want}"
            )
        flat[f"{m}.lora_{factor[0]}"] = t.mT.contiguous()
    if not flat:
        raise CheckpointError(f"{f}: no LoRA factors")
    if head:
        want_w = tuple(flat_params["classifier.weight"].shape) if "classifier.weight" in flat_params else None
        if want_w is not None and tuple(head["weight"].shape) != want_w:
            raise CheckpointError(
                f"{f}: classifier.weight has shape {tuple(head['weight'].mT.shape)} but the base "
                f"classifier is {want_w[::-1]} [num_labels, hidden_size]"
            )
    adapters = unflatten_names(flat)
    targets = tuple(adapter_pairs(adapters))
    return adapters, LoraConfig(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, targets), (head or None)
