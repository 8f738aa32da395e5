"""A training run that survives interruption: rolling, checksummed train-state checkpoints in a run
directory, owned by one writer, resumed only under the same configuration, and a graceful stop on
SIGINT/SIGTERM.

A run directory holds::

    run_dir/run.json              the run's id (a uuid written when the run starts)
    run_dir/run.lock              the pid of the process writing the run (while it runs)
    run_dir/checkpoints/
      step-00000200/        fnlm.train.save_train_state's files + checksums.json (sha256 of each, run id)
      step-00000400/        ... the newest ``keep`` intact ones of this run
      best-step-00000300/   params.safetensors + checksums.json: the best parameters so far, if the
                            caller tracks them; kept while a kept checkpoint refers to them

:meth:`RunCheckpoints.start` takes the run's lock (a second process gets :class:`RunInUseError`
naming the owner's pid; the lock of a process that died is taken over) and reads or writes the run
id. Every checkpoint records the run id, and a checkpoint that refers to best parameters records
their file's sha256, so a folder copied in from another run is never restored, nor pruned: it is
ignored with a warning.

Every checkpoint directory is built under a temporary name, flushed to disk and renamed into place
(:func:`fnlm.io.atomic_dir`), so a killed process leaves complete checkpoints or none. The checksums
catch what the rename cannot: a file truncated or corrupted afterwards (disk full, a copy cut short,
bit rot). :meth:`RunCheckpoints.restore` takes the newest checkpoint of this run that passes them,
warns about each one it skips, and refuses (one line, nothing written or deleted) when none does, or
when the run was started with a different configuration (naming the first setting that differs).
Damaged best parameters cost only those: the last step's parameters stand in for them, with a
warning. Pruning keeps the newest ``keep`` *intact* checkpoints of the run and deletes nothing before
the new checkpoint is complete on disk, so the checkpoint a run resumed from survives until a newer
one does.

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
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fnlm.io._safetensors import (
    CheckpointError,
    atomic_dir,
    read_safetensors,
    recover_dir,
    write_json,
    write_safetensors,
)
from fnlm.train._checkpoint import META, load_train_state, save_train_state
from fnlm.tree import Params, PyTree, flatten_names, unflatten_names

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

CHECKSUMS = "checksums.json"
PARAMS = "params.safetensors"
RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_BEST_DIR = re.compile(r"^best-step-(\d{8,})$")


class ResumeError(CheckpointError):
    """A run cannot be resumed: no usable checkpoint, or a different configuration (one line)."""


class RunInUseError(OSError):
    """Another live process writes this run directory (one line naming its pid)."""


class RunState(NamedTuple):
    """What :meth:`RunCheckpoints.restore` gives back: the train state, the caller's ``extra``, the best
    parameters saved with it (``None`` if the caller saved none; the restored ``params`` if the best
    ones were damaged or not this run's), the step of those best parameters, and the checkpoint's path."""

    params: Params
    opt_state: PyTree
    step: int
    key: Tensor
    extra: dict[str, Any]
    best_params: Params | None
    path: Path
    best_step: int | None = None


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


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (directories: where the OS allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _seal(tmp: Path, run_id: str, **info: Any) -> dict[str, str]:
    """Write ``checksums.json`` (sha256 of every other file, the run id, ``info``) into the directory
    being built, flushed to disk with its files; returns the sums."""
    files = [p for p in sorted(tmp.iterdir()) if p.is_file() and p.name != CHECKSUMS]
    sums = {p.name: _file_sha256(p) for p in files}
    write_json({"sha256": sums, "run_id": run_id} | info, tmp / CHECKSUMS)
    for p in files + [tmp / CHECKSUMS, tmp]:
        _fsync(p)
    return sums


def _read_sums(path: Path) -> dict[str, Any]:
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
        if not isinstance(sums, dict) or not isinstance(sums.get("sha256"), dict):
            raise TypeError("no sha256 table")
        return sums
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{path}: no readable {CHECKSUMS} ({type(e).__name__}), so not a complete checkpoint"
        ) from None


def _verify(path: Path) -> dict[str, Any]:
    """``checksums.json`` of ``path``; raise :class:`CheckpointError` unless every file it lists is intact."""
    sums = _read_sums(path)
    for name, want in sums["sha256"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if _file_sha256(f) != want:
            raise CheckpointError(f"{f}: checksum mismatch (truncated or corrupted)")
    return sums


def _differs(saved: Any, now: Any) -> str | None:
    """The first top-level key whose value differs between two configuration dicts, or None."""
    for k in list(now) + [k for k in saved if k not in now]:
        if k not in saved or k not in now or saved[k] != now[k]:
            return k
    return None


def _owner_of(path: Path) -> str | None:
    """The run id a checkpoint or best-parameters folder records (``checksums.json``, else the train
    state's metadata), or None if neither says."""
    try:
        rid = json.loads((path / CHECKSUMS).read_text()).get("run_id")
        if isinstance(rid, str):
            return rid
    except (OSError, ValueError, AttributeError):
        pass
    try:
        rid = json.loads((path / META).read_text())["extra"]["run"]["run_id"]
        return rid if isinstance(rid, str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_run_id(run_dir: str | os.PathLike) -> str | None:
    """The run id in ``run_dir/run.json`` (None if there is no such file); an unreadable one is a
    one-line :class:`~fnlm.io.CheckpointError` (its checkpoints could not be matched to it)."""
    path = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: unreadable ({type(e).__name__}); it holds the run id its checkpoints must match"
        ) from None
    rid = data.get("run_id") if isinstance(data, dict) else None
    if not isinstance(rid, str) or not rid:
        raise CheckpointError(f"{path}: no run_id in it; it holds the run id its checkpoints must match")
    return rid


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"process {int(info['pid'])} on {info.get('host', '?')}"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another process (pid not yet written)"


def _lock(run_dir: Path) -> int:
    """Take ``run_dir/run.lock`` (an advisory lock held while the descriptor is open, so a process
    that dies releases it) and write this process's pid into it; the descriptor."""
    path = run_dir / LOCK_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:  # Windows: lock the first byte
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            who = _holder(fd)
            os.close(fd)
            raise RunInUseError(
                f"{run_dir} is in use by {who} (lock: {path}); wait for it to finish or stop it, "
                "one process writes a run"
            ) from None
        try:  # the file we locked may have been released and removed meanwhile: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n", 0)
        os.fsync(fd)
        return fd
    raise RunInUseError(f"{run_dir}: could not take {path} (it keeps being replaced)")


class RunCheckpoints:
    """Rolling checkpoints of one training run under ``run_dir/checkpoints``.

    ``config`` (a JSON dict of every setting the run's results depend on: hyper-parameters, data and
    weights digests, ...) is stored in each checkpoint and must be equal on :meth:`restore`.
    ``keep``: how many of the newest intact checkpoints to keep (>= 1).

    Call :meth:`start` before writing (``with RunCheckpoints(...).start() as ckpts:``, or
    :meth:`close` at the end); :meth:`save` starts a run that was not started.
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
        self.run_id: str | None = None
        self._fd: int | None = None
        self._verdicts: dict[str, tuple[tuple, str | None]] = {}  # name -> (identity, None if intact else why)
        self._warned: set[str] = set()
        self._best: tuple[int, str] | None = None  # (step, sha256 of params.safetensors) known intact
        self._resumed_from: Path | None = None
        self._latest: Path | None = None

    # ------------------------------------------------------------------ owning the run
    def start(self) -> "RunCheckpoints":
        """Take the run's lock (:class:`RunInUseError` if a live process holds it; a dead one's is taken
        over), read the run id from ``run.json`` or write a new one, and put back a checkpoint that a
        killed save left under its ``.old`` name. Returns ``self``; idempotent."""
        if self._fd is not None:
            return self
        self._fd = _lock(self.run_dir)
        try:
            rid = read_run_id(self.run_dir)
            if rid is None:
                rid = uuid.uuid4().hex
                write_json(
                    {"format": "fnlm.run", "run_id": rid, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                    self.run_dir / RUN_FILE,
                )
                _fsync(self.run_dir)
            self.run_id = rid
            if self.dir.is_dir():
                for p in self.dir.iterdir():
                    if p.name.startswith(".") and p.name.endswith(".old"):
                        recover_dir(self.dir / p.name[1 : -len(".old")])
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release the run's lock (the run id stays). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.fstat(fd).st_ino == os.stat(self.run_dir / LOCK_FILE).st_ino:
                os.unlink(self.run_dir / LOCK_FILE)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "RunCheckpoints":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @staticmethod
    def in_use(run_dir: str | os.PathLike) -> str | None:
        """Who holds ``run_dir``'s lock (``'process <pid> on <host>'``), or None if no live process does."""
        path = Path(run_dir) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            if fcntl is None:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return _holder(fd)
            return None
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ listing
    def _dirs(self, pattern: re.Pattern) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := pattern.match(p.name)) and p.is_dir()]
        return sorted(found)

    def checkpoints(self) -> list[Path]:
        """The checkpoint directories, oldest first (any run's, complete or not: :meth:`restore` checks them)."""
        return [p for _, p in self._dirs(_STEP_DIR)]

    def latest(self) -> Path | None:
        """The newest checkpoint this object wrote or restored (complete and verified), or None."""
        return self._latest

    def _mine(self, pattern: re.Pattern, run_id: str | None) -> list[tuple[int, Path]]:
        """This run's folders of ``pattern``, oldest first; a warning (once) for each other one."""
        mine = []
        for s, p in self._dirs(pattern):
            owner = _owner_of(p)
            if owner is not None and owner == run_id:
                mine.append((s, p))
            elif p.name not in self._warned:
                self._warned.add(p.name)
                why = (
                    "records no readable run id"
                    if owner is None
                    else f"belongs to run {owner}, this run is {run_id or '<none: no ' + RUN_FILE + '>'}"
                )
                warnings.warn(f"ignoring {p} (never restored nor deleted): it {why}", RuntimeWarning, stacklevel=3)
        return mine

    @staticmethod
    def peek(run_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(config, extra)`` of the newest checkpoint of the run in ``run_dir`` whose metadata reads,
        or None if there is none: what a command line resuming it needs first (no tensors are read or
        verified here; :meth:`restore` does that)."""
        try:
            rid = read_run_id(run_dir)
        except CheckpointError:
            rid = None
        for _, p in reversed(RunCheckpoints(run_dir, {})._dirs(_STEP_DIR)):
            try:
                extra = json.loads((p / META).read_text())["extra"]
                run = extra.pop("run")
                if rid is not None and run.get("run_id") != rid:
                    continue
                return run["config"], extra
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return None

    @staticmethod
    def saved_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
        """The ``config`` half of :meth:`peek` (None if there is no checkpoint)."""
        peeked = RunCheckpoints.peek(run_dir)
        return None if peeked is None else peeked[0]

    # ------------------------------------------------------------------ verification (cached per folder)
    @staticmethod
    def _identity(path: Path) -> tuple:
        """The folder's inode and each file's name, inode, size and modification time."""
        files = tuple(
            sorted(
                (p.name, st.st_ino, st.st_size, st.st_mtime_ns) for p in path.iterdir() if (st := p.stat()) is not None
            )
        )
        return path.stat().st_ino, files

    def _problem(self, path: Path, fresh: bool = False) -> str | None:
        """None if ``path`` is intact (its checksums hold), else why not. Unless ``fresh``, a verdict
        is reused while no file of the folder changed (pruning needs it at every save)."""
        try:
            ident = self._identity(path)
        except OSError:
            ident = None
        cached = self._verdicts.get(path.name)
        if not fresh and ident is not None and cached is not None and cached[0] == ident:
            return cached[1]
        try:
            _verify(path)
            why = None
        except CheckpointError as e:
            why = str(e)
        if ident is not None:
            self._verdicts[path.name] = (ident, why)
        return why

    # ------------------------------------------------------------------ saving
    def save(
        self,
        params: Params,
        opt_state: PyTree,
        step: int,
        key: Tensor,
        extra: dict[str, Any] | None = None,
        *,
        best: tuple[int, Params] | None = None,
    ) -> Path:
        """Write checkpoint ``step-<step>`` atomically and to disk, then prune to the newest ``keep``
        intact checkpoints of this run (see the module docstring).

        ``extra``: small JSON state of the caller (data position, logged metrics). ``best``:
        ``(step, params)`` of the best parameters so far; written when their step changes and restored
        with the checkpoints that refer to it.
        """
        self.start()
        t0 = time.perf_counter()
        extra = dict(extra or {})
        if "run" in extra:
            raise ValueError("extra['run'] is reserved for the run's configuration")
        run: dict[str, Any] = {"run_id": self.run_id, "config": self.config}
        if best is not None:
            best_step, best_params = int(best[0]), best[1]
            if self._best is None or self._best[0] != best_step:
                best_dir = self.dir / f"best-step-{best_step:08d}"
                with atomic_dir(best_dir) as tmp:
                    write_safetensors(flatten_names(best_params), tmp / PARAMS)
                    sums = _seal(tmp, self.run_id, step=best_step)
                _fsync(self.dir)
                self._best = (best_step, sums[PARAMS])
            run["best_step"], run["best_sha256"] = self._best
        path = self.dir / f"step-{int(step):08d}"
        with atomic_dir(path) as tmp:
            save_train_state(tmp, params, opt_state, step, key, extra | {"run": run})  # fills the empty tmp
            sums = _seal(tmp, self.run_id, step=int(step))
        _fsync(self.dir)
        # complete on disk: the sums just computed from the files read back, under the final name
        if _read_sums(path)["sha256"] != sums or any(not (path / n).is_file() for n in sums):
            raise CheckpointError(f"{path}: not what was just written (another process in this run directory?)")
        self._verdicts[path.name] = (self._identity(path), None)
        self._latest = path
        self._prune(path)
        self.seconds.append(time.perf_counter() - t0)
        return path

    def _best_step_of(self, path: Path) -> int | None:
        try:
            return json.loads((path / META).read_text())["extra"]["run"].get("best_step")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _prune(self, saved: Path) -> None:
        """From the newest down, keep this run's checkpoints until ``keep`` intact ones (``saved``
        first among them) are kept, damaged ones met on the way included; delete this run's older
        ones, the best parameters no kept checkpoint refers to, and temporaries of killed saves.
        Other runs' folders are left alone."""
        mine = self._mine(_STEP_DIR, self.run_id)
        kept, intact = [saved], 1
        for _, p in reversed(mine):
            if intact >= self.keep:
                break
            if p != saved:
                kept.append(p)
                intact += self._problem(p) is None
        for _, p in mine:
            if p not in kept:
                shutil.rmtree(p, ignore_errors=True)
                self._verdicts.pop(p.name, None)
        if self._resumed_from is not None and self._resumed_from not in kept:
            self._resumed_from = None  # replaced by the newer, verified ``saved``
        wanted = {self._best_step_of(p) for p in kept}
        for s, p in self._mine(_BEST_DIR, self.run_id):
            if s not in wanted:
                shutil.rmtree(p, ignore_errors=True)
                if self._best is not None and self._best[0] == s:
                    self._best = None
        for p in self.dir.iterdir():  # temporaries (.tmp, .old) of saves that a killed process left behind
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ resuming
    def restore(self, device: str | torch.device = "cpu") -> RunState | None:
        """The newest intact checkpoint of this run (``None`` if the run directory has no checkpoint).
        Skipped (corrupted) checkpoints and other runs' folders give a warning; a different
        configuration or no intact checkpoint of this run raises :class:`ResumeError`. Damaged best
        parameters give a warning and the restored step's parameters in their place."""
        run_id = self.run_id if self.run_id is not None else read_run_id(self.run_dir)
        if not self._dirs(_STEP_DIR):
            return None
        ckpts = self._mine(_STEP_DIR, run_id)
        if not ckpts:
            raise ResumeError(
                f"cannot resume {self.run_dir}: none of its checkpoints belongs to this run "
                f"({'run id ' + run_id + ' in ' + RUN_FILE if run_id else 'no ' + RUN_FILE}); they were "
                "copied in from other runs or written before fnlm recorded run ids"
            )
        problems = []
        for _, path in reversed(ckpts):
            try:
                why = self._problem(path, fresh=True)
                if why is not None:
                    raise CheckpointError(why)
                params, opt_state, step, key, extra = load_train_state(path, device=device)
                run = extra.pop("run")
                config = run["config"]
            except (CheckpointError, KeyError, TypeError, AttributeError) as e:
                msg = str(e) if isinstance(e, CheckpointError) else f"{path}: malformed ({type(e).__name__}: {e})"
                problems.append(msg)
                warnings.warn(f"skipping checkpoint {path.name}: {msg}", RuntimeWarning, stacklevel=2)
                continue
            name = _differs(config, self.config)
            if name is not None:
                was, now = config.get(name, "<unset>"), self.config.get(name, "<unset>")
                raise ResumeError(
                    f"cannot resume {self.run_dir}: {name} differs from the run's "
                    f"({_short(was)} in the run, {_short(now)} now); use the run's settings or start a new run"
                )
            best_params, best_step = None, None
            if run.get("best_step") is not None:
                best_step = int(run["best_step"])
                best_params = self._load_best(best_step, run.get("best_sha256"), run_id, device)
                if best_params is None:
                    best_params, best_step = params, step
            self._resumed_from = self._latest = path
            return RunState(params, opt_state, step, key, extra, best_params, path, best_step)
        raise ResumeError(
            f"cannot resume {self.run_dir}: none of its {len(ckpts)} checkpoint(s) is intact (newest: {problems[0]})"
        )

    def _load_best(self, step: int, sha: str | None, run_id: str | None, device) -> Params | None:
        """The best parameters of ``step`` if intact, this run's and the ones the checkpoint recorded;
        else a warning and None."""
        best_dir = self.dir / f"best-step-{step:08d}"
        try:
            sums = _verify(best_dir)
            if sums.get("run_id") != run_id:
                raise CheckpointError(f"{best_dir}: belongs to run {sums.get('run_id')}, not this one ({run_id})")
            if sha is None or sums["sha256"].get(PARAMS) != sha:
                raise CheckpointError(f"{best_dir / PARAMS}: not the file the checkpoint recorded (sha256 differs)")
            params = unflatten_names(read_safetensors(best_dir / PARAMS, device=str(device))[0])
        except CheckpointError as e:
            warnings.warn(
                f"best parameters of step {step} unusable ({e}); falling back to the last step's",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        self._best = (step, sha)
        return params


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
        print(
            f"\n{self.requested}: finishing this step, then writing a checkpoint (Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> "GracefulStop":
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
