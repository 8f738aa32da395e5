"""Sharded training state on disk: each worker writes its shard, any number of workers reads it.

A sharded checkpoint is a directory::

    ckpt/
      shard-00000-of-00002.safetensors   worker r's slice [r s_g, (r+1) s_g) of every padded group
      shard-00001-of-00002.safetensors   vector: the parameters (params.<group>) and every optimizer
                                         leaf that has one element per parameter (opt_state.1.mu.<group>)
      replicated.safetensors             what every worker holds whole: step counts, injected
                                         hyper-parameters, the key
      index.json                         format, version, the layout (group sizes, dtypes, the
                                         number of workers), the optimizer state's structure, step,
                                         extra, and the SHA-256 of every file

Every worker calls :func:`save_sharded`. Worker 0 builds the directory under a temporary name
(:func:`fnlm.io.atomic_dir`), tells the others where, waits until all have written their file and
sent its checksum, writes ``index.json`` last and renames the directory into place: a crash at any
point leaves the previous checkpoint intact and no partial one under the final name (the workers
must share a file system, as ``torch.distributed.checkpoint`` requires too).

:func:`load_sharded` takes the *current* :class:`~fnlm.train.Sharding`, which may have another
number of workers or another level than the one that saved: worker ``r'`` of ``N'`` needs
``[r' s'_g, (r'+1) s'_g)`` of each group (all of ``[0, N' s'_g)`` for what it holds whole), and
reads exactly those elements from the old files (safetensors slices, no whole-file load), after
checking the files' checksums. The padding beyond ``n_g`` is zeros in any layout, so 2 -> 1 and
1 -> 2 workers give the same numbers (tested), and a gathered state written with
:func:`fnlm.models.save_gpt2` is bitwise the single-process one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fnlm.io._safetensors import CheckpointError, atomic_dir, write_json, write_safetensors
from fnlm.train._checkpoint import _decode, _encode
from fnlm.train._shard import Sharding, _nest
from fnlm.tree import PyTree

FORMAT = "fnlm.sharded_train_state"
VERSION = 1
INDEX = "index.json"
REPLICATED = "replicated.safetensors"


def shard_file(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _label_of(name: str, labels: list[str]) -> str | None:
    for g in labels:
        if name == g or name.endswith("." + g):
            return g
    return None


def _collective(sh: Sharding) -> bool:
    return sh.world > 1


def save_sharded(
    path_dir: str | os.PathLike,
    sharding: Sharding,
    held: PyTree,
    opt_state: PyTree,
    step: int,
    key: Tensor,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write this worker's part of ``(held, opt_state)`` plus ``step``, ``key``, ``extra`` to the
    sharded checkpoint ``path_dir`` (every worker calls it; see the module docstring)."""
    sh = sharding
    if isinstance(step, Tensor):
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"step must be a non-negative int, got {step!r}")
    extra = {} if extra is None else extra
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-serialisable: {e}") from None
    flat = sh.check_held(held)
    mine: dict[str, Tensor] = {f"params.{g}": _mine(sh, v, g) for g, v in flat.items()}
    leaves: dict[str, Tensor] = {}
    structure = _encode({"opt_state": opt_state}, "", leaves)
    replicated: dict[str, Tensor] = {"key": key}
    sharded: dict[str, str] = {}
    longest_first = sorted(sh.labels, key=len, reverse=True)
    for name, t in leaves.items():
        g = _label_of(name, longest_first)
        if g is not None and t.ndim == 1 and t.shape[0] in (sh.shard_sizes[g], sh.padded_size(g)):
            mine[name] = _mine(sh, t, g)
            sharded[name] = g
        else:
            replicated[name] = t
    sharded.update({f"params.{g}": g for g in flat})
    path_dir = Path(path_dir)
    if not _collective(sh):
        with atomic_dir(path_dir) as tmp:
            _write_index(tmp, sh, mine, replicated, sharded, structure, step, extra, [_write_mine(tmp, sh, mine)])
        return path_dir
    if sh.rank == 0:
        with atomic_dir(path_dir) as tmp:
            box = [str(tmp)]
            dist.broadcast_object_list(box, src=0, group=sh._pg)
            digests = [None] * sh.world
            dist.all_gather_object(digests, _write_mine(tmp, sh, mine), group=sh._pg)
            _write_index(tmp, sh, mine, replicated, sharded, structure, step, extra, digests)
        dist.barrier(group=sh._pg)
    else:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=sh._pg)
        digests = [None] * sh.world
        dist.all_gather_object(digests, _write_mine(Path(box[0]), sh, mine), group=sh._pg)
        dist.barrier(group=sh._pg)
    return path_dir


def _mine(sh: Sharding, t: Tensor, g: str) -> Tensor:
    """This worker's slice of a group vector held whole ([N s]) or already sliced ([s])."""
    t = t.detach()
    return sh._slice(t, g) if t.shape[0] == sh.padded_size(g) and sh.world > 1 else t


