"""A training run's directory from start to finish: the one protocol every training script uses.

::

    cfg, explicit = parse_config(Config, argv)          # fnlm.config
    run = Run.open(cfg, explicit, out=cfg.out, resume=cfg.resume, overwrite=cfg.overwrite,
                   name="imdb-%Y%m%d-%H%M%S", may_change=(...), per_session=(...))
    cfg = run.config                                    # on --resume: the run's own settings
    ...                                                  # load the model and the data
    ckpts = run.checkpoints(fingerprint, keep=2)         # fnlm.train.RunCheckpoints in run.dir, started:
                                                         # this process holds run.lock until close/finish
    state = run.restore(ckpts)                           # None for a new run
    with run.stop_guard() as stop:                       # SIGINT/SIGTERM: finish the step, checkpoint
        ... run.log({"step": s, "loss": l}) ...          # metrics.jsonl (+ TensorBoard)
        if stop.requested: return run.stopped(step)     # one line with the command that resumes
    with run.finish() as out:                            # the finished directory, written atomically
        ... write the model and the metrics into out ...

The layout: while unfinished, the run lives in ``.<name>.partial`` beside its final name, holding
``run_config.json`` (the resolved config, written when the run starts), ``metrics.jsonl`` (one JSON
line per logging step and evaluation, flushed as it goes), ``checkpoints/`` and, with TensorBoard,
``tensorboard/``. :meth:`Run.finish` builds the finished directory under its own name atomically
(:func:`fnlm.io.atomic_dir`) with those files, the newest checkpoint (so that a finished run can be
extended with a larger ``--epochs``/``--steps``) and ``environment.json``, then removes the partial one.

Resuming (``--resume DIR``, DIR either name): the stored config is the run's; a flag given
explicitly on the resuming command line must agree with it, except ``may_change`` settings (how the
run checkpoints and reports: taken from the command line) and ``per_session`` ones (how this process
runs: device, compilation; never stored as the run's). Extending (``epochs``/``steps`` in
``may_change``) may only raise the value: the run continues from its last checkpoint (of a finished
run too) towards the new total, and a learning-rate schedule defined by the total is re-planned over
the new total from that step on (the steps already taken keep the rates they had).

A start that fails leaves nothing that blocks the same command: a partial directory without a
checkpoint holds nothing to resume and is replaced by the next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from fnlm.config import ConfigError, config_from_dict, config_to_dict, flag
from fnlm.io._safetensors import atomic_dir, write_json
from fnlm.train._record import EnvironmentRecord
from fnlm.train._run import RUN_FILE, GracefulStop, ResumeError, RunCheckpoints, RunInUseError, RunState

RUN_CONFIG = "run_config.json"
METRICS_LOG = "metrics.jsonl"
ENVIRONMENT = "environment.json"


def run_paths(out: Path) -> tuple[Path, Path]:
    """``(final, partial)``: a run's finished directory and its unfinished ``.<name>.partial``, from either."""
    if out.name.startswith(".") and out.name.endswith(".partial"):
        return out.with_name(out.name[1 : -len(".partial")]), out
    return out, out.with_name(f".{out.name}.partial")


