"""A fine-tuned BERT classifier as a self-contained inference package.

``logits = classifier_logits(params, input_ids, cfg, attention_mask=m)`` (BERT, RoBERTa, DistilBERT) with the parameters
*bound*: :func:`export_classifier_program` traces that pure forward with ``torch.export``
(dynamic batch and sequence length, the parameters as named buffers of the graph; optionally
weight-only int8, see :func:`fnlm.nn.quantize_int8`, or bfloat16), and :func:`export_classifier`
writes a directory that classifies raw text in a fresh process without the parameter tree or
the config::

    export.json          labels, max_len, truncation, the form (aoti | program), int8, dtype, torch version,
                         and ``files``: the sha256 of every other file of the package
    model.pt2            AOTInductor package (aoti: compiled C++/kernels + weights), or
    program.pt2          the ExportedProgram (program: no C++ compile, runs through torch's interpreter)
    vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json

:func:`load_classifier_package` reads it back as a :class:`TextClassifier`
(``.logits(input_ids, attention_mask)`` and ``.predict_proba(texts)``, which sorts the texts by
length so each batch pads little); :func:`text_classifier` is the same object over the eager (or
``torch.compile``-d) pure forward, so every form batches and tokenizes alike.

Consent before code: a package's ``model.pt2`` holds a native library (run at load) and a
``program.pt2`` a graph; :func:`load_classifier_package` loads neither unless
``trust_package=True`` (else :class:`UntrustedPackageError`), and then only after every file
matches the checksums written at export (else :class:`TamperedPackageError`). A program is
read without unpickling anything (see :func:`_load_program_bytes`). Checksums catch damage
and edits after export, not a package crafted whole by someone else: trusting a package
means trusting whoever gave it to you, as for any executable (see SECURITY.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fnlm.data._batching import choose_buckets
from fnlm.data._ordered import predict_in_order
from fnlm.io._safetensors import atomic_dir
from fnlm.models._auto import classifier_logits
from fnlm.models._bert import BertConfig
from fnlm.models._bert_family import DistilBertConfig, RobertaConfig
from fnlm.nn._quantize import quantize_int8, with_int8_weights
from fnlm.tree import Params, cast, flatten_names, unflatten_names

PACKAGE_FORMAT = "fnlm-classifier-package"
PACKAGE_VERSION = 2  # 2: export.json lists the sha256 of every file ("files")
FORMS = ("aoti", "program")
_FILES = {"aoti": "model.pt2", "program": "program.pt2"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class UntrustedPackageError(PermissionError):
    """A package (native library or program) was not loaded because the caller did not pass
    ``trust_package=True``."""


class TamperedPackageError(ValueError):
    """A package's files do not match the checksums in its ``export.json``, or its program
    holds pickled objects: refused even with ``trust_package=True``."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def _check_config(cfg: Any) -> BertConfig | DistilBertConfig:
    """``cfg`` if it is a BERT-family classifier's config (BERT, RoBERTa, DistilBERT)."""
    if not isinstance(cfg, (BertConfig, DistilBertConfig)):
        raise TypeError(f"cfg must be a BertConfig, RobertaConfig or DistilBertConfig, got {type(cfg).__name__}")
    return cfg


def _classifier_forward(
    cfg: BertConfig, *, int8: bool | str = False, dtype: torch.dtype = torch.float32
) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """The pure inference forward ``f(params, input_ids, attention_mask) -> float32 logits``
    (``params`` quantized by :func:`fnlm.nn.quantize_int8` when ``int8``, and in ``dtype``).
    ``int8=True``/``'weight'``: weights expanded to float in the graph (:func:`fnlm.nn.with_int8_weights`);
    ``'dynamic'``: the linear layers multiply int8 x int8 with per-call activation scales
    (:mod:`fnlm.nn._dynamic_int8`; the forward reads the quantized tree directly)."""
    _check_config(cfg)
    mode = _int8_mode(int8)

    def forward(params: Params, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return classifier_logits(params, input_ids, cfg, attention_mask=attention_mask).float()

    return with_int8_weights(forward, dtype) if mode == "weight" else forward


def _prepare_params(params: Params, *, int8: bool = False, dtype: torch.dtype = torch.float32) -> Params:
    """The tree :func:`_classifier_forward` expects: cast to ``dtype``, then int8 weights if asked."""
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    params = cast(params, dtype)
    return quantize_int8(params) if _int8_mode(int8) else params


def export_classifier_program(
    params: Params,
    cfg: BertConfig,
    *,
    max_len: int | None = None,
    int8: bool | str = False,
    dtype: torch.dtype = torch.float32,
) -> torch.export.ExportedProgram:
    """``torch.export`` of :func:`_classifier_forward` with ``params`` bound: inputs ``input_ids``,
    ``attention_mask`` ``[batch, len]`` (int64), dynamic ``1 <= batch``, ``2 <= len <= max_len``
    (default ``cfg.max_position_embeddings``); output float32 logits ``[batch, num_labels]``."""
    _check_config(cfg)
    if "classifier" not in params:
        raise ValueError("export needs a classifier: params has no 'classifier' (load with head='classifier')")
    longest = cfg.max_len if isinstance(cfg, RobertaConfig) else cfg.max_position_embeddings
    max_len = longest if max_len is None else max_len
    if not 2 <= max_len <= longest:
        raise ValueError(f"max_len must be in [2, {longest}] (the position table), got {max_len}")
    module = _Bound(_classifier_forward(cfg, int8=int8, dtype=dtype), _prepare_params(params, int8=int8, dtype=dtype))
    n = min(8, max_len)
    example = (torch.full((2, n), 1, dtype=torch.long), torch.ones(2, n, dtype=torch.long))
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=2, max=max_len)
    shapes = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=shapes)


