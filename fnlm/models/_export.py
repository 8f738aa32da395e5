"""A fine-tuned BERT classifier as a self-contained inference package.

``logits = bert_classifier(params, input_ids, cfg, attention_mask=m)`` with the parameters
*bound*: :func:`export_classifier_program` traces that pure forward with ``torch.export``
(dynamic batch and sequence length, the parameters as named buffers of the graph; optionally
weight-only int8, see :func:`fnlm.nn.quantize_int8`, or bfloat16), and :func:`export_classifier`
writes a directory that classifies raw text in a fresh process without the parameter tree or
the config::

    export.json          labels, max_len, truncation, the form (aoti | program), int8, dtype, torch version
    model.pt2            AOTInductor package (aoti: compiled C++/kernels + weights), or
    program.pt2          the ExportedProgram (program: no C++ compile, runs through torch's interpreter)
    vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json

:func:`load_classifier_package` reads it back as a :class:`TextClassifier`
(``.logits(input_ids, attention_mask)`` and ``.predict_proba(texts)``, which sorts the texts by
length so each batch pads little); :func:`text_classifier` is the same object over the eager (or
``torch.compile``-d) pure forward, so every form batches and tokenizes alike.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fnlm.tree import Params, cast, flatten_names, unflatten_names
from fnlm.io._safetensors import atomic_dir
from fnlm.models._bert import BertConfig, _check_config, bert_classifier
from fnlm.nn._quantize import quantize_int8, with_int8_weights

PACKAGE_FORMAT = "fnlm-classifier-package"
PACKAGE_VERSION = 1
FORMS = ("aoti", "program")
_FILES = {"aoti": "model.pt2", "program": "program.pt2"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _Bound(torch.nn.Module):
    """``forward(input_ids, attention_mask) = fn(params, input_ids, attention_mask)`` with the
    leaves of ``params`` registered as buffers (so the graph names them, e.g.
    ``bert__encoder__layers__0__attn__q__weight``). Only a carrier for ``torch.export``."""

    def __init__(self, fn: Callable[..., Tensor], params: Params):
        super().__init__()
        self._fn = fn
        self._names = {}
        for name, leaf in flatten_names(params).items():
            safe = name.replace(".", "__")
            self._names[safe] = name
            self.register_buffer(safe, leaf.detach())

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        params = unflatten_names({name: getattr(self, safe) for safe, name in self._names.items()})
        return self._fn(params, input_ids, attention_mask)


INT8_MODES = ("weight", "dynamic")


def _int8_mode(int8: bool | str) -> str | None:
    """``False`` -> None; ``True`` / ``'weight'`` -> weight-only int8; ``'dynamic'`` -> int8 x int8."""
    if int8 is False or int8 is None:
        return None
    if int8 is True:
        return "weight"
    if int8 not in INT8_MODES:
        raise ValueError(f"int8 must be False, True, 'weight' or 'dynamic', got {int8!r}")
    return int8


def _classifier_forward(cfg: BertConfig, *, int8: bool | str = False,
                       dtype: torch.dtype = torch.float32) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """The pure inference forward ``f(params, input_ids, attention_mask) -> float32 logits``
    (``params`` quantized by :func:`fnlm.nn.quantize_int8` when ``int8``, and in ``dtype``).
    ``int8=True``/``'weight'``: weights expanded to float in the graph (:func:`fnlm.nn.with_int8_weights`);
    ``'dynamic'``: the linear layers multiply int8 x int8 with per-call activation scales
    (:mod:`fnlm.nn._dynamic_int8`; the forward reads the quantized tree directly)."""
    _check_config(cfg)
    mode = _int8_mode(int8)

    def forward(params: Params, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return bert_classifier(params, input_ids, cfg, attention_mask=attention_mask).float()

    return with_int8_weights(forward, dtype) if mode == "weight" else forward


def _prepare_params(params: Params, *, int8: bool = False, dtype: torch.dtype = torch.float32) -> Params:
    """The tree :func:`_classifier_forward` expects: cast to ``dtype``, then int8 weights if asked."""
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    params = cast(params, dtype)
    return quantize_int8(params) if _int8_mode(int8) else params


def export_classifier_program(params: Params, cfg: BertConfig, *, max_len: int | None = None, int8: bool | str = False,
                              dtype: torch.dtype = torch.float32) -> torch.export.ExportedProgram:
    """``torch.export`` of :func:`_classifier_forward` with ``params`` bound: inputs ``input_ids``,
    ``attention_mask`` ``[batch, len]`` (int64), dynamic ``1 <= batch``, ``2 <= len <= max_len``
    (default ``cfg.max_position_embeddings``); output float32 logits ``[batch, num_labels]``."""
    _check_config(cfg)
    if "classifier" not in params:
        raise ValueError("export needs a classifier: params has no 'classifier' (load with head='classifier')")
    max_len = cfg.max_position_embeddings if max_len is None else max_len
    if not 2 <= max_len <= cfg.max_position_embeddings:
        raise ValueError(f"max_len must be in [2, {cfg.max_position_embeddings}] (the position table), got {max_len}")
    module = _Bound(_classifier_forward(cfg, int8=int8, dtype=dtype), _prepare_params(params, int8=int8, dtype=dtype))
    n = min(8, max_len)
    example = (torch.full((2, n), 1, dtype=torch.long), torch.ones(2, n, dtype=torch.long))
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=2, max=max_len)
    shapes = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=shapes)


def export_classifier(params: Params, cfg: BertConfig, tokenizer: Any, path: str | Path, *, max_len: int = 512,
                      truncation: str = "head", head_tokens: int | None = None, int8: bool | str = False,
                      dtype: torch.dtype = torch.float32, form: str = "aoti") -> Path:
    """Write the package directory ``path`` (atomically) and return it.

    ``form='aoti'``: AOTInductor compiles the exported graph to a shared library (a C++ compiler
    is needed at export time only; minutes for BERT-base, about one for MiniLM on 2 cores);
    ``'program'``: only the ``ExportedProgram`` (no compile; slower to run). ``tokenizer`` (a
    :class:`fnlm.data.WordPieceTokenizer`), ``max_len``, ``truncation`` and ``head_tokens`` are
    how texts are encoded at prediction time (use the fine-tuning values). ``int8``: ``False``,
    ``True``/``'weight'`` (weight-only int8) or ``'dynamic'`` (int8 x int8, activation scales per call).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if truncation not in ("head", "head+tail"):
        raise ValueError(f"truncation must be 'head' or 'head+tail', got {truncation!r}")
    dtype_name = next((k for k, v in _DTYPES.items() if v == dtype), None)
    if dtype_name is None:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    t0 = time.perf_counter()
    program = export_classifier_program(params, cfg, max_len=max_len, int8=int8, dtype=dtype)
    t_export = time.perf_counter() - t0
    with atomic_dir(path) as tmp:
        target = tmp / _FILES[form]
        if form == "aoti":
            torch._inductor.aoti_compile_and_package(program, package_path=str(target))
        else:
            torch.export.save(program, str(target))
        tokenizer.save(tmp)
        meta = {
            "format": PACKAGE_FORMAT, "version": PACKAGE_VERSION, "form": form, "file": _FILES[form],
            "labels": list(cfg.labels), "max_len": max_len, "truncation": truncation, "head_tokens": head_tokens,
            "int8": bool(_int8_mode(int8)), "int8_mode": _int8_mode(int8), "dtype": dtype_name, "torch": torch.__version__,
            "export_seconds": round(t_export, 1), "compile_seconds": round(time.perf_counter() - t0 - t_export, 1),
        }
        (tmp / "export.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(path)


@dataclass
class TextClassifier:
    """Raw text in, probabilities out: ``logits(input_ids, attention_mask)`` runs ``run`` (a loaded
    package's graph, or the pure forward); ``predict_proba(texts)`` tokenizes as at export time and
    returns ``[n, num_labels]``. ``meta``: the package's ``export.json`` (``{'form': 'eager'}`` or
    ``'compiled'`` for :func:`text_classifier`)."""

    run: Callable[[Tensor, Tensor], Tensor]
    tokenizer: Any
    labels: tuple[str, ...]
    max_len: int
    truncation: str
    head_tokens: int | None
    meta: dict

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[batch, len]`` int64 ids and mask -> float32 logits ``[batch, num_labels]``."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                             "must both be [batch, len]")
        if not 2 <= input_ids.shape[1] <= self.max_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} is outside [2, {self.max_len}] (the exported range)")
        with torch.no_grad():
            return self.run(input_ids.long().contiguous(), attention_mask.long().contiguous())

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """``softmax(logits)`` for each text, in the given order; batches of similar lengths."""
        ids = self.tokenizer.encode_ids(list(texts), max_len=self.max_len, truncation=self.truncation,
                                        head_tokens=self.head_tokens)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), len(self.labels))
        pad = self.tokenizer.pad_id
        for s in range(0, len(order), batch_size):
            rows = [ids[i] for i in order[s:s + batch_size]]
            width = max(2, max(len(r) for r in rows))
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for j, r in enumerate(rows):
                input_ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            out[order[s:s + batch_size]] = torch.softmax(self.logits(input_ids, mask), -1)
        return out