def _write_mine(tmp: Path, sh: Sharding, mine: dict[str, Tensor]) -> tuple[str, str]:
    name = shard_file(sh.rank, sh.world)
    write_safetensors({k: v.contiguous().clone() for k, v in mine.items()}, tmp / name, metadata={"format": FORMAT})
    return name, _sha256(tmp / name)


def _write_index(tmp: Path, sh: Sharding, mine, replicated, sharded, structure, step, extra, digests) -> None:
    write_safetensors(
        {k: v.detach().contiguous().clone() for k, v in replicated.items()},
        tmp / REPLICATED,
        metadata={"format": FORMAT},
    )
    files = dict(digests)
    files[REPLICATED] = _sha256(tmp / REPLICATED)
    layout = {
        g: {"size": sh.sizes[g], "shard": sh.shard_sizes[g], "dtype": str(sh.dtypes[g]).removeprefix("torch.")}
        for g in sh.labels
    }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "world": sh.world,
        "level": sh.level,
        "step": step,
        "layout": layout,
        "sharded": sharded,
        "structure": structure,
        "extra": extra,
        "files": files,
    }
    write_json(meta, tmp / INDEX)


def read_index(path_dir: str | os.PathLike) -> dict[str, Any]:
    """The checked ``index.json`` of a sharded checkpoint (format, version, files present)."""
    path_dir = Path(path_dir)
    p = path_dir / INDEX
    if not p.is_file():
        raise CheckpointError(f"{path_dir}: not a sharded checkpoint (no {INDEX})")
    try:
        meta = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an {FORMAT} index")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{p}: format version {meta.get('version')}, this fnlm reads {VERSION}")
    for name in meta["files"]:
        if not (path_dir / name).is_file():
            raise CheckpointError(f"{path_dir}: {name} is missing")
    return meta


def load_sharded(
    path_dir: str | os.PathLike, sharding: Sharding, device: str | torch.device | None = None
) -> tuple[PyTree, PyTree, int, Tensor, dict[str, Any]]:
    """``(held, opt_state, step, key, extra)`` for this worker of ``sharding`` (any number of
    workers and any level), from a checkpoint written by :func:`save_sharded`."""
    from safetensors import safe_open

    import fnlm.optim  # noqa: F401  (its NamedTuple state classes appear in the structure)

    sh = sharding
    path_dir = Path(path_dir)
    meta = read_index(path_dir)
    layout, world = meta["layout"], int(meta["world"])
    for g in sh.labels:
        want = {"size": sh.sizes[g], "dtype": str(sh.dtypes[g]).removeprefix("torch.")}
        if g not in layout or {k: layout[g][k] for k in want} != want:
            raise CheckpointError(
                f"{path_dir}: group {g!r} is {layout.get(g)} in the checkpoint, {want} in this "
                "model (a different model or group function)"
            )
    if set(layout) != set(sh.labels):
        raise CheckpointError(
            f"{path_dir}: the checkpoint has groups {sorted(set(layout) - set(sh.labels))[:4]} that this model lacks"
        )
    names = [shard_file(k, world) for k in range(world)] + [REPLICATED]
    for name in names:  # checksums first: a corrupt or swapped file is refused before it is used
        if _sha256(path_dir / name) != meta["files"].get(name):
            raise CheckpointError(f"{path_dir / name}: checksum mismatch (corrupt or from another checkpoint)")
    dev = str(device or sh.device)
    handles = [safe_open(str(path_dir / shard_file(k, world)), framework="pt", device=dev) for k in range(world)]
    try:

        def assemble(name: str, g: str, whole: bool) -> Tensor:
            n, s_old, s_new = sh.sizes[g], int(layout[g]["shard"]), sh.shard_sizes[g]
            a, b = (0, sh.padded_size(g)) if whole else (sh.rank * s_new, (sh.rank + 1) * s_new)
            parts = []
            for k in range(world):
                lo, hi = max(a, k * s_old), min(b, (k + 1) * s_old, n)
                if lo < hi:
                    parts.append(handles[k].get_slice(name)[lo - k * s_old : hi - k * s_old])
            out = torch.cat(parts) if parts else torch.zeros(0, dtype=sh.dtypes[g], device=dev)
            return torch.nn.functional.pad(out, (0, (b - a) - out.numel())) if out.numel() < b - a else out

        held = _nest({g: assemble(f"params.{g}", g, sh.level != 3) for g in sh.labels})
        with safe_open(str(path_dir / REPLICATED), framework="pt", device=dev) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for name, g in meta["sharded"].items():
            if not name.startswith("params."):
                tensors[name] = assemble(name, g, sh.level == 0)
    finally:
        del handles
    tree = _decode(meta["structure"], tensors, str(path_dir))
    return held, tree["opt_state"], int(meta["step"]), tensors["key"], meta.get("extra", {})


def gather_params(sharding: Sharding, held: PyTree) -> PyTree:
    """The whole parameter tree from a sharded state, e.g. for ``save_gpt2`` on worker 0 (a
    collective at level 3: every worker calls it)."""
    return sharding.unshard(held)