def export_classifier(
    params: Params,
    cfg: BertConfig,
    tokenizer: Any,
    path: str | Path,
    *,
    max_len: int = 512,
    truncation: str = "head",
    head_tokens: int | None = None,
    int8: bool | str = False,
    dtype: torch.dtype = torch.float32,
    form: str = "aoti",
) -> Path:
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
            "format": PACKAGE_FORMAT,
            "version": PACKAGE_VERSION,
            "form": form,
            "file": _FILES[form],
            "labels": list(cfg.labels),
            "max_len": max_len,
            "truncation": truncation,
            "head_tokens": head_tokens,
            "int8": bool(_int8_mode(int8)),
            "int8_mode": _int8_mode(int8),
            "dtype": dtype_name,
            "torch": torch.__version__,
            "export_seconds": round(t_export, 1),
            "compile_seconds": round(time.perf_counter() - t0 - t_export, 1),
            "files": {f.name: _sha256(f.read_bytes()) for f in sorted(tmp.iterdir()) if f.name != "export.json"},
        }
        (tmp / "export.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(path)


@dataclass
class TextClassifier:
    """Raw text in, probabilities out: ``logits(input_ids, attention_mask)`` runs ``run`` (a loaded
    package's graph, or the pure forward); ``predict_proba(texts)`` tokenizes as at export time and
    returns ``[n, num_labels]``. ``meta``: the package's ``export.json`` (``{'form': 'eager'}`` or
    ``'compiled'`` for :func:`text_classifier`). ``eager``: set when ``run`` is compiled per static
    shape: the same forward uncompiled, for inputs too small to pay for a compile (``compile_cost``,
    as :func:`fnlm.data.choose_buckets`)."""

    run: Callable[[Tensor, Tensor], Tensor]
    tokenizer: Any
    labels: tuple[str, ...]
    max_len: int
    truncation: str
    head_tokens: int | None
    meta: dict
    eager: Callable[[Tensor, Tensor], Tensor] | None = None
    compile_cost: float = 30.0
    last_form: str | None = None  # what the last predict_proba ran: meta's form, or 'eager' for a small input

    def logits(self, input_ids: Tensor, attention_mask: Tensor, *, run: Callable | None = None) -> Tensor:
        """``[batch, len]`` int64 ids and mask -> float32 logits ``[batch, num_labels]``."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must both be [batch, len]"
            )
        if not 2 <= input_ids.shape[1] <= self.max_len:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} is outside [2, {self.max_len}] (the exported range)"
            )
        with torch.no_grad():
            return (run or self.run)(input_ids.long().contiguous(), attention_mask.long().contiguous())

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """``softmax(logits)`` for each text, in the given order; batches of similar lengths. A
        compiled forward sees a few static shapes (length buckets that pay for their compile, every
        batch padded to ``batch_size`` rows); with fewer batches than one compile costs, the eager one runs."""
        ids = self.tokenizer.encode_ids(
            list(texts), max_len=self.max_len, truncation=self.truncation, head_tokens=self.head_tokens
        )
        run, buckets = self.run, None
        self.last_form = self.meta.get("form")
        if self.eager is not None:
            if math.ceil(len(ids) / batch_size) < self.compile_cost:
                run, self.last_form = self.eager, "eager"
            else:
                buckets = choose_buckets(
                    [len(x) for x in ids], self.max_len, batch_size, compile_cost=self.compile_cost
                )
        out = predict_in_order(
            lambda i, m: torch.softmax(self.logits(i, m, run=run), -1),
            ids,
            batch_size=batch_size,
            buckets=buckets,
            pad_id=self.tokenizer.pad_id,
        )
        return out if len(ids) else torch.empty(0, len(self.labels))


def text_classifier(
    params: Params,
    cfg: BertConfig,
    tokenizer: Any,
    *,
    max_len: int = 512,
    truncation: str = "head",
    head_tokens: int | None = None,
    compile: bool = False,
    compile_cost: float = 30.0,
) -> TextClassifier:
    """A :class:`TextClassifier` over ``classifier_logits(params, ...)`` itself (no export): eager,
    or with ``compile=True`` one static graph per length bucket (:func:`fnlm.train.make_eval_step`;
    the buckets are chosen per call by :func:`fnlm.data.choose_buckets` with ``compile_cost``, and
    calls with fewer batches than that run eagerly)."""
    from fnlm.train._step import make_eval_step  # fnlm.train imports fnlm.models' neighbours: import late

    _check_config(cfg)
    forward = _classifier_forward(cfg)

    def run(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return forward(params, input_ids, attention_mask)

    if not compile:
        return TextClassifier(run, tokenizer, cfg.labels, max_len, truncation, head_tokens, {"form": "eager"})
    step = make_eval_step(forward, compile=True)
    return TextClassifier(
        run=lambda i, m: step(params, i, m),
        tokenizer=tokenizer,
        labels=cfg.labels,
        max_len=max_len,
        truncation=truncation,
        head_tokens=head_tokens,
        meta={"form": "compiled"},
        eager=run,
        compile_cost=compile_cost,
    )


def _read_meta(d: Path) -> dict:
    """``export.json`` of the package ``d``, checked for format and version (one-line errors)."""
    meta_file = d / "export.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{d}: no export.json, so not an exported classifier package")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file}: not a JSON object")
    if meta.get("format") != PACKAGE_FORMAT or meta.get("form") not in FORMS:
        raise ValueError(
            f"{meta_file}: not an {PACKAGE_FORMAT} (format={meta.get('format')!r}, form={meta.get('form')!r})"
        )
    version = meta.get("version", 0)
    if not isinstance(version, int) or version > PACKAGE_VERSION:
        raise ValueError(f"{meta_file}: package version {version!r} is newer than this fnlm reads ({PACKAGE_VERSION})")
    return meta


def _verified_files(d: Path, meta: dict) -> dict[str, bytes]:
    """Every file of the package read once and checked against ``meta['files']`` (sha256):
    no file missing, none added, none a symlink or a folder (:class:`TamperedPackageError`)."""
    listed = meta.get("files")
    if not isinstance(listed, dict) or not listed:
        raise TamperedPackageError(
            f"{d / 'export.json'}: lists no checksums (exported by an older fnlm?); re-export the package"
        )
    present = {}
    for entry in sorted(os.scandir(d), key=lambda e: e.name):
        if entry.name == "export.json":
            continue
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise TamperedPackageError(f"{d / entry.name}: not a regular file; a package holds only regular files")
        if entry.name not in listed:
            raise TamperedPackageError(f"{d / entry.name}: not listed in export.json's checksums")
        present[entry.name] = Path(entry.path)
    data = {}
    for name, digest in listed.items():
        if name not in present:
            raise TamperedPackageError(f"{d / str(name)}: listed in export.json but missing")
        blob = present[name].read_bytes()
        if _sha256(blob) != digest:
            raise TamperedPackageError(f"{d / name}: sha256 differs from export.json's (modified after export)")
        data[name] = blob
    return data


def _pickle_free(zf: zipfile.ZipFile, origin: str) -> None:
    """Raise :class:`TamperedPackageError` unless ``torch.export.load`` of this archive would
    unpickle nothing arbitrary: weights and constants are raw tensor bytes (no ``use_pickle``, no
    custom or opaque objects, no legacy pickled ``.pt`` state), and the sample inputs (the only
    pickle ``torch.export.save`` writes) load with ``torch.load(weights_only=True)``, so torch's
    fallback to ``weights_only=False`` is never reached."""
    from torch.export.pt2_archive import constants as k

    names = zf.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any(n.startswith("/") or ".." in n.split("/") for n in names):
        raise TamperedPackageError(f"{origin}: not a torch.export archive (one root folder expected)")
    root = roots.pop() + "/"
    rel = {n[len(root) :]: n for n in names}
    if "version" in names or k.MODELS_FILENAME_FORMAT.format("model") not in rel:
        raise TamperedPackageError(f"{origin}: not a current torch.export archive (legacy pickled format refused)")

    def config(fmt: str) -> dict:
        name = fmt.format("model")
        if name not in rel:
            raise TamperedPackageError(f"{origin}: {name} missing")
        try:
            cfg = json.loads(zf.read(rel[name]))["config"]
            assert isinstance(cfg, dict) and all(isinstance(v, dict) for v in cfg.values())
        except Exception:
            raise TamperedPackageError(f"{origin}: {name} is not a payload config") from None
        return cfg

    for what, fmt, prefix in (
        ("weight", k.WEIGHTS_CONFIG_FILENAME_FORMAT, k.WEIGHT_FILENAME_PREFIX),
        ("constant", k.CONSTANTS_CONFIG_FILENAME_FORMAT, k.TENSOR_CONSTANT_FILENAME_PREFIX),
    ):
        for fqn, meta in config(fmt).items():
            if meta.get("use_pickle") is not False or not str(meta.get("path_name", "")).startswith(prefix):
                raise TamperedPackageError(
                    f"{origin}: {what} {fqn!r} is a pickled object "
                    f"({meta.get('path_name')!r}); fnlm never unpickles a program's objects"
                )
    for legacy in (k.WEIGHTS_DIR + "model.pt", k.CONSTANTS_DIR + "model.pt"):
        if legacy in rel:
            raise TamperedPackageError(f"{origin}: {legacy} is a pickled state (legacy format refused)")
    for r, n in rel.items():
        if r.startswith(k.SAMPLE_INPUTS_DIR) and not n.endswith("/"):
            try:
                torch.load(io.BytesIO(zf.read(n)), weights_only=True)
            except Exception:
                raise TamperedPackageError(
                    f"{origin}: {r} is a pickle that torch.load(weights_only=True) refuses; "
                    "fnlm never unpickles a program's objects"
                ) from None


def _load_program_bytes(data: bytes, origin: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of an in-memory archive after :func:`_pickle_free` checked these
    very bytes (no re-read of the file between the check and the load)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise TamperedPackageError(f"{origin}: not a zip archive") from None
    _pickle_free(zf, origin)
    return torch.export.load(io.BytesIO(data))


def package_status(path: str | Path, *, trust_package: bool = False) -> str | None:
    """``None`` if :func:`load_classifier_package` would load ``path`` with this consent, else
    the one-line reason it would not (for a CLI's "skipped the exported package (...)" note).
    Without consent nothing is read but ``export.json``; with it, the checksums are verified
    and a program is checked to be pickle-free."""
    d = Path(path)
    try:
        meta = _read_meta(d)
        if not trust_package:
            return (
                f"{d} holds {_FILES[meta['form']]} ({meta['form']}), code that runs when loaded; "
                "not trusted (pass trust_package=True / --trust-package to run it)"
            )
        files = _verified_files(d, meta)
        if meta["form"] == "program":
            name = _FILES["program"]
            try:
                _pickle_free(zipfile.ZipFile(io.BytesIO(files.get(name, b""))), str(d / name))
            except zipfile.BadZipFile:
                raise TamperedPackageError(f"{d / name}: not a zip archive") from None
    except (OSError, ValueError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def load_classifier_package(path: str | Path, *, trust_package: bool = False) -> TextClassifier:
    """Load a directory written by :func:`export_classifier` (one-line errors if it is not one).

    ``trust_package=False`` (default): raise :class:`UntrustedPackageError` without loading any
    of its code (the native library of ``form='aoti'``, the graph of ``'program'``). With
    ``True``: every file must match export.json's sha256 (else :class:`TamperedPackageError`),
    the bytes checked are the bytes loaded, and a program is loaded without unpickling."""
    from fnlm.data._tokenizer import load_tokenizer

    d = Path(path)
    meta = _read_meta(d)
    file = d / _FILES[meta["form"]]
    if not trust_package:
        raise UntrustedPackageError(
            f"{d}: refusing to load {file.name} ({meta['form']}), code that runs when loaded, "
            "without trust_package=True (--trust-package)"
        )
    files = _verified_files(d, meta)
    if file.name not in files:
        raise FileNotFoundError(f"{d}: export.json names {file.name}, which is missing")
    if meta["form"] == "aoti":
        # load the verified bytes from a private copy, not the file again (it could change meanwhile)
        with tempfile.TemporaryDirectory(prefix="fnlm-package-") as tmp:
            private = Path(tmp) / file.name
            private.write_bytes(files[file.name])
            run = torch._inductor.aoti_load_package(str(private))
    else:
        run = _load_program_bytes(files[file.name], str(file)).module()
    return TextClassifier(
        run=run,
        tokenizer=load_tokenizer(d),
        labels=tuple(meta["labels"]),
        max_len=int(meta["max_len"]),
        truncation=meta["truncation"],
        head_tokens=meta.get("head_tokens"),
        meta=meta,
    )
