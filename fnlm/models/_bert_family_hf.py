"""Hugging Face RoBERTa and DistilBERT checkpoints <-> fnlm params, both ways, through mapping
tables of the same design as BERT's (:mod:`fnlm.models._bert_hf`: :class:`Entry` rows, the
same layout changes, the same strict key/shape report in one :class:`~fnlm.io.CheckpointError`).

* RoBERTa: BERT's names under ``roberta.`` (head models); ``classifier.dense`` /
  ``classifier.out_proj`` (``RobertaClassificationHead``); ``RobertaForSequenceClassification``
  has no pooler. ``lm_head.*`` is skipped.
* DistilBERT: ``embeddings.{word,position}_embeddings``, ``transformer.layer.{i}.attention.
  {q,k,v,out}_lin``, ``sa_layer_norm``, ``ffn.lin{1,2}``, ``output_layer_norm`` under
  ``distilbert.``; ``pre_classifier`` / ``classifier``. The MLM head (``vocab_*``) is skipped.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from fnlm import random
from fnlm.io._safetensors import CheckpointError, MissingHeadError, torch_dtype
from fnlm.models._bert import BertConfig
from fnlm.models._bert_family import (
    DistilBertConfig,
    RobertaConfig,
    init_distilbert_classifier,
    init_roberta_classifier,
)
from fnlm.models._bert_hf import (
    _EMBEDDINGS,
    _LAYER,
    _POOLER,
    Entry,
    _fnlm_shape,
    _hf_shape,
    _shape_text,
    _to_fnlm,
    _to_hf,
    bert_config_from_hf,
    bert_config_to_hf,
)
from fnlm.models._hf import (
    owned,
    read_checkpoint,
    read_config_json,
    resolve_config,
    short,
    tokenizer_files,
    weight_files,
    write_checkpoint,
)
from fnlm.tree import Params, cast, flatten_names, unflatten_names

#: Tokenizer files copied by the savers when ``tokenizer_dir`` is given.
TOKENIZER_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
FAMILY_HEADS = ("none", "classifier")


def _labels_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    """``num_labels`` / ``id2label`` of a config.json, as :func:`fnlm.models.bert_config_from_hf` reads them."""
    keep = {k: d[k] for k in ("id2label", "num_labels") if k in d}
    cfg = bert_config_from_hf({**keep, "model_type": "bert"})
    return {"num_labels": cfg.num_labels, "id2label": cfg.id2label}


# ----------------------------------------------------------------------------- config.json
def roberta_config_from_hf(d: Mapping[str, Any]) -> RobertaConfig:
    """From a Hugging Face RoBERTa ``config.json`` dict (``model_type: roberta``)."""
    if not isinstance(d, Mapping):
        raise TypeError(f"a RoBERTa config must be a dict, got {type(d).__name__}")
    if d.get("model_type", "roberta") != "roberta":
        raise ValueError(f"model_type is {d.get('model_type')!r}; expected 'roberta'")
    cfg = bert_config_from_hf({"pad_token_id": 1, "vocab_size": 50265, **d, "model_type": "bert"})
    return RobertaConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(BertConfig)})


def roberta_config_to_hf(cfg: RobertaConfig, head: str = "none") -> dict[str, Any]:
    """A ``config.json`` dict that ``RobertaModel`` / ``RobertaForSequenceClassification`` load."""
    d = bert_config_to_hf(cfg, "classifier" if head == "classifier" else "none")
    d["model_type"] = "roberta"
    d["architectures"] = ["RobertaForSequenceClassification" if head == "classifier" else "RobertaModel"]
    return d


def distilbert_config_from_hf(d: Mapping[str, Any]) -> DistilBertConfig:
    """From a Hugging Face DistilBERT ``config.json`` dict (``model_type: distilbert``)."""
    if not isinstance(d, Mapping):
        raise TypeError(f"a DistilBERT config must be a dict, got {type(d).__name__}")
    if d.get("model_type", "distilbert") != "distilbert":
        raise ValueError(f"model_type is {d.get('model_type')!r}; expected 'distilbert'")
    kw = {
        f.name: d[f.name]
        for f in dataclasses.fields(DistilBertConfig)
        if f.name in d and f.name not in ("id2label", "num_labels")
    }
    return DistilBertConfig(**kw, **_labels_from_hf(d))


def distilbert_config_to_hf(cfg: DistilBertConfig, head: str = "none") -> dict[str, Any]:
    """A ``config.json`` dict that ``DistilBertModel`` / ``DistilBertForSequenceClassification`` load."""
    d: dict[str, Any] = {
        "architectures": ["DistilBertForSequenceClassification" if head == "classifier" else "DistilBertModel"],
        "model_type": "distilbert",
        "tie_word_embeddings": True,
    }
    d.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "id2label"})
    d["id2label"] = {str(i): n for i, n in enumerate(cfg.labels)}
    d["label2id"] = {n: i for i, n in enumerate(cfg.labels)}
    return d


def read_roberta_config(path: str | os.PathLike) -> RobertaConfig:
    return read_config_json(path, roberta_config_from_hf)


def read_distilbert_config(path: str | os.PathLike) -> DistilBertConfig:
    return read_config_json(path, distilbert_config_from_hf)


# ----------------------------------------------------------------------------- the mapping tables
_DISTIL_EMBEDDINGS = [
    ("embeddings.word_embeddings.weight", "embeddings.word.weight", "copy", ("V", "H")),
    ("embeddings.position_embeddings.weight", "embeddings.position.weight", "copy", ("P", "H")),
    ("embeddings.LayerNorm.weight", "embeddings.norm.gamma", "copy", ("H",)),
    ("embeddings.LayerNorm.bias", "embeddings.norm.beta", "copy", ("H",)),
]
_DISTIL_LAYER = [  # transformer.layer.{i}.<hf>  <->  encoder.layers.{i}.<fnlm>
    ("attention.q_lin.weight", "attn.q.weight", "in_proj", ("H", "H")),
    ("attention.q_lin.bias", "attn.q.bias", "in_bias", ("H",)),
    ("attention.k_lin.weight", "attn.k.weight", "in_proj", ("H", "H")),
    ("attention.k_lin.bias", "attn.k.bias", "in_bias", ("H",)),
    ("attention.v_lin.weight", "attn.v.weight", "in_proj", ("H", "H")),
    ("attention.v_lin.bias", "attn.v.bias", "in_bias", ("H",)),
    ("attention.out_lin.weight", "attn.o.weight", "out_proj", ("H", "H")),
    ("attention.out_lin.bias", "attn.o.bias", "copy", ("H",)),
    ("sa_layer_norm.weight", "norm1.gamma", "copy", ("H",)),
    ("sa_layer_norm.bias", "norm1.beta", "copy", ("H",)),
    ("ffn.lin1.weight", "ffn.w1.weight", "linear", ("I", "H")),
    ("ffn.lin1.bias", "ffn.w1.bias", "copy", ("I",)),
    ("ffn.lin2.weight", "ffn.w2.weight", "linear", ("H", "I")),
    ("ffn.lin2.bias", "ffn.w2.bias", "copy", ("H",)),
    ("output_layer_norm.weight", "norm2.gamma", "copy", ("H",)),
    ("output_layer_norm.bias", "norm2.beta", "copy", ("H",)),
]
_ROBERTA_CLASSIFIER = [
    ("classifier.dense.weight", "classifier.dense.weight", "linear", ("H", "H")),
    ("classifier.dense.bias", "classifier.dense.bias", "copy", ("H",)),
    ("classifier.out_proj.weight", "classifier.out_proj.weight", "linear", ("C", "H")),
    ("classifier.out_proj.bias", "classifier.out_proj.bias", "copy", ("C",)),
]
_DISTIL_CLASSIFIER = [
    ("pre_classifier.weight", "pre_classifier.weight", "linear", ("H", "H")),
    ("pre_classifier.bias", "pre_classifier.bias", "copy", ("H",)),
    ("classifier.weight", "classifier.weight", "linear", ("C", "H")),
    ("classifier.bias", "classifier.bias", "copy", ("C",)),
]


class _Family:
    """What differs between the two families: names, tables, configs, heads."""

    def __init__(
        self,
        name,
        prefix,
        config_class,
        from_hf,
        to_hf,
        read,
        init_classifier,
        embeddings,
        layer,
        layer_hf,
        classifier,
        skip_prefixes,
    ):
        self.name, self.prefix, self.config_class = name, prefix, config_class
        self.from_hf, self.to_hf, self.read, self.init_classifier = from_hf, to_hf, read, init_classifier
        self.embeddings, self.layer, self.layer_hf, self.classifier = embeddings, layer, layer_hf, classifier
        self.skip_prefixes = skip_prefixes

    def bert(self, cfg) -> BertConfig:
        return cfg.bert_config() if isinstance(cfg, DistilBertConfig) else cfg

    def table(self, cfg, head: str, pooler: bool) -> list[Entry]:
        bc = self.bert(cfg)
        pre = "" if head == "none" else self.prefix + "."
        body = list(self.embeddings)
        for i in range(bc.num_hidden_layers):
            body += [(f"{self.layer_hf}.{i}.{h}", f"encoder.layers.{i}.{f}", k, s) for h, f, k, s in self.layer]
        if pooler:
            body += _POOLER
        out = [_PrefixedEntry(h, pre + f, k, s, True, self.prefix) for h, f, k, s in body]
        if head == "classifier":
            out += [_PrefixedEntry(h, f, k, s, False, self.prefix) for h, f, k, s in self.classifier]
        return out

    def canonical(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if name.startswith(self.prefix + ".") else name


@dataclasses.dataclass(frozen=True)
class _PrefixedEntry(Entry):
    prefix: str = "bert"

    def hf_name(self, head: str) -> str:
        return f"{self.prefix}.{self.hf}" if self.body and head != "none" else self.hf


ROBERTA = _Family(
    "RoBERTa",
    "roberta",
    RobertaConfig,
    roberta_config_from_hf,
    roberta_config_to_hf,
    read_roberta_config,
    init_roberta_classifier,
    _EMBEDDINGS,
    _LAYER,
    "encoder.layer",
    _ROBERTA_CLASSIFIER,
    ("lm_head.",),
)
DISTILBERT = _Family(
    "DistilBERT",
    "distilbert",
    DistilBertConfig,
    distilbert_config_from_hf,
    distilbert_config_to_hf,
    read_distilbert_config,
    init_distilbert_classifier,
    _DISTIL_EMBEDDINGS,
    _DISTIL_LAYER,
    "transformer.layer",
    _DISTIL_CLASSIFIER,
    ("vocab_transform.", "vocab_layer_norm.", "vocab_projector."),
)


# ----------------------------------------------------------------------------- load / save
def _load(fam: _Family, path, *, config, head, num_labels, strict, head_key, dtype, device):
    if head not in FAMILY_HEADS:
        raise ValueError(f"head must be one of {FAMILY_HEADS}, got {head!r}")
    dtype = torch_dtype(dtype)
    path = Path(path)
    files = weight_files(path)
    cfg, cfg_src = resolve_config(config, path, fam.config_class, fam.from_hf, fam.read)
    if head == "classifier" and num_labels is not None and num_labels != cfg.num_labels:
        cfg = dataclasses.replace(cfg, num_labels=num_labels, id2label=None)
    bc = fam.bert(cfg)
    where = files[0] if len(files) == 1 else path
    raw = read_checkpoint(path, files, fam.canonical, device=str(device))
    pooler = head == "none" and all(h in raw for h, *_ in _POOLER)
    table = fam.table(cfg, head, pooler)
    ignored = {
        k
        for k in raw
        if k == "embeddings.position_ids"
        or k.startswith(fam.skip_prefixes)
        or (head != "classifier" and any(k == h for h, *_ in fam.classifier))
        or (not pooler and k.startswith("pooler."))
    }
    flat: dict[str, Tensor] = {}
    missing, problems = [], []
    for e in table:
        if e.hf not in raw:
            missing.append(e)
            continue
        t, f, orig = raw.pop(e.hf)
        if tuple(t.shape) != _hf_shape(e, bc):
            problems.append(f"{f}: {orig}: expected shape {_shape_text(e, bc)} from {cfg_src}, found {tuple(t.shape)}")
        elif not t.is_floating_point():
            problems.append(f"{f}: {orig}: expected a floating-point tensor, found {t.dtype}")
        else:
            flat[e.fnlm] = _to_fnlm(e.kind, t, bc)
    head_missing = [e for e in missing if not e.body]
    all_head_missing = head == "classifier" and len(head_missing) == len(fam.classifier)
    head_params = None
    if all_head_missing and head_key is not None:
        random._check_key(head_key)
        fresh = fam.init_classifier(head_key, cfg)
        head_params = {k: v for k, v in fresh.items() if k != fam.prefix}
        missing = [e for e in missing if e.body]
    unexpected = sorted(f"{orig} (in {f.name})" for c, (_, f, orig) in raw.items() if c not in ignored)
    if missing or problems or (unexpected and strict):
        lines = [f"{where}: checkpoint does not match a {fam.name} model with head={head!r} and config {cfg_src}"]
        if missing:
            hint = (
                f" (the checkpoint has no {head} head: pass head_key=fnlm.random.key(seed) to initialise one)"
                if all_head_missing
                else ""
            )
            lines.append(f"  missing keys ({len(missing)}){hint}: {short([e.hf_name(head) for e in missing])}")
        if unexpected and strict:
            lines.append(f"  unexpected keys ({len(unexpected)}): {short(unexpected)}")
        lines += [f"  {p}" for p in problems[:20]]
        only_head = (
            all_head_missing and not problems and not (unexpected and strict) and all(not e.body for e in missing)
        )
        raise (MissingHeadError if only_head else CheckpointError)("\n".join(lines))
    if unexpected:
        warnings.warn(f"{where}: ignoring unexpected keys {short(unexpected)}", stacklevel=3)
    params = unflatten_names(flat)
    if head_params is not None:
        params.update(head_params)
    return cast(params, dtype=dtype, device=device), cfg


def _save(fam: _Family, params, cfg, out_dir, *, tokenizer_dir):
    if not isinstance(cfg, fam.config_class):
        raise TypeError(f"cfg must be a {fam.config_class.__name__}, got {type(cfg).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    head = "classifier" if fam.prefix in params else "none"
    body = params[fam.prefix] if head == "classifier" else params
    if head == "classifier":
        n = flatten_names(params)[[e.fnlm for e in fam.table(cfg, head, False) if not e.body][-1]].shape[-1]
        if n != cfg.num_labels:
            cfg = dataclasses.replace(cfg, num_labels=n, id2label=None)
    bc = fam.bert(cfg)
    flat = flatten_names(params)
    tensors, problems = {}, []
    for e in fam.table(cfg, head, "pooler" in body):
        t = flat.pop(e.fnlm, None)
        if not isinstance(t, Tensor) or tuple(t.shape) != _fnlm_shape(e, bc):
            problems.append(
                f"{e.fnlm}: expected shape {_fnlm_shape(e, bc)} from the config, found "
                f"{tuple(t.shape) if isinstance(t, Tensor) else 'nothing'}"
            )
            continue
        tensors[e.hf_name(head)] = owned(_to_hf(e.kind, t, bc))
    if flat:
        problems.append(f"entries with no {fam.name} checkpoint name: {short(sorted(flat))}")
    if problems:
        raise ValueError(
            f"cannot save to {out_dir}: params do not match a {fam.name} model with head={head!r}:\n  "
            + "\n  ".join(problems)
        )
    return write_checkpoint(out_dir, tensors, fam.to_hf(cfg, head), tokenizer_files(tokenizer_dir, TOKENIZER_FILES))


def load_roberta(
    path: str | os.PathLike,
    *,
    config: RobertaConfig | str | os.PathLike | Mapping | None = None,
    head: str = "none",
    num_labels: int | None = None,
    strict: bool = True,
    head_key: random.Key | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Params, RobertaConfig]:
    """Load a Hugging Face RoBERTa checkpoint: ``(params, cfg)``; ``head='none'`` (``RobertaModel``,
    the pooler when the checkpoint has one: :func:`~fnlm.models.init_roberta`'s tree) or
    ``'classifier'`` (``RobertaForSequenceClassification``: :func:`~fnlm.models.init_roberta_classifier`).
    Arguments and errors as :func:`fnlm.models.load_bert`'s."""
    return _load(
        ROBERTA,
        path,
        config=config,
        head=head,
        num_labels=num_labels,
        strict=strict,
        head_key=head_key,
        dtype=dtype,
        device=device,
    )


def save_roberta(
    params: Params, cfg: RobertaConfig, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None
) -> Path:
    """Write a directory that ``RobertaModel`` / ``RobertaForSequenceClassification.from_pretrained``
    load (head from the tree; labels in ``config.json``), atomically, as :func:`fnlm.models.save_bert`."""
    return _save(ROBERTA, params, cfg, out_dir, tokenizer_dir=tokenizer_dir)


def load_distilbert(
    path: str | os.PathLike,
    *,
    config: DistilBertConfig | str | os.PathLike | Mapping | None = None,
    head: str = "none",
    num_labels: int | None = None,
    strict: bool = True,
    head_key: random.Key | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Params, DistilBertConfig]:
    """Load a Hugging Face DistilBERT checkpoint: ``(params, cfg)``; ``head='none'``
    (``DistilBertModel``: :func:`~fnlm.models.init_distilbert`'s tree) or ``'classifier'``
    (``DistilBertForSequenceClassification``). Arguments and errors as :func:`fnlm.models.load_bert`'s."""
    return _load(
        DISTILBERT,
        path,
        config=config,
        head=head,
        num_labels=num_labels,
        strict=strict,
        head_key=head_key,
        dtype=dtype,
        device=device,
    )


def save_distilbert(
    params: Params, cfg: DistilBertConfig, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None
) -> Path:
    """Write a directory that ``DistilBertModel`` / ``DistilBertForSequenceClassification.from_pretrained`` load."""
    return _save(DISTILBERT, params, cfg, out_dir, tokenizer_dir=tokenizer_dir)