def text_classifier(params: Params, cfg: BertConfig, tokenizer: Any, *, max_len: int = 512, truncation: str = "head",
                    head_tokens: int | None = None, compile: bool = False) -> TextClassifier:
    """A :class:`TextClassifier` over ``bert_classifier(params, ...)`` itself (no export):
    eager, or with ``compile=True`` under ``torch.compile(dynamic=True)`` (one graph for all
    lengths; the first two batches pay the compilation)."""
    _check_config(cfg)
    forward = _classifier_forward(cfg)

    def run(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return forward(params, input_ids, attention_mask)

    return TextClassifier(run=torch.compile(run, dynamic=True) if compile else run, tokenizer=tokenizer,
                          labels=cfg.labels, max_len=max_len, truncation=truncation, head_tokens=head_tokens,
                          meta={"form": "compiled" if compile else "eager"})


def load_classifier_package(path: str | Path) -> TextClassifier:
    """Load a directory written by :func:`export_classifier` (one-line errors if it is not one)."""
    from fnlm.data._tokenizer import load_tokenizer

    d = Path(path)
    meta_file = d / "export.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{d}: no export.json, so not an exported classifier package")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("format") != PACKAGE_FORMAT or meta.get("form") not in FORMS:
        raise ValueError(f"{meta_file}: not an {PACKAGE_FORMAT} (format={meta.get('format')!r}, form={meta.get('form')!r})")
    if meta.get("version", 0) > PACKAGE_VERSION:
        raise ValueError(f"{meta_file}: package version {meta['version']} is newer than this fnlm reads ({PACKAGE_VERSION})")
    file = d / _FILES[meta["form"]]
    if not file.is_file():
        raise FileNotFoundError(f"{d}: export.json names {file.name}, which is missing")
    if meta["form"] == "aoti":
        run = torch._inductor.aoti_load_package(str(file))
    else:
        run = torch.export.load(str(file)).module()
    return TextClassifier(run=run, tokenizer=load_tokenizer(d), labels=tuple(meta["labels"]),
                              max_len=int(meta["max_len"]), truncation=meta["truncation"],
                              head_tokens=meta.get("head_tokens"), meta=meta)
