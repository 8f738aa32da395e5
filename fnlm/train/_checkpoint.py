"""Training state on disk: params, optimizer state, step and key, restored exactly.

A training-state checkpoint is a directory::

    ckpt/
      tensors.safetensors   every tensor leaf under a dotted name (params.encoder.layers.0...,
                            opt_state.1.mu..., key), dtypes kept (int64 step counters stay int64)
      train_state.json      format version, step, the tree structure, the names, ``extra``

The structure records dicts (with key order), lists, tuples and NamedTuples (e.g. the optimizer
states ``AdamState(count, mu, nu)``), so :func:`load_train_state` rebuilds trees that compare
equal to the saved ones, leaf for leaf and type for type. The directory is built under a
temporary name and renamed into place (:func:`fnlm.io.atomic_dir`): a crash while saving leaves
the previous checkpoint intact. Nothing is unpickled, and NamedTuple classes are looked up only
among modules already imported (a checkpoint never triggers an import).

Resuming is exact: everything a pure training step depends on is in this directory, so on CPU a
run saved at step ``k`` and continued in a fresh process is bitwise identical to an
uninterrupted one (as long as the data order is a function of the step, e.g. ``fold_in(key, step)``).
The tensors are read into fresh tensors of their own (:func:`fnlm.io.read_safetensors`), laid out in
memory as the computed tensors of an uninterrupted run are.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fnlm.io._safetensors import CheckpointError, atomic_dir, read_safetensors, write_json, write_safetensors
from fnlm.tree import PyTree

FORMAT = "fnlm.train_state"
VERSION = 1
TENSORS = "tensors.safetensors"
META = "train_state.json"
_SCALARS = (bool, int, float, str, type(None))


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _encode(node: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON description of ``node``; tensor leaves are moved into ``tensors`` under their name."""
    if isinstance(node, Tensor):
        if name in tensors:
            raise ValueError(f"two tensors would be saved under the name {name!r}; rename a dict key")
        tensors[name] = node
        return {"tensor": name}
    join = (lambda k: f"{name}.{k}") if name else str
    if isinstance(node, dict):
        for k in node:
            if not isinstance(k, str) or not k or "." in k:
                raise TypeError(
                    f"dict keys in a training state must be non-empty strings without '.', "
                    f"got {k!r} at {name or '<root>'}"
                )
        # a list of [key, value] pairs: keeps the key order (the JSON file is written with sorted keys)
        return {"dict": [[k, _encode(v, join(k), tensors)] for k, v in node.items()]}
    if _is_namedtuple(node):
        cls = type(node)
        return {
            "namedtuple": f"{cls.__module__}:{cls.__qualname__}",
            "fields": [[f, _encode(getattr(node, f), join(f), tensors)] for f in cls._fields],
        }
    if isinstance(node, (list, tuple)):
        kind = "list" if isinstance(node, list) else "tuple"
        return {kind: [_encode(v, join(i), tensors) for i, v in enumerate(node)]}
    if isinstance(node, _SCALARS):
        return {"value": node}
    raise TypeError(
        f"cannot save a {type(node).__name__} at {name or '<root>'}: a training state holds "
        "tensors in dicts/lists/tuples/NamedTuples (and plain Python scalars)"
    )


def _namedtuple_class(spec: str) -> type:
    module, _, qualname = spec.partition(":")
    mod = sys.modules.get(module)
    if mod is None:
        raise CheckpointError(
            f"the checkpoint holds a {spec} NamedTuple, but module {module!r} is not imported; "
            f"import it before load_train_state (checkpoints never import code)"
        )
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")):
        raise CheckpointError(f"the checkpoint names {spec}, which is not a NamedTuple class")
    return obj


def _decode(desc: Any, tensors: dict[str, Tensor], where: str) -> Any:
    if not isinstance(desc, dict) or len(desc) not in (1, 2):
        raise CheckpointError(f"{where}: malformed structure entry {desc!r}")
    if "tensor" in desc:
        name = desc["tensor"]
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {name!r} is missing from {TENSORS}")
        return tensors[name]
    if "dict" in desc:
        return {k: _decode(v, tensors, where) for k, v in desc["dict"]}
    if "namedtuple" in desc:
        cls = _namedtuple_class(desc["namedtuple"])
        fields = dict(desc["fields"])
        if list(fields) != list(cls._fields):
            raise CheckpointError(
                f"{where}: {desc['namedtuple']} has fields {list(cls._fields)}, the checkpoint {list(fields)}"
            )
        return cls(**{f: _decode(v, tensors, where) for f, v in fields.items()})
    if "list" in desc:
        return [_decode(v, tensors, where) for v in desc["list"]]
    if "tuple" in desc:
        return tuple(_decode(v, tensors, where) for v in desc["tuple"])
    if "value" in desc:
        return desc["value"]
    raise CheckpointError(f"{where}: unknown structure entry {desc!r}")


def _owned(t: Tensor) -> Tensor:
    """A contiguous CPU copy that owns its storage (safetensors refuses shared or partial storage)."""
    t = t.detach().to("cpu")
    if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def save_train_state(
    path_dir: str | os.PathLike,
    params: PyTree,
    opt_state: PyTree,
    step: int,
    key: Tensor,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``params``, ``opt_state``, ``step`` (an int), ``key`` and ``extra`` (a small
    JSON-serialisable dict: config, data position, metrics) to the directory ``path_dir``."""
    if isinstance(step, Tensor):
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"step must be a non-negative int, got {step!r}")
    if not isinstance(key, Tensor):
        raise TypeError(f"key must be a tensor (fnlm.random key), got {type(key).__name__}")
    extra = {} if extra is None else extra
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-serialisable (small metadata; put tensors in params): {e}") from None
    tensors: dict[str, Tensor] = {}
    structure = _encode({"params": params, "opt_state": opt_state, "key": key}, "", tensors)
    seen: dict[tuple, str] = {}
    out = {}
    for name, t in tensors.items():  # clone tensors that alias an earlier one (tied weights)
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        out[name] = _owned(t).clone() if (sig in seen and t.numel() > 0) else _owned(t)
        seen.setdefault(sig, name)
    meta = {"format": FORMAT, "version": VERSION, "step": step, "structure": structure, "extra": extra}
    path_dir = Path(path_dir)
    with atomic_dir(path_dir) as tmp:
        write_safetensors(out, tmp / TENSORS, metadata={"format": FORMAT})
        write_json(meta, tmp / META)
    return path_dir


def load_train_state(
    path_dir: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[PyTree, PyTree, int, Tensor, dict[str, Any]]:
    """``(params, opt_state, step, key, extra)`` exactly as saved by :func:`save_train_state`."""
    import fnlm.optim  # noqa: F401  (its NamedTuple state classes may appear in the structure)

    path_dir = Path(path_dir)
    meta_path = path_dir / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path_dir}: not a training-state checkpoint (no {META})")
    from fnlm.train._validate import validate_train_state

    validate_train_state(path_dir)  # the whole file checked first: a malformed one is one line
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not an {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('version')}, this fnlm reads {VERSION}")
    tensors, _ = read_safetensors(path_dir / TENSORS, device=str(device))
    tree = _decode(meta["structure"], tensors, str(path_dir))
    return tree["params"], tree["opt_state"], int(meta["step"]), tree["key"], meta.get("extra", {})
