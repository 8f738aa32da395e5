"""Compiled steps that outlive the process: one ahead-of-time graph per input shape, saved in a
per-machine cache, loaded by the next run; optionally built in the background while eager steps run.

::

    cache = CompileCache(default_cache_dir(), key=repr(config))     # what the graph depends on
    step = make_train_step(loss_fn, optimizer, cache=cache)        # same maths, same call
    step(params, opt_state, batch, key)   # a shape this machine compiled before: loaded in seconds

``torch.compile`` keeps Inductor's kernels between processes, but every new process still traces
the Python function again (dynamo and AOTAutograd) before its first compiled call. Here each input
signature ``s`` (the tree structure, shapes, dtypes and devices of the arguments) is compiled once
with dynamo's ahead-of-time API (``torch.compile(fn).aot_compile``), saved as
``<cache dir>/<sha256(key, s, torch, Python, fnlm's sources)>.pt2``, and later loaded with
``torch.compiler.load_compiled_function``: no tracing at all.

* **What the key must hold.** The saved graph bakes in everything the function closes over
  (hyper-parameters, the model's config, the learning-rate schedule's constants). The file name
  covers the argument signature, the torch and Python versions and fnlm's own source files; the
  caller's ``key`` must cover the rest: the config that built ``fn`` and the source of the script
  that defines it (:func:`source_digest`). A key that misses something runs a stale graph.
  Tensors the function closes over (frozen weights) are pickled into the file and used from it:
  pass them as arguments instead (the main job keeps no cache for ``--freeze``/``--lora-rank``).
* **Trust.** Loading a saved graph unpickles it and loads compiled code: a cache file runs code.
  The cache directory is created private (``0o700``) and is only read when it belongs to this user
  and nobody else may write to it (:class:`UnsafeCacheError` otherwise), as ssh treats its keys;
  never point it at a directory you did not create. A file that fails to load (another torch build,
  a truncated write) is compiled again and replaced, with a warning.
* **Guards.** Dynamo's guards on globals and closures cannot be saved, so the saved graph keeps
  only the portable ones (tensor shapes, dtypes, devices, grad mode, autocast); the key stands in
  for the rest.
* **Background** (``background=True``): a signature that is neither loaded nor compiled runs the
  uncompiled function (same maths: the caller's keys and data order are untouched) while a thread
  compiles it; the first call after the thread finishes uses the graph. The results differ from a
  compiled-only run by float rounding only (Inductor fuses and reorders reductions). Dynamo's
  tracing holds the GIL, so on a machine with few cores the eager steps and the compile slow each
  other; see the benchmarks page before choosing it. :meth:`Precompiled.prepare` queues a
  signature ahead of its first call (evaluation shapes before the first validation),
  :meth:`Precompiled.wait` blocks until the queue is empty.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["CompileCache", "Precompiled", "UnsafeCacheError", "default_cache_dir", "pick_background", "source_digest"]


class UnsafeCacheError(OSError):
    """The compile cache directory is not private to this user: its files would run as code."""


def default_cache_dir() -> Path:
    """``$FNLM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fnlm/compiled`` (``~/.cache/fnlm/compiled``)."""
    if os.environ.get("FNLM_CACHE_DIR"):
        return Path(os.environ["FNLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fnlm" / "compiled"


def source_digest(*paths: str | os.PathLike) -> str:
    """sha256 of the files' bytes (in order): put the scripts that define a step into its cache key."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def _fnlm_sources() -> str:
    """sha256 over every ``fnlm/**/*.py`` (path and bytes): a change to the library's maths is a new graph."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def supported() -> bool:
    """Whether this torch saves and loads compiled functions (``aot_compile`` and
    ``torch.compiler.load_compiled_function``: recent builds, 2.13 among them)."""
    return hasattr(torch.compiler, "load_compiled_function") and hasattr(torch.compiler, "keep_portable_guards_unsafe")


def signature(args: tuple) -> str:
    """The arguments' tree structure with each tensor leaf's shape, dtype, device and requires_grad,
    and each other leaf's repr: two calls with equal signatures can share one static graph."""
    leaves, spec = pytree.tree_flatten(args)
    parts = [str(spec)]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            parts.append(f"T{tuple(x.shape)}{x.dtype}{x.device}{int(x.requires_grad)}")
        else:
            parts.append(f"{type(x).__name__}:{x!r}")
    return "|".join(parts)


