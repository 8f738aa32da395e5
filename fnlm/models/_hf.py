"""Format-generic parts of reading and writing Hugging Face checkpoints, shared by every model's
mapping (:mod:`fnlm.models._bert_hf`, :mod:`fnlm.models._gpt2_hf`).

* :func:`weight_files`: which ``.safetensors`` files make up a checkpoint (one file, a directory
  with ``model.safetensors``, or shards listed in ``model.safetensors.index.json``); pickles are
  refused with the one-line command that converts them.
* :func:`read_checkpoint`: every tensor of those files under its canonical (table) name, with the
  file and original name kept for error messages; duplicates and a lying index are errors.
* :func:`short`, :func:`owned`: helpers for reports and for writing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from fnlm.io._safetensors import CheckpointError, atomic_dir, read_safetensors, write_json, write_safetensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

#: canonical name -> (tensor, file it came from, name in that file)
Raw = dict[str, tuple[Tensor, Path, str]]


def read_config_json(path: str | os.PathLike, from_hf: Callable[[Mapping], Any]) -> Any:
    """``from_hf(json.load(path))`` for a Hugging Face ``config.json``; every error names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON config file ({e})") from None
    try:
        return from_hf(d)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {e}") from None


def resolve_config(
    config: Any, path: Path, config_class: type, from_hf: Callable[[Mapping], Any], read: Callable[[Any], Any]
) -> tuple[Any, str]:
    """``(cfg, where it came from)``: ``config`` itself (a ``config_class``), a ``config.json`` dict
    (``from_hf``) or path (``read``), or else the ``config.json`` beside the weights ``path``."""
    if isinstance(config, config_class):
        return config, "the given config"
    if isinstance(config, Mapping):
        return from_hf(config), "the given config"
    if isinstance(config, (str, os.PathLike)):
        return read(config), str(config)
    name = config_class.__name__
    if config is not None:
        raise TypeError(f"config must be a {name}, a dict or a path to config.json, got {type(config).__name__}")
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{path}: no config.json found at {cfg_path}; pass config={name}(...) or config='path/to/config.json'"
        )
    return read(cfg_path), str(cfg_path)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint file or directory (see the module docstring)."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            read_safetensors(path)  # raises: refuses pickles, says how to convert
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (need a 'weight_map'): {e!r}") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard file(s) that do not exist: {missing}")
        return [path / s for s in shards]
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        read_safetensors(pickles[0])  # raises: refuses pickles, says how to convert
    raise CheckpointError(
        f"{path}: no weights found: expected model.safetensors or model.safetensors.index.json "
        f"(found {sorted(p.name for p in path.iterdir())})"
    )


def check_index(path: Path, where: Raw) -> None:
    """A sharded checkpoint's index must name the shard each tensor is really in."""
    index = path / "model.safetensors.index.json" if path.is_dir() else None
    if index is None or not index.is_file() or (path / "model.safetensors").is_file():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    found = {orig: f.name for _, f, orig in where.values()}
    bad = [k for k, f in weight_map.items() if found.get(k) != f]
    if bad:
        raise CheckpointError(f"{index}: lists tensors that are not in the named shard: {bad[:10]}")


def read_checkpoint(path: Path, files: list[Path], canonical: Callable[[str], str], device: str = "cpu") -> Raw:
    """Every tensor of ``files`` under ``canonical(name)``; two names with the same canonical
    form are an error naming both files; the index (if sharded) is checked."""
    raw: Raw = {}
    for f in files:
        tensors, _ = read_safetensors(f, device=str(device))
        for name, t in tensors.items():
            canon = canonical(name)
            if canon in raw:
                raise CheckpointError(f"{f}: {name!r} duplicates {raw[canon][2]!r} from {raw[canon][1]}")
            raw[canon] = (t, f, name)
    check_index(path, raw)
    return raw


def short(names: list[str], n: int = 20) -> str:
    """At most ``n`` names, comma-separated, with a count of the rest."""
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def owned(t: Tensor) -> Tensor:
    """A CPU tensor that owns its storage (safetensors refuses tensors that share memory)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    return t


def tokenizer_files(tokenizer_dir: str | os.PathLike | None, names: tuple[str, ...]) -> list[Path]:
    """The files among ``names`` that ``tokenizer_dir`` holds (none asked: ``[]``; none there: an
    error), each resolved to a regular file inside ``tokenizer_dir``: a symlink leading out of it,
    or anything but a regular file, is refused in one line (a linked secret is never copied)."""
    if tokenizer_dir is None:
        return []
    d = Path(tokenizer_dir)
    root = Path(os.path.realpath(d))
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        # a huggingface_hub cache snapshot: its files are links to ../../blobs/ of the same repository
        root = root.parent.parent
    found = []
    for n in names:
        f = d / n
        if not os.path.lexists(f):
            continue
        real = Path(os.path.realpath(f))
        if not real.is_relative_to(root):
            raise ValueError(f"tokenizer_dir {d}: {n} is a symlink leading outside it (to {real}); refused")
        if not real.is_file():
            raise ValueError(f"tokenizer_dir {d}: {n} is not a regular file; refused")
        found.append(f)  # copied by content (shutil.copyfile), as a regular file
    if not found:
        raise ValueError(f"tokenizer_dir {tokenizer_dir} holds none of {names}")
    return found


def unify_dtypes(raw: Raw, dtype, where) -> None:
    """A checkpoint's floating-point tensors of several dtypes, with no ``dtype`` asked, are cast
    to float32 in place (what ``transformers`` loads by default), with a warning naming the file
    and the dtypes found, so the model never mixes dtypes."""
    import torch

    if dtype is not None:
        return
    found: dict = {}
    for t, _, _ in raw.values():
        if t.is_floating_point():
            found[t.dtype] = found.get(t.dtype, 0) + 1
    if len(found) <= 1:
        return
    import warnings

    counts = ", ".join(f"{n} {str(k).removeprefix('torch.')}" for k, n in sorted(found.items(), key=str))
    warnings.warn(
        f"{where}: tensors of several dtypes ({counts}); cast to float32 as transformers does (pass dtype= to choose)",
        stacklevel=3,
    )
    for k, (t, f, orig) in list(raw.items()):
        if t.is_floating_point() and t.dtype != torch.float32:
            raw[k] = (t.float(), f, orig)


def write_checkpoint(
    out_dir: str | os.PathLike, tensors: dict[str, Tensor], hf_config: dict, tok_files: list[Path]
) -> Path:
    """``out_dir`` with ``model.safetensors``, ``config.json`` (its ``dtype`` set when every tensor
    has the same one) and the tokenizer files, appearing atomically (a crash leaves nothing new)."""
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        hf_config = {**hf_config, "dtype": str(next(iter(dtypes))).removeprefix("torch.")}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(hf_config, tmp / "config.json")
        for f in tok_files:
            shutil.copyfile(f, tmp / f.name)
    return out_dir
