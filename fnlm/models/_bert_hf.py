"""Hugging Face BERT checkpoints <-> fnlm BERT params, both ways, through one mapping table.

* :func:`load_bert` reads ``config.json`` + ``model.safetensors`` (or a sharded checkpoint with
  ``model.safetensors.index.json``, or a single ``.safetensors`` file plus ``config=``) into the
  param trees of :mod:`fnlm.models._bert`. Nothing is ever unpickled: ``.bin``/``.pt`` files are
  refused with the one-line command that converts them.
* :func:`save_bert` writes a directory that ``transformers`` loads with ``BertModel`` /
  ``BertForSequenceClassification`` / ``BertForMaskedLM.from_pretrained``; the directory appears
  atomically (a crash leaves nothing under the final name).

Layouts (the transposes and per-head reshapes live only in :func:`_to_fnlm` / :func:`_to_hf`):
``nn.Linear`` stores ``[d_out, d_in]``, fnlm ``[d_in, d_out]``; attention ``W^Q, W^K, W^V`` are
``[H, n_heads, d_k]`` in fnlm (HF's output index ``o = head * d_k + j``), ``W^O`` is
``[n_heads, d_k, H]`` (HF's input index split the same way).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from fnlm import random
from fnlm._memory import bert_param_count, check_fits
from fnlm.io._safetensors import CheckpointError, MissingHeadError, MissingPoolerError, torch_dtype
from fnlm.models._bert import HEADS, BertConfig, init_classifier_head, init_mlm_head, init_pretraining_heads
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
from fnlm.nn._linear import init_linear
from fnlm.tree import Params, cast, flatten_names, unflatten_names

#: Tokenizer files copied by :func:`save_bert` when ``tokenizer_dir`` is given.
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
#: Checkpoint entries that are not parameters of any fnlm BERT model and are always skipped:
#: the position-id buffer. (Other heads' entries are skipped when loading a different head.)
IGNORED_KEYS = ("embeddings.position_ids",)

_DIM_NAMES = {
    "V": "vocab_size",
    "H": "hidden_size",
    "P": "max_position_embeddings",
    "T": "type_vocab_size",
    "I": "intermediate_size",
    "C": "num_labels",
}


# ----------------------------------------------------------------------------- config.json
ARCHITECTURES = {
    "none": "BertModel",
    "classifier": "BertForSequenceClassification",
    "mlm": "BertForMaskedLM",
    "pretraining": "BertForPreTraining",
    "token_classifier": "BertForTokenClassification",
    "span": "BertForQuestionAnswering",
}
#: Heads whose HF class has no pooler (``add_pooling_layer=False``).
NO_POOLER_HEADS = ("mlm", "token_classifier", "span")


def bert_config_from_hf(d: Mapping[str, Any]) -> BertConfig:
    """From a Hugging Face BERT ``config.json`` dict. Unknown keys are ignored; things fnlm's
    BERT cannot represent (relative position embeddings, decoders) are refused."""
    if not isinstance(d, Mapping):
        raise TypeError(f"a BERT config must be a dict, got {type(d).__name__}")
    model_type = d.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"model_type is {model_type!r}; only 'bert' checkpoints are supported")
    pos = d.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(
            f"position_embedding_type={pos!r} is not supported: fnlm's BERT has learned "
            "absolute positions only (position_embedding_type='absolute')"
        )
    for flag in ("is_decoder", "add_cross_attention"):
        if d.get(flag):
            raise ValueError(f"{flag}=true is not supported: fnlm's BERT is an encoder only")
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(BertConfig):
        if f.name in ("id2label", "num_labels", "fused_attention_dropout"):
            continue
        if f.name in d and not (f.name == "classifier_dropout" and d[f.name] is None):
            kw[f.name] = d[f.name]
    id2label = d.get("id2label")
    if id2label is not None:
        try:
            items = sorted((int(k), str(v)) for k, v in dict(id2label).items())
        except (TypeError, ValueError):
            raise ValueError(f"id2label must map label ids to names, got {id2label!r}") from None
        if [i for i, _ in items] != list(range(len(items))):
            raise ValueError(f"id2label ids must be 0..n-1, got {[i for i, _ in items]}")
        kw["id2label"] = tuple(v for _, v in items)
    if d.get("num_labels") is not None:
        kw["num_labels"] = d["num_labels"]
        if "id2label" in kw and len(kw["id2label"]) != kw["num_labels"]:
            raise ValueError(f"num_labels={kw['num_labels']} disagrees with id2label ({len(kw['id2label'])} names)")
    elif "id2label" in kw:
        kw["num_labels"] = len(kw["id2label"])
    if kw.get("id2label") == tuple(f"LABEL_{i}" for i in range(len(kw.get("id2label") or ()))):
        kw["id2label"] = None  # HF's defaults: keep the config canonical
    return BertConfig(**kw)


def read_bert_config(path: str | os.PathLike) -> BertConfig:
    """Read a Hugging Face BERT ``config.json``; errors name the file."""
    return read_config_json(path, bert_config_from_hf)


def bert_config_to_hf(cfg: BertConfig, head: str = "none") -> dict[str, Any]:
    """A ``config.json`` dict that ``transformers`` loads (``model_type: bert``, ``architectures``
    for ``head``, ``num_labels`` / ``id2label`` / ``label2id`` for the labels)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[head]],
        "model_type": "bert",
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
    }
    for f in dataclasses.fields(cfg):
        if f.name not in ("id2label", "num_labels", "fused_attention_dropout"):  # the last is a training switch
            d[f.name] = getattr(cfg, f.name)
    d["num_labels"] = cfg.num_labels
    d["id2label"] = {str(i): name for i, name in enumerate(cfg.labels)}
    d["label2id"] = {name: i for i, name in enumerate(cfg.labels)}
    return d


