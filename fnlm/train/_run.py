"""A training run that survives interruption: rolling, checksummed train-state checkpoints in a run
directory, resumed only under the same configuration, and a graceful stop on SIGINT/SIGTERM.

A run directory holds::

    run_dir/checkpoints/
      step-00000200/        fnlm.train.save_train_state's files + checksums.json (sha256 of each)
      step-00000400/        ... the last ``keep`` of them (oldest deleted after a newer one is complete)
      best-step-00000300/   params.safetensors + checksums.json: the best parameters so far, if the
                            caller tracks them; kept while a kept checkpoint refers to them

Every checkpoint directory is built under a temporary name and renamed into place
(:func:`fnlm.io.atomic_dir`), so a killed process leaves complete checkpoints or none. The checksums
catch what the rename cannot: a file truncated or corrupted afterwards (disk full, a copy cut short,
bit rot). :meth:`RunCheckpoints.restore` takes the newest checkpoint that passes them, warns about each
one it skips, and refuses (one line, nothing written or deleted) when none does, or when the run was
started with a different configuration (naming the first setting that differs).

The caller's loop stays a pure function of ``(params, opt_state, step, key)`` plus the data position it
stores in ``extra``; resuming is then exact (see :mod:`fnlm.train._checkpoint`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fnlm.io._safetensors import CheckpointError, atomic_dir, read_safetensors, write_json, write_safetensors
from fnlm.train._checkpoint import META, load_train_state, save_train_state
from fnlm.tree import Params, PyTree, flatten_names, unflatten_names

CHECKSUMS = "checksums.json"
PARAMS = "params.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_BEST_DIR = re.compile(r"^best-step-(\d{8,})$")


class ResumeError(CheckpointError):
    """A run cannot be resumed: no usable checkpoint, or a different configuration (one line)."""


class RunState(NamedTuple):
    """What :meth:`RunCheckpoints.restore` gives back: the train state, the caller's ``extra`` and
    the best parameters saved with it (``None`` if the caller saved none)."""
    params: Params
    opt_state: PyTree
    step: int
    key: Tensor
    extra: dict[str, Any]
    best_params: Params | None
    path: Path


def digest(tree: Any) -> str:
    """``'sha256:<hex>'`` of a pytree of tensors and JSON values (names, dtypes, shapes and bytes), e.g.
    to record which weights or data a run used."""
    h = hashlib.sha256()
    for name, leaf in sorted(flatten_names(tree).items()):
        h.update(name.encode() + b"\0")
        if isinstance(leaf, Tensor):
            t = leaf.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(leaf, sort_keys=True).encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _seal(tmp: Path) -> None:
    """Write ``checksums.json`` (sha256 of every other file) into the directory being built."""
    sums = {p.name: _file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    write_json({"sha256": sums}, tmp / CHECKSUMS)


def _verify(path: Path) -> None:
    """Raise :class:`CheckpointError` unless every file listed in ``checksums.json`` is intact."""
    try:
        sums = json.loads((path / CHECKSUMS).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no readable {CHECKSUMS} ({type(e).__name__}), so not a complete checkpoint") \
            from None
    for name, want in sums.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if _file_sha256(f) != want:
            raise CheckpointError(f"{f}: checksum mismatch (truncated or corrupted)")


def _differs(saved: Any, now: Any) -> str | None:
    """The first top-level key whose value differs between two configuration dicts, or None."""
    for k in list(now) + [k for k in saved if k not in now]:
        if k not in saved or k not in now or saved[k] != now[k]:
            return k
    return None


class RunCheckpoints:
    """Rolling checkpoints of one training run under ``run_dir/checkpoints``.

    ``config`` (a JSON dict of every setting the run's results depend on: hyper-parameters, data and
    weights digests, ...) is stored in each checkpoint and must be equal on :meth:`restore`.
    ``keep``: how many of the newest checkpoints to keep (>= 1).
    """

    def __init__(self, run_dir: str | os.PathLike, config: dict[str, Any], *, keep: int = 2):
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        try:
            self.config = json.loads(json.dumps(config))  # the JSON round trip: what a checkpoint will hold
        except (TypeError, ValueError) as e:
            raise TypeError(f"config must be JSON-serialisable: {e}") from None
        self.run_dir, self.keep = Path(run_dir), keep
        self.dir = self.run_dir / "checkpoints"
        self.seconds: list[float] = []  # wall time of each save (checkpoint + best params, checksums included)

    # ------------------------------------------------------------------ listing
    def _dirs(self, pattern: re.Pattern) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := pattern.match(p.name)) and p.is_dir()]
        return sorted(found)

    def checkpoints(self) -> list[Path]:
        """The checkpoint directories, oldest first (complete or not: :meth:`restore` checks them)."""
        return [p for _, p in self._dirs(_STEP_DIR)]

    @staticmethod
    def peek(run_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(config, extra)`` of the newest checkpoint of ``run_dir`` whose metadata reads, or None if
        there is none: what a command line resuming it needs first (no tensors are read or verified
        here; :meth:`restore` does that)."""
        for _, p in reversed(RunCheckpoints(run_dir, {})._dirs(_STEP_DIR)):
            try:
                extra = json.loads((p / META).read_text())["extra"]
                run = extra.pop("run")
                return run["config"], extra
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return None

    @staticmethod
    def saved_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
        """The ``config`` half of :meth:`peek` (None if there is no checkpoint)."""
        peeked = RunCheckpoints.peek(run_dir)
        return None if peeked is None else peeked[0]

    # ------------------------------------------------------------------ saving
    def save(self, params: Params, opt_state: PyTree, step: int, key: Tensor, extra: dict[str, Any] | None = None,
             *, best: tuple[int, Params] | None = None) -> Path:
        """Write checkpoint ``step-<step>`` atomically, then delete checkpoints beyond the newest ``keep``.

        ``extra``: small JSON state of the caller (data position, logged metrics). ``best``:
        ``(step, params)`` of the best parameters so far; written once per distinct step and restored
        with the checkpoints that refer to it.
        """
        t0 = time.perf_counter()
        extra = dict(extra or {})
        if "run" in extra:
            raise ValueError("extra['run'] is reserved for the run's configuration")
        run = {"config": self.config}
        if best is not None:
            best_step, best_params = best
            run["best_step"] = int(best_step)
            best_dir = self.dir / f"best-step-{int(best_step):08d}"
            if not best_dir.is_dir():
                with atomic_dir(best_dir) as tmp:
                    write_safetensors(flatten_names(best_params), tmp / PARAMS)
                    _seal(tmp)
        path = self.dir / f"step-{int(step):08d}"
        with atomic_dir(path) as tmp:
            save_train_state(tmp, params, opt_state, step, key, extra | {"run": run})  # fills the empty tmp
            _seal(tmp)
        self._prune()
        self.seconds.append(time.perf_counter() - t0)
        return path

    def _best_step_of(self, path: Path) -> int | None:
        try:
            return json.loads((path / META).read_text())["extra"]["run"].get("best_step")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _prune(self) -> None:
        ckpts = self._dirs(_STEP_DIR)
        for _, p in ckpts[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)
        kept = [p for _, p in ckpts[-self.keep:]]
        wanted = {self._best_step_of(p) for p in kept}
        for s, p in self._dirs(_BEST_DIR):
            if s not in wanted:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.iterdir():  # temporaries (.tmp, .old) of saves that a killed process left behind
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ resuming
    def restore(self, device: str | torch.device = "cpu") -> RunState | None:
        """The newest intact checkpoint (``None`` if the run has none). Skipped (corrupted) checkpoints
        give a warning; a different configuration or no intact checkpoint raises :class:`ResumeError`."""
        ckpts = self._dirs(_STEP_DIR)
        if not ckpts:
            return None
        problems = []
        for _, path in reversed(ckpts):
            try:
                _verify(path)
                params, opt_state, step, key, extra = load_train_state(path, device=device)
                run = extra.pop("run")
                best_params = None
                if run.get("best_step") is not None:
                    best_dir = self.dir / f"best-step-{int(run['best_step']):08d}"
                    _verify(best_dir)
                    best_params = unflatten_names(read_safetensors(best_dir / PARAMS, device=str(device))[0])
            except (CheckpointError, KeyError, TypeError, AttributeError) as e:
                msg = str(e) if isinstance(e, CheckpointError) else f"{path}: malformed ({type(e).__name__}: {e})"
                problems.append(msg)
                warnings.warn(f"skipping checkpoint {path.name}: {msg}", RuntimeWarning, stacklevel=2)
                continue
            name = _differs(run["config"], self.config)
            if name is not None:
                was, now = run["config"].get(name, "<unset>"), self.config.get(name, "<unset>")
                raise ResumeError(f"cannot resume {self.run_dir}: {name} differs from the run's "
                                  f"({_short(was)} in the run, {_short(now)} now); use the run's settings or start a new run")
            return RunState(params, opt_state, step, key, extra, best_params, path)
        raise ResumeError(f"cannot resume {self.run_dir}: none of its {len(ckpts)} checkpoint(s) is intact "
                          f"(newest: {problems[0]})")


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


class GracefulStop:
    """``with GracefulStop() as stop: ... if stop.requested: save and exit``.

    The first SIGINT (Ctrl-C) or SIGTERM only sets ``stop.requested`` (the signal's name), so the
    loop finishes its step and checkpoints; a second SIGINT raises :class:`KeyboardInterrupt` at
    once. The previous handlers are restored on exit. Main thread only (Python's signal rule).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals, self.requested, self._old = signals, None, {}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step, then writing a checkpoint (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
