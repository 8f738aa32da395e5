"""``train_state.json`` checked whole before anything is rebuilt from it: one line naming the file.

:func:`validate_train_state` reads the JSON (bounded size, bounded nesting) and walks its
``structure`` without recursion, so a damaged or hostile file (a list where a dict belongs, a
``step`` that is not an integer, nesting deep enough to overflow Python's stack, a structure
without ``params``) is a :class:`~fnlm.io.CheckpointError` naming the file and the entry, never
a ``KeyError``/``RecursionError`` from inside the loader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fnlm.io._safetensors import CheckpointError
from fnlm.train._checkpoint import FORMAT, META, VERSION

MAX_META_BYTES = 64 << 20  # the structure of a very large model is a few MB
MAX_DEPTH = 256


def validate_train_state(path_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``train_state.json`` of ``path_dir`` if it is well formed, else a one-line
    :class:`~fnlm.io.CheckpointError` naming the file and what is wrong."""
    f = Path(path_dir) / META
    if not f.is_file():
        raise CheckpointError(f"{path_dir}: not a training-state checkpoint (no {META})")
    size = f.stat().st_size
    if size > MAX_META_BYTES:
        raise CheckpointError(f"{f}: {size:,} bytes, more than a training state's structure takes ({MAX_META_BYTES:,})")
    try:
        meta = json.loads(f.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise CheckpointError(f"{f}: JSON nested too deeply") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not an {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{f}: format version {meta.get('version')!r}, this fnlm reads {VERSION}")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{f}: 'step' must be an integer >= 0, got {step!r}")
    if not isinstance(meta.get("extra", {}), dict):
        raise CheckpointError(f"{f}: 'extra' must be an object, got {type(meta['extra']).__name__}")
    root = meta.get("structure")
    if not (isinstance(root, dict) and isinstance(root.get("dict"), list)):
        raise CheckpointError(f"{f}: 'structure' must describe a dict (params, opt_state, key)")
    keys = {kv[0] for kv in root["dict"] if isinstance(kv, list) and len(kv) == 2}
    if not {"params", "opt_state", "key"} <= keys:
        raise CheckpointError(f"{f}: 'structure' lacks {sorted({'params', 'opt_state', 'key'} - keys)}")
    stack = [(root, "structure", 0)]
    while stack:
        desc, at, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{f}: {at}: nested more than {MAX_DEPTH} levels")
        if not isinstance(desc, dict) or len(desc) not in (1, 2):
            raise CheckpointError(f"{f}: {at}: malformed structure entry {str(desc)[:80]}")
        if "tensor" in desc:
            if not isinstance(desc["tensor"], str):
                raise CheckpointError(f"{f}: {at}: a tensor entry must name a tensor, got {desc['tensor']!r:.80}")
        elif "value" in desc:
            if not isinstance(desc["value"], (bool, int, float, str, type(None))):
                raise CheckpointError(f"{f}: {at}: a value entry must be a JSON scalar")
        elif "dict" in desc or "fields" in desc:
            pairs = desc.get("dict", desc.get("fields"))
            if "fields" in desc and not isinstance(desc.get("namedtuple"), str):
                raise CheckpointError(f"{f}: {at}: a NamedTuple entry needs a 'namedtuple' class name")
            if not isinstance(pairs, list) or not all(
                isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str) for kv in pairs
            ):
                raise CheckpointError(f"{f}: {at}: must be a list of [name, entry] pairs")
            stack += [(v, f"{at}.{k}", depth + 1) for k, v in pairs]
        elif "list" in desc or "tuple" in desc:
            items = desc.get("list", desc.get("tuple"))
            if not isinstance(items, list):
                raise CheckpointError(f"{f}: {at}: must be a list of entries")
            stack += [(v, f"{at}[{i}]", depth + 1) for i, v in enumerate(items)]
        else:
            raise CheckpointError(f"{f}: {at}: unknown structure entry {str(desc)[:80]}")
    return meta