# ----------------------------------------------------------------------------- the mapping table
@dataclass(frozen=True)
class Entry:
    """One parameter: its HF name (without the ``bert.`` prefix), its fnlm dotted name (within the
    model's tree), how the layout changes, its HF shape in config symbols, and whether it belongs
    to the BERT body (``bert.`` prefix in HF head models, under ``'bert'`` in fnlm head models)."""

    hf: str
    fnlm: str
    kind: str  # copy | linear | in_proj | in_bias | out_proj
    shape: tuple[str, ...]
    body: bool = True

    def hf_name(self, head: str) -> str:
        return f"bert.{self.hf}" if self.body and head != "none" else self.hf


_EMBEDDINGS = [
    ("embeddings.word_embeddings.weight", "embeddings.word.weight", "copy", ("V", "H")),
    ("embeddings.position_embeddings.weight", "embeddings.position.weight", "copy", ("P", "H")),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type.weight", "copy", ("T", "H")),
    ("embeddings.LayerNorm.weight", "embeddings.norm.gamma", "copy", ("H",)),
    ("embeddings.LayerNorm.bias", "embeddings.norm.beta", "copy", ("H",)),
]
_LAYER = [  # encoder.layer.{i}.<hf>  <->  encoder.layers.{i}.<fnlm>  (fnlm's encoder_block)
    ("attention.self.query.weight", "attn.q.weight", "in_proj", ("H", "H")),
    ("attention.self.query.bias", "attn.q.bias", "in_bias", ("H",)),
    ("attention.self.key.weight", "attn.k.weight", "in_proj", ("H", "H")),
    ("attention.self.key.bias", "attn.k.bias", "in_bias", ("H",)),
    ("attention.self.value.weight", "attn.v.weight", "in_proj", ("H", "H")),
    ("attention.self.value.bias", "attn.v.bias", "in_bias", ("H",)),
    ("attention.output.dense.weight", "attn.o.weight", "out_proj", ("H", "H")),
    ("attention.output.dense.bias", "attn.o.bias", "copy", ("H",)),
    ("attention.output.LayerNorm.weight", "norm1.gamma", "copy", ("H",)),
    ("attention.output.LayerNorm.bias", "norm1.beta", "copy", ("H",)),
    ("intermediate.dense.weight", "ffn.w1.weight", "linear", ("I", "H")),
    ("intermediate.dense.bias", "ffn.w1.bias", "copy", ("I",)),
    ("output.dense.weight", "ffn.w2.weight", "linear", ("H", "I")),
    ("output.dense.bias", "ffn.w2.bias", "copy", ("H",)),
    ("output.LayerNorm.weight", "norm2.gamma", "copy", ("H",)),
    ("output.LayerNorm.bias", "norm2.beta", "copy", ("H",)),
]
_POOLER = [
    ("pooler.dense.weight", "pooler.weight", "linear", ("H", "H")),
    ("pooler.dense.bias", "pooler.bias", "copy", ("H",)),
]
_CLASSIFIER = [
    ("classifier.weight", "classifier.weight", "linear", ("C", "H")),
    ("classifier.bias", "classifier.bias", "copy", ("C",)),
]
_MLM = [  # the decoder weight is tied to the word embeddings and so not listed
    ("cls.predictions.transform.dense.weight", "mlm.transform.weight", "linear", ("H", "H")),
    ("cls.predictions.transform.dense.bias", "mlm.transform.bias", "copy", ("H",)),
    ("cls.predictions.transform.LayerNorm.weight", "mlm.norm.gamma", "copy", ("H",)),
    ("cls.predictions.transform.LayerNorm.bias", "mlm.norm.beta", "copy", ("H",)),
    ("cls.predictions.bias", "mlm.bias", "copy", ("V",)),
]