def _check_writable(path: Path, what: str) -> None:
    """Create ``path``'s parent if needed and prove it writable, or one line naming ``what``."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"{what} {path}: cannot write in {parent} ({e.strerror or e})") from None


class Run:
    """One run directory (see the module docstring). Build it with :meth:`open`."""

    def __init__(
        self,
        config,
        *,
        out: Path,
        partial: Path,
        resuming: bool,
        explicit: set[str],
        per_session: tuple[str, ...],
        compared: tuple[str, ...],
        report_to: str | None,
        script: str,
        repeat: tuple[str, ...] = (),
    ):
        self.config, self.out, self.dir, self.resuming = config, out, partial, resuming
        self.repeat = repeat
        self.launcher = "python"  # how resume_command starts the script (data parallel: torchrun ...)
        self.explicit, self.per_session, self.compared = explicit, per_session, compared
        self.script = script
        self.environment = EnvironmentRecord(script).start()
        self._log_file = None
        self._tb = None
        self._report_to = report_to
        self.state: RunState | None = None
        self._ckpts: RunCheckpoints | None = None

    # ------------------------------------------------------------------ start
    @classmethod
    def open(
        cls,
        config,
        explicit: set[str],
        *,
        out: Path | None,
        resume: Path | None,
        overwrite: bool = False,
        name: str = "run-%Y%m%d-%H%M%S",
        may_change: tuple[str, ...] = (),
        per_session: tuple[str, ...] = (),
        extendable: tuple[str, ...] = ("epochs", "steps"),
        repeat: tuple[str, ...] = (),
        report_to: str | None = None,
        script: str | None = None,
    ) -> "Run":
        """Start a new run in ``out`` (default ``runs/<name>`` with ``name`` passed to ``time.strftime``),
        or continue ``resume``. Checks, before anything is loaded, that the directory can be written
        and that a resumed run's stored config agrees with the flags given (``explicit``).

        ``may_change``: settings a resumed run takes from the command line when given (else the run's);
        ``per_session``: never the stored run's (e.g. ``out``); ``repeat``: flags the resume hint
        repeats. Use it as ``with Run.open(...) as run:``: a new run that fails before its first
        checkpoint is removed, so the same command can run again."""
        script = script or sys.argv[0]
        if report_to == "tensorboard":
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                    "(or fnlm[tensorboard])"
                ) from None
        fields = [f.name for f in dataclasses.fields(config)]
        compared = tuple(n for n in fields if n not in may_change and n not in per_session)
        if resume is not None:
            if out is not None:
                raise ConfigError("--resume RUN_DIR continues that run in place; leave out --out")
            final, partial = run_paths(Path(resume))
            config = cls._resumed_config(config, explicit, final, partial, resume, may_change, per_session, extendable)
            run = cls(
                config,
                out=final,
                partial=partial,
                resuming=True,
                explicit=explicit,
                per_session=per_session,
                compared=compared,
                report_to=report_to,
                script=script,
                repeat=repeat,
            )
            return run
        final, partial = run_paths(Path(out) if out is not None else Path("runs") / time.strftime(name))
        if final.exists() and not overwrite:
            raise ConfigError(
                f"--out {final} already exists (pass --overwrite to replace it, choose another --out, "
                f"or --resume {final} with a larger --epochs/--steps to extend it)"
            )
        if partial.exists() and not overwrite and RunCheckpoints(partial, {}).checkpoints():
            raise ConfigError(
                f"{partial} holds an unfinished run: continue it with --resume {final}, or pass "
                "--overwrite to start again"
            )
        _check_writable(final, "--out")
        if partial.exists():  # no checkpoint in it (or --overwrite): nothing to resume there
            owner = RunCheckpoints.in_use(partial)
            if owner is not None:
                raise RunInUseError(f"--out {final}: {partial} is being written by {owner}; stop it first")
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        write_json(config_to_dict(config), partial / RUN_CONFIG)
        return cls(
            config,
            out=final,
            partial=partial,
            resuming=False,
            explicit=explicit,
            per_session=per_session,
            compared=compared,
            report_to=report_to,
            script=script,
            repeat=repeat,
        )

    @staticmethod
    def _resumed_config(
        config, explicit, final: Path, partial: Path, resume: Path, may_change, per_session, extendable
    ):
        """The run's stored config, with the flags that may change taken from this command line."""
        if not partial.is_dir():
            if (final / RUN_CONFIG).is_file() and RunCheckpoints(final, {}).checkpoints():
                stored_dir = final  # a finished run: extended from the checkpoint it kept
            elif final.is_dir():
                raise ConfigError(f"--resume {resume}: {final} is a finished run without a checkpoint to continue from")
            else:
                raise ConfigError(f"--resume {resume}: no run there (neither {final} nor {partial})")
        else:
            stored_dir = partial
        try:
            stored_values = json.loads((stored_dir / RUN_CONFIG).read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"--resume {resume}: {stored_dir} has no {RUN_CONFIG}, so it is not a run of this script"
            ) from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"--resume {resume}: {stored_dir / RUN_CONFIG} is unreadable ({e})") from None
        stored = config_from_dict(type(config), stored_values, str(stored_dir / RUN_CONFIG))
        changes = {}
        for name in sorted(explicit):
            now, was = getattr(config, name), getattr(stored, name)
            if name in per_session:
                changes[name] = now
            elif name in may_change:
                if name in extendable and now < was:
                    raise ConfigError(
                        f"--resume {resume}: {flag(name)} can only be raised on resume (the run's is {was}, got {now})"
                    )
                changes[name] = now
            elif now != was:
                raise ConfigError(
                    f"--resume {resume}: {flag(name)} differs from the run's ({was} in the run, "
                    f"{now} now); leave it out to use the run's, or start a new run"
                )
        for name in per_session:  # how this process runs: never the stored run's
            changes.setdefault(name, getattr(config, name))
        if stored_dir is final and not any(n in extendable and n in explicit for n in may_change):
            raise ConfigError(
                f"--resume {resume}: {final} is a finished run; to train it further give a larger "
                f"{' or '.join(flag(n) for n in extendable if n in may_change)}"
            )
        return dataclasses.replace(stored, **changes)

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self, fingerprint: dict[str, Any] | None = None, *, keep: int = 2) -> RunCheckpoints:
        """The run's rolling checkpoints, started: this process holds the run's lock until :meth:`close`
        or :meth:`finish` (a second process gets :class:`~fnlm.train.RunInUseError`), and the run id is
        read or written. ``fingerprint`` (e.g. weights and data digests) and the compared settings must
        be equal for a checkpoint to be restored."""
        cfg = config_to_dict(self.config)
        compared = {flag(n): cfg[n] for n in self.compared} | dict(fingerprint or {})
        if self.resuming and not self.dir.is_dir():
            self._adopt_finished()
        if self._ckpts is not None:
            self._ckpts.close()
        self._ckpts = RunCheckpoints(self.dir, compared, keep=keep).start()
        return self._ckpts

    def _adopt_finished(self) -> None:
        """Extending a finished run: a partial directory with its config, run id, log and last checkpoint,
        built aside and renamed into place only if no other process made one meanwhile."""
        src = self.out
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{self.dir.name}.", suffix=".tmp", dir=self.dir.parent))
        try:
            for name in (RUN_FILE, METRICS_LOG):
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
            shutil.copytree(src / "checkpoints", tmp / "checkpoints")
            write_json(config_to_dict(self.config), tmp / RUN_CONFIG)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, self.dir)  # fails if another process adopted it first: its lock decides
            except OSError:
                if not self.dir.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, ckpts: RunCheckpoints, device: str | torch.device = "cpu") -> RunState | None:
        """The newest intact checkpoint of a resumed run (and the log rewound to its step), or None
        for a new run. A resumed run without one is a one-line :class:`ResumeError`."""
        if not self.resuming:
            return None
        state = ckpts.restore(device=device)
        if state is None:
            raise ResumeError(
                f"--resume {self.out}: {self.dir} holds no checkpoint (the run stopped before its "
                "first); start it again with --overwrite"
            )
        self._rewind_log(state.step)
        self.state = state
        return state

    def _rewind_log(self, step: int) -> None:
        """Drop the log lines a killed process wrote after the checkpoint it is resumed from."""
        path = self.dir / METRICS_LOG
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:  # a line cut short by the kill
                continue
        path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    # ------------------------------------------------------------------ logging
    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with ``step``) to ``metrics.jsonl`` now; its numbers to TensorBoard too."""
        if self._log_file is None:
            self._log_file = open(self.dir / METRICS_LOG, "a", encoding="utf-8")
            if self._report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()
        if self._tb is not None:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{kind}/{k}", v, record.get("step", 0))
            self._tb.flush()

    def close(self) -> None:
        """Close the log and release the run's lock."""
        self._close_log()
        if self._ckpts is not None:
            self._ckpts.close()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # ------------------------------------------------------------------ stopping
    def stop_guard(self) -> GracefulStop:
        """``with run.stop_guard() as stop:`` SIGINT/SIGTERM set ``stop.requested`` (see GracefulStop)."""
        return GracefulStop()

    def resume_command(self) -> str:
        """The command that continues this run: its settings come from the run; the flags of
        ``repeat`` (how this process ran, e.g. ``--no-compile``) given on this command line are repeated."""
        cfg = config_to_dict(self.config)
        extra = []
        for name in self.repeat:
            if name in self.explicit:
                v = cfg[name]
                if isinstance(v, bool):
                    extra.append(flag(name) if v else "--no-" + flag(name)[2:])
                elif v is not None:
                    extra += [flag(name), str(v)]
        return " ".join([self.launcher, self.script, "--resume", str(self.out)] + extra)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A new run that fails before its first checkpoint leaves nothing behind (nothing to resume)."""
        self.close()
        if (
            exc_type is not None
            and not self.resuming
            and self.dir.is_dir()
            and not RunCheckpoints(self.dir, {}).checkpoints()
        ):
            shutil.rmtree(self.dir, ignore_errors=True)

    def stopped(self, step: int, total: int, why: str) -> int:
        """Report a stop with a checkpoint written; the exit status (130)."""
        self.close()
        print(
            f"stopped by {why} at step {step} of {total}, checkpoint written; resume with: {self.resume_command()}",
            file=sys.stderr,
            flush=True,
        )
        return 130

    # ------------------------------------------------------------------ finishing
    @contextlib.contextmanager
    def finish(self, ckpts: RunCheckpoints | None = None) -> Iterator[Path]:
        """``with run.finish() as tmp:`` fill ``tmp``; it becomes the finished run directory (replacing
        an older one only once complete), with the config, log, environment record and the newest
        checkpoint of this run; the partial directory is then removed and the run's lock released."""
        self._close_log()
        with atomic_dir(self.out) as tmp:
            yield tmp
            for name in (RUN_CONFIG, RUN_FILE, METRICS_LOG):
                if (self.dir / name).is_file():
                    shutil.copyfile(self.dir / name, tmp / name)
            if (self.dir / "tensorboard").is_dir():
                shutil.copytree(self.dir / "tensorboard", tmp / "tensorboard")
            write_json(self.environment.result(), tmp / ENVIRONMENT)
            newest = ckpts.latest() if ckpts is not None else None
            if newest is not None:
                self._copy_checkpoint(ckpts, newest, tmp / "checkpoints")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.close()

    @staticmethod
    def _copy_checkpoint(ckpts: RunCheckpoints, path: Path, dest: Path) -> None:
        """``path`` (and the best parameters it refers to) under ``dest``, hard-linked where possible."""

        def link(src, dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(path, dest / path.name, copy_function=link)
        best = ckpts._best_step_of(path)
        if best is not None:
            bdir = ckpts.dir / f"best-step-{int(best):08d}"
            if bdir.is_dir():
                shutil.copytree(bdir, dest / bdir.name, copy_function=link)