def _check_private(directory: Path) -> None:
    st = directory.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UnsafeCacheError(f"compile cache {directory} belongs to another user; its files would run as code")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(
            f"compile cache {directory} is writable by others (mode {oct(st.st_mode & 0o777)}); "
            f"its files would run as code: chmod 700 it or choose another directory"
        )


@dataclass(frozen=True)
class CompileCache:
    """Where compiled steps are kept and what they depend on (see the module docstring).

    ``directory``: a private directory (created ``0o700``; :func:`default_cache_dir`). ``key``:
    everything the compiled function closes over that its arguments do not show (the config, the
    script's :func:`source_digest`). ``background``: compile missing shapes in a thread and run
    the eager function meanwhile."""

    directory: str | os.PathLike
    key: str
    background: bool = False

    def path(self, name: str, sig: str) -> Path:
        """The file of one compiled function and argument signature."""
        h = hashlib.sha256()
        for part in (self.key, name, sig, torch.__version__, sys.version, _fnlm_sources()):
            h.update(part.encode() + b"\0")
        return Path(self.directory) / f"{h.hexdigest()[:40]}.pt2"

    def ready(self) -> Path:
        """The directory, created private if missing, checked private if present."""
        d = Path(self.directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(d)
        return d


class Precompiled:
    """``fn`` with one ahead-of-time compiled graph per argument signature, loaded from or saved to
    ``cache`` (see the module docstring). Call it as ``fn``. ``events`` lists what happened per
    signature: ``('loaded' | 'compiled' | 'failed', seconds, signature)``."""

    def __init__(
        self,
        fn: Callable,
        cache: CompileCache,
        *,
        name: str,
        options: Mapping[str, Any] | None = None,
    ):
        self.fn, self.cache, self.name = fn, cache, name
        self.options = dict(options or {})
        self.events: list[tuple[str, float, str]] = []
        self.eager_calls = 0  # calls that ran ``fn`` uncompiled while their graph was being built
        self._ready: dict[str, Callable] = {}
        self._pending: set[str] = set()

    # -- building one signature -------------------------------------------------------------------
    def _compile(self, args: tuple) -> Any:
        compiled = torch.compile(
            self.fn,
            fullgraph=True,
            dynamic=False,
            options={**self.options, "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe},
        )
        for _ in range(3):
            try:
                return compiled.aot_compile((args, {}))
            except torch._dynamo.exc.TensorifyScalarRestartAnalysis:
                pass  # dynamo specialised the float scalar tensors it met (the lr in the optimizer state)
                # and asks for a restart, which torch.compile does itself and aot_compile leaves to us
        return compiled.aot_compile((args, {}))

    def _build(self, sig: str, args: tuple, grad: bool) -> Callable:
        path = self.cache.path(self.name, sig)
        t = time.perf_counter()
        fn = None
        if path.exists():
            try:
                with open(path, "rb") as f:
                    fn = torch.compiler.load_compiled_function(f)
                kind = "loaded"
            except Exception as e:  # another torch build, a truncated file: compile again
                warnings.warn(f"compile cache {path} could not be loaded ({type(e).__name__}: {e}); compiling again")
        if fn is None:
            with torch.set_grad_enabled(grad):
                try:
                    fn = self._compile(args)
                    kind = "compiled"
                except Exception as e:  # an API still marked experimental: keep the in-process compile
                    warnings.warn(
                        f"ahead-of-time compile of {self.name} failed ({type(e).__name__}: {e}); "
                        "compiling in this process only (nothing cached)"
                    )
                    fn = torch.compile(self.fn, fullgraph=True, dynamic=False, options=self.options)
                    kind = "failed"
            if kind == "compiled":
                try:
                    fn.save_compiled_function(str(path))  # atomic: a temporary file, then os.replace
                except Exception as e:
                    warnings.warn(f"compile cache {path} not written ({type(e).__name__}: {e})")
        self.events.append((kind, time.perf_counter() - t, sig))
        return fn

    # -- dispatch -----------------------------------------------------------------------------------
    def __call__(self, *args):
        sig = signature(args)
        if sig not in self._ready:
            self.prepare(*args)  # loads or compiles now, or queues the signature for the background
        fn = self._ready.get(sig)
        if fn is None:  # compiling in the background: this call runs the function eagerly
            self.eager_calls += 1
            return self.fn(*args)
        return fn(*args)

    def prepare(self, *args) -> None:
        """Have the graph for these arguments' signature ready before its first call: a cached file is
        loaded now; otherwise it is compiled now, or queued for the background thread."""
        sig = signature(args)
        if sig in self._ready or sig in self._pending:
            return
        self.cache.ready()
        if self.cache.background and not self.cache.path(self.name, sig).exists():
            self._pending.add(sig)
            _WORKER.submit(self, sig, args, torch.is_grad_enabled())
            return
        self._ready[sig] = self._build(sig, args, torch.is_grad_enabled())

    def _finish(self, sig: str, fn: Callable) -> None:
        self._ready[sig] = fn
        self._pending.discard(sig)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every signature queued for the background is compiled; ``False`` if
        ``timeout`` passed first."""
        return _WORKER.wait(timeout)

    @property
    def pending(self) -> int:
        """Signatures still compiling in the background."""
        return len(self._pending)


class _Worker:
    """One background thread for every :class:`Precompiled`: signatures compile one at a time, in the
    order they were queued (a training step's shapes before the evaluation's). At interpreter exit
    the queue is finished first (a thread stopped inside the compiler would abort the process), and
    the graphs are saved for the next run."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queue: list[tuple[Precompiled, str, tuple, bool]] = []
        self.thread: threading.Thread | None = None
        self.idle = threading.Event()
        self.idle.set()
        atexit.register(self.wait)

    def submit(self, owner: Precompiled, sig: str, args: tuple, grad: bool) -> None:
        with self.lock:
            self.queue.append((owner, sig, args, grad))
            self.idle.clear()
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.run, name="fnlm-compile", daemon=True)
                self.thread.start()

    def run(self) -> None:
        while True:
            with self.lock:
                if not self.queue:
                    self.idle.set()
                    return
                owner, sig, args, grad = self.queue.pop(0)
            try:
                fn = owner._build(sig, args, grad)
            except Exception as e:  # keep running eagerly for this signature
                warnings.warn(f"background compile of {owner.name} failed ({type(e).__name__}: {e}); running eagerly")
                fn = owner.fn
            owner._finish(sig, fn)

    def wait(self, timeout: float | None = None) -> bool:
        return self.idle.wait(timeout)


_WORKER = _Worker()


def pick_background(mode: str, device: torch.device) -> tuple[bool, str]:
    """``(background, why)`` for ``mode`` in ``'auto' | 'ahead' | 'background'``.

    ``auto``: background on a GPU (the eager steps run there while a CPU core compiles) or a machine
    with 8 or more CPU cores; ahead of each shape's first step on fewer cores, where the thread's
    tracing and the eager steps share the cores and slow each other (docs/benchmarks.md)."""
    if mode not in ("auto", "ahead", "background"):
        raise ValueError(f"compile mode must be auto, ahead or background, got {mode!r}")
    if mode != "auto":
        return mode == "background", f"asked for {mode}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cuda":
        return True, "a GPU: eager steps run on it while the CPU compiles"
    if cores >= 8:
        return True, f"{cores} CPU cores: eager steps while a thread compiles"
    return False, f"{cores} CPU cores: a compile beside the eager steps would slow both"