_NSP = [  # next-sentence prediction (BertForPreTraining): two classes
    ("cls.seq_relationship.weight", "nsp.weight", "linear", ("2", "H")),
    ("cls.seq_relationship.bias", "nsp.bias", "copy", ("2",)),
]


_TOKEN_CLASSIFIER = [  # BertForTokenClassification: the same HF names as the sequence classifier
    ("classifier.weight", "token_classifier.weight", "linear", ("C", "H")),
    ("classifier.bias", "token_classifier.bias", "copy", ("C",)),
]
_SPAN = [  # BertForQuestionAnswering: start (row 0) and end (row 1) scores
    ("qa_outputs.weight", "span.weight", "linear", ("2", "H")),
    ("qa_outputs.bias", "span.bias", "copy", ("2",)),
]


def param_mapping(cfg: BertConfig, head: str = "none", *, pooler: bool = True) -> list[Entry]:
    """The HF <-> fnlm table for a model (entries in the order of fnlm's init trees)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    pre = "" if head == "none" else "bert."
    body = [(h, f, k, s) for h, f, k, s in _EMBEDDINGS]
    for i in range(cfg.num_hidden_layers):
        body += [(f"encoder.layer.{i}.{h}", f"encoder.layers.{i}.{f}", k, s) for h, f, k, s in _LAYER]
    if pooler:
        body += _POOLER
    table = [Entry(h, pre + f, k, s, True) for h, f, k, s in body]
    extra = {
        "none": [],
        "classifier": _CLASSIFIER,
        "mlm": _MLM,
        "pretraining": _MLM + _NSP,
        "token_classifier": _TOKEN_CLASSIFIER,
        "span": _SPAN,
    }[head]
    return table + [Entry(h, f, k, s, False) for h, f, k, s in extra]


def _dims(cfg: BertConfig) -> dict[str, int]:
    return {sym: getattr(cfg, name) for sym, name in _DIM_NAMES.items()} | {"2": 2}


def _hf_shape(e: Entry, cfg: BertConfig) -> tuple[int, ...]:
    d = _dims(cfg)
    return tuple(d[s] for s in e.shape)


def _fnlm_shape(e: Entry, cfg: BertConfig) -> tuple[int, ...]:
    H, n, dk = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    hf = _hf_shape(e, cfg)
    return {"copy": hf, "linear": hf[::-1], "in_proj": (H, n, dk), "in_bias": (n, dk), "out_proj": (n, dk, H)}[e.kind]


def _shape_text(e: Entry, cfg: BertConfig) -> str:
    return f"{_hf_shape(e, cfg)} [{', '.join(_DIM_NAMES.get(s, s) for s in e.shape)}]"


def _to_fnlm(kind: str, t: Tensor, cfg: BertConfig) -> Tensor:
    """HF layout -> fnlm layout (see the module docstring)."""
    H, n, dk = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    if kind == "copy":
        return t
    if kind == "linear":  # [out, in] -> [in, out]
        return t.mT.contiguous()
    if kind == "in_proj":  # [n*dk (out), H (in)] -> [H, n, dk]
        return t.mT.reshape(H, n, dk).contiguous()
    if kind == "in_bias":  # [n*dk] -> [n, dk]
        return t.reshape(n, dk)
    if kind == "out_proj":  # [H (out), n*dk (in)] -> [n, dk, H]
        return t.mT.reshape(n, dk, H).contiguous()
    raise AssertionError(kind)


def _to_hf(kind: str, t: Tensor, cfg: BertConfig) -> Tensor:
    """fnlm layout -> HF layout: the inverse of :func:`_to_fnlm`."""
    H = cfg.hidden_size
    if kind == "copy":
        return t
    if kind == "linear":
        return t.mT.contiguous()
    if kind in ("in_proj", "out_proj"):  # [H, n, dk] / [n, dk, H] -> [H_in, H_out] -> [out, in]
        return t.reshape(H, H).mT.contiguous()
    if kind == "in_bias":
        return t.reshape(H)
    raise AssertionError(kind)


def _canonical(name: str) -> str:
    """Checkpoint name -> table name: drop a ``bert.`` prefix, legacy LayerNorm ``gamma``/``beta``."""
    if name.startswith("bert."):
        name = name[len("bert.") :]
    if name.endswith("LayerNorm.gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name[: -len("beta")] + "bias"
    return name


# ----------------------------------------------------------------------------- files


# ----------------------------------------------------------------------------- load
def load_bert(
    path: str | os.PathLike,
    *,
    config: BertConfig | str | os.PathLike | Mapping | None = None,
    head: str = "none",
    num_labels: int | None = None,
    strict: bool = True,
    head_key: random.Key | None = None,
    pooler: bool | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Params, BertConfig]:
    """Load a Hugging Face BERT checkpoint into fnlm params: ``(params, cfg)``.

    ``path``: a directory with ``config.json`` and ``model.safetensors`` (or shards listed in
    ``model.safetensors.index.json``), or one ``.safetensors`` file (config from ``config=`` or a
    ``config.json`` beside it). ``head``: ``'none'`` (tree of :func:`~fnlm.models.bert.init_bert`),
    ``'classifier'`` (:func:`~fnlm.models.bert.init_bert_classifier`), ``'mlm'``
    (:func:`~fnlm.models.bert.init_bert_mlm`), ``'pretraining'`` (MLM + NSP,
    :func:`~fnlm.models.init_bert_pretraining`, ``BertForPreTraining``), ``'token_classifier'``
    (:func:`~fnlm.models.init_token_classifier`, ``BertForTokenClassification``) or ``'span'``
    (:func:`~fnlm.models.init_span_head`, ``BertForQuestionAnswering``). Names with or without ``bert.``, legacy LayerNorm
    ``gamma``/``beta`` are accepted. ``pooler``: ``None`` = as the HF class for ``head`` (required
    for ``'none'``/``'classifier'``/``'pretraining'``, not loaded for ``'mlm'``/``'token_classifier'``/``'span'``), ``True`` = required, ``False`` =
    not loaded. Entries of other heads (``classifier.*``, ``cls.predictions.*``) and
    :data:`IGNORED_KEYS` are skipped; a tied MLM ``decoder.weight`` must equal the word embeddings.

    Every shape is checked against the config. Missing and unexpected keys are reported together
    in one :class:`~fnlm.io.CheckpointError` naming the file; with ``strict=False`` unexpected keys
    only warn (missing ones are always an error). ``head_key``: a random key that initialises the head
    when the checkpoint has none (e.g. a classifier on a pretrained encoder); without it a missing
    head is an error. ``num_labels`` overrides
    the config's (classifier, token_classifier). ``dtype``: ``'fp32'``/``'bf16'``/``'fp16'`` casts every tensor.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    dtype = torch_dtype(dtype)
    path = Path(path)
    files = weight_files(path)
    cfg, cfg_src = resolve_config(config, path, BertConfig, bert_config_from_hf, read_bert_config)
    if head in ("classifier", "token_classifier") and num_labels is not None and num_labels != cfg.num_labels:
        cfg = dataclasses.replace(cfg, num_labels=num_labels, id2label=None)
    where = files[0] if len(files) == 1 else path

    check_fits(bert_param_count(cfg), (dtype or torch.float32).itemsize, cfg_src)
    raw = read_checkpoint(path, files, _canonical, device=str(device))  # canonical name -> (tensor, file, name)
    unify_dtypes(raw, dtype, where)

    want_pooler = head not in NO_POOLER_HEADS if pooler is None else pooler
    table = param_mapping(cfg, head, pooler=want_pooler)
    ignored = set(IGNORED_KEYS)
    if not want_pooler:
        ignored |= {h for h, *_ in _POOLER}
    if head not in ("classifier", "token_classifier"):
        ignored |= {h for h, *_ in _CLASSIFIER}
    if head != "span":
        ignored |= {h for h, *_ in _SPAN}
    if head != "pretraining":
        ignored |= {h for h, *_ in _NSP}
    if head not in ("mlm", "pretraining"):
        ignored |= {k for k in raw if k.startswith("cls.predictions.")}
    elif "cls.predictions.bias" not in raw and "cls.predictions.decoder.bias" in raw:
        raw["cls.predictions.bias"] = raw.pop("cls.predictions.decoder.bias")

    flat: dict[str, Tensor] = {}
    missing: list[Entry] = []
    problems: list[str] = []
    for e in table:
        if e.hf not in raw:
            missing.append(e)
            continue
        t, f, orig = raw.pop(e.hf)
        if tuple(t.shape) != _hf_shape(e, cfg):
            problems.append(f"{f}: {orig}: expected shape {_shape_text(e, cfg)} from {cfg_src}, found {tuple(t.shape)}")
        elif not t.is_floating_point():
            problems.append(f"{f}: {orig}: expected a floating-point tensor, found {t.dtype}")
        else:
            flat[e.fnlm] = _to_fnlm(e.kind, t, cfg)

    if head in ("mlm", "pretraining"):  # tied / duplicated entries of the MLM decoder
        word = flat.get("bert.embeddings.word.weight")
        for name, ref, what in (
            ("cls.predictions.decoder.weight", word, "the word embeddings"),
            ("cls.predictions.decoder.bias", flat.get("mlm.bias"), "cls.predictions.bias"),
        ):
            if name in raw:
                t, f, orig = raw.pop(name)
                if ref is not None and not (t.shape == ref.shape and torch.equal(t.to(ref.dtype), ref)):
                    problems.append(
                        f"{f}: {orig}: differs from {what}; fnlm's MLM head ties its decoder, "
                        "an untied decoder is not supported"
                    )

    head_entries = [e for e in missing if not e.body]
    all_head_missing = head != "none" and len(head_entries) == len([e for e in table if not e.body])
    init_head = all_head_missing and head_key is not None
    if init_head:
        random._check_key(head_key)
        missing = [e for e in missing if e.body]

    unexpected = sorted(f"{orig} (in {f.name})" for c, (_, f, orig) in raw.items() if c not in ignored)
    if missing or problems or (unexpected and strict):
        lines = [f"{where}: checkpoint does not match a BERT model with head={head!r} and config {cfg_src}"]
        error = CheckpointError
        if missing:
            names = [e.hf_name(head) for e in missing]
            hint = ""
            if head != "none" and head_entries and all_head_missing:
                hint = f" (the checkpoint has no {head} head: pass head_key=fnlm.random.key(seed) to initialise one)"
                error = MissingHeadError
            elif any(e.hf.startswith("pooler.") for e in missing):
                hint = " (no pooler in the checkpoint: pass pooler=False to load without one)"
                error = MissingPoolerError
            lines.append(f"  missing keys ({len(names)}){hint}: {short(names)}")
        if unexpected and strict:
            lines.append(f"  unexpected keys ({len(unexpected)}): {short(unexpected)}")
        lines += [f"  {p}" for p in problems[:20]] + (
            [f"  ... {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise error("\n".join(lines))
    if unexpected:
        warnings.warn(f"{where}: ignoring unexpected keys {short(unexpected)}", stacklevel=2)

    params = unflatten_names(flat)
    if init_head:  # only now: every body shape matched the config, so the head's sizes are the checkpoint's
        params.update(
            {
                "classifier": lambda: {"classifier": init_classifier_head(head_key, cfg)},
                "mlm": lambda: {"mlm": init_mlm_head(head_key, cfg)},
                "pretraining": lambda: init_pretraining_heads(head_key, cfg),
                "token_classifier": lambda: {"token_classifier": init_classifier_head(head_key, cfg)},
                "span": lambda: {"span": init_linear(head_key, cfg.hidden_size, 2, std=float(cfg.initializer_range))},
            }[head]()
        )
    params = cast(params, dtype=dtype, device=device)
    return params, cfg


# ----------------------------------------------------------------------------- save
def infer_head(params: Params) -> str:
    """``'classifier'``, ``'mlm'``, ``'pretraining'``, ``'token_classifier'``, ``'span'`` or ``'none'``
    from the shape of the tree."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    if "bert" in params:
        if "mlm" in params and "nsp" in params:
            return "pretraining"
        if "classifier" in params:
            return "classifier"
        if "token_classifier" in params:
            return "token_classifier"
        if "span" in params:
            return "span"
        if "mlm" in params:
            return "mlm"
        raise ValueError("params have a 'bert' body but no head ('classifier', 'mlm', 'token_classifier', 'span')")
    if "embeddings" in params and "encoder" in params:
        return "none"
    raise ValueError(f"params are not a BERT tree (top-level keys {sorted(params)})")


def save_bert(
    params: Params,
    cfg: BertConfig,
    out_dir: str | os.PathLike,
    *,
    head: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``params`` as a Hugging Face BERT directory: ``model.safetensors`` (HF names, with the
    ``bert.`` prefix for classifier / MLM models), ``config.json`` (``architectures``, labels) and
    the tokenizer files of ``tokenizer_dir``. ``head`` defaults to what the tree holds. The
    directory is built under a temporary name and renamed into place, so a failure leaves no
    ``out_dir`` (and an existing one untouched). Returns ``Path(out_dir)``.
    """
    if not isinstance(cfg, BertConfig):
        raise TypeError(f"cfg must be a BertConfig, got {type(cfg).__name__}")
    found = infer_head(params)
    head = found if head is None else head
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head != found:
        raise ValueError(f"head={head!r} but params hold a {found!r} model")
    body = params if head == "none" else params["bert"]
    if head in ("classifier", "token_classifier"):
        n = params[head]["weight"].shape[-1]
        if n != cfg.num_labels:
            cfg = dataclasses.replace(cfg, num_labels=n, id2label=None)

    flat = flatten_names(params)
    tensors: dict[str, Tensor] = {}
    problems = []
    for e in param_mapping(cfg, head, pooler="pooler" in body):
        if e.fnlm not in flat:
            problems.append(f"missing {e.fnlm}")
            continue
        t = flat.pop(e.fnlm)
        if not isinstance(t, Tensor) or tuple(t.shape) != _fnlm_shape(e, cfg):
            problems.append(
                f"{e.fnlm}: expected shape {_fnlm_shape(e, cfg)} from the config, found "
                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
            )
            continue
        tensors[e.hf_name(head)] = owned(_to_hf(e.kind, t, cfg))
    if flat:
        problems.append(f"entries with no BERT checkpoint name: {short(sorted(flat))}")
    if problems:
        raise ValueError(
            f"cannot save to {out_dir}: params do not match a BERT model with head={head!r}:\n  "
            + "\n  ".join(problems)
        )

    tok_files = tokenizer_files(tokenizer_dir, TOKENIZER_FILES)
    return write_checkpoint(out_dir, tensors, bert_config_to_hf(cfg, head), tok_files)
