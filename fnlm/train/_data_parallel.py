"""``DataParallel``: a training script on ``N`` workers, ``torchrun --nproc_per_node=N script.py ...``.

Every worker runs the whole script on the same data in the same order; the machinery lives here so
that a script changes in a few lines::

    with DataParallel.start() as dp:                       # init_distributed + worker_guard; N = 1: a no-op
        # rank 0: the Run; the others a view of it. A --batch-size that N does not divide: one line, first
        with dp.open_run(cfg, explicit, divisible=("batch_size",), ...) as run:
            step = make_train_step(dp.loss(loss_fn), opt, grad_sync=dp.grad_sync)
            ...  params, opt_state, m = step(params, opt_state, dp.shard(global_batch), key)
            ...  why = dp.agree(stop.requested)             # every worker stops at the same step
            ...  probs = dp.predict_in_order(fn, token_ids, ...)   # batches split across workers, gathered

* **Batches.** Worker ``r`` of ``N`` takes rows ``[r b/N, (r+1) b/N)`` of every global batch
  (:meth:`shard`): the global batch size and the data order are the single process's.
* **Gradients** are averaged inside the compiled step (``grad_sync=all_reduce_mean``). A batch whose
  rows carry a ``weight`` (0 for rows that only pad the last batch; ``L = sum_n w_n l_n / sum_n w_n``)
  gets ``dp_scale = N W_r / W`` per (micro-)batch, ``W_r`` the weight of the worker's rows and ``W``
  the global batch's, and :meth:`loss` multiplies the worker's loss and aux metrics by it, so that
  ``(1/N) sum_r dp_scale_r L_r = sum_n w_n l_n / W``: the single process's loss, gradient and
  (weighted-mean) metrics, whatever the padding. Without weights every worker's mean counts equally.
  A loss that is a sum of means over different things (BERT's ``L_MLM + L_NSP``: masked tokens, pairs)
  names a weight per term (``shard(batch, weight={"mlm": "mlm_weight", "nsp": "nsp_weight"})``) and
  gets one ``dp_scale`` per term: the worker's loss is ``sum_t dp_scale_t L_t``.
* **Dropout**: worker ``r`` gets ``fold_in(key, r)`` (with ``N > 1``), so the workers drop different
  units; the masks are not the single process's, so ``N`` workers equal one only without dropout.
* **Evaluation** (:meth:`map`, :meth:`predict_in_order`): batch ``i`` is computed by worker ``i mod N``
  and the results are gathered to every worker, in order: bitwise the single process's values.
* **The run directory** is written by rank 0 only (:meth:`open_run`): the others never create a file;
  rank 0's decisions (the resolved config, the checkpoint restored) are broadcast, and a one-line
  error on rank 0 (``--out`` exists, a bad ``--resume``) ends the others silently with the same status.
  A checkpoint holds the replicated state only, so ``--resume`` works with any number of workers.
* **Stopping**: SIGINT/SIGTERM (``torchrun`` forwards them to every worker) set each worker's flag;
  :meth:`agree` reduces the flags every step, so all workers stop at the same step, rank 0 writes one
  checkpoint and the resume command. A worker that dies (or a collective that waits longer than
  ``timeout`` seconds) ends the others with one line (:func:`fnlm.train.worker_guard`).
* Other workers' standard output is discarded and their progress bars are off (one log, rank 0's).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fnlm import random
from fnlm.config import ConfigError
from fnlm.data import predict_in_order
from fnlm.data._ordered import length_sorted_batches
from fnlm.train._guard import worker_guard
from fnlm.train._lifecycle import Run
from fnlm.train._progress import Progress
from fnlm.train._run import GracefulStop, RunState
from fnlm.train.distributed import (
    all_reduce_mean,
    destroy_distributed,
    init_distributed,
)
from fnlm.tree import PyTree, tree_map

SCALE = "dp_scale"
_SIGNALS = ("SIGINT", "SIGTERM")


def _env_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class DataParallel:
    """This worker's place in a data-parallel run (see the module docstring). Build it with :meth:`start`."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float | None):
        self.rank, self.world, self.device, self.timeout = rank, world, device, timeout
        self._guard = None

    @classmethod
    def start(cls, *, timeout: float | None = 600.0, backend: str | None = None) -> DataParallel:
        """Join the ``torchrun`` group (``N = WORLD_SIZE`` workers; gloo on CPU, NCCL on GPU, collectives
        failing after ``timeout`` s), or a single process when ``N = 1`` (no group: nothing changes)."""
        rank, world = _env_world()
        if world <= 1:
            return cls(0, 1, torch.device("cpu"), timeout)
        rank, world, device = init_distributed(backend, timeout)
        if rank != 0:  # one log: rank 0's
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
            Progress.quiet = True
        return cls(rank, world, device, timeout)

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that writes the run directory and prints."""
        return self.rank == 0

    def __enter__(self) -> DataParallel:
        if self.world > 1:
            self._guard = worker_guard(self.timeout)
            self._guard.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if self._guard is None:
            return None
        try:
            if exc_type is None:
                destroy_distributed()
        except BaseException as e:
            self._guard.__exit__(type(e), e, e.__traceback__)
            raise
        guard, self._guard = self._guard, None
        return guard.__exit__(exc_type, exc, tb)

    # ------------------------------------------------------------------ settings
    def check_divides(self, value: int, flag: str) -> None:
        """``value`` (a global batch size) must split evenly over the workers: else a one-line
        :class:`~fnlm.config.ConfigError` on rank 0 and a silent exit with the same status (2) elsewhere."""
        if value % self.world:
            if not self.is_main:
                raise SystemExit(2)
            raise ConfigError(
                f"{flag} {value} must be divisible by the number of workers ({self.world}): each "
                f"worker takes an equal share of every batch"
            )

    def pick_device(self, name: str = "auto") -> torch.device:
        """The device for ``--device name``: with ``N > 1`` on a GPU machine worker ``r`` uses its own
        ``cuda:LOCAL_RANK`` (unless ``name`` is ``cpu``)."""
        from fnlm.train._precision import pick_device

        if self.world == 1 or name == "cpu" or self.device.type == "cpu":
            return pick_device(name) if self.world == 1 else torch.device("cpu")
        return self.device

    # ------------------------------------------------------------------ the step
    @property
    def grad_sync(self) -> Callable[[PyTree], PyTree] | None:
        """``all_reduce_mean`` with ``N > 1`` workers (for ``make_train_step(grad_sync=)``), else None."""
        return all_reduce_mean if self.world > 1 else None

    def shard(self, batch: PyTree, *, axis: int = 0, weight: str | Mapping[str, str] = "weight") -> PyTree:
        """This worker's rows ``[r b/N, (r+1) b/N)`` along ``axis`` (1 for ``[k, b, ...]`` micro-batches)
        of every leaf; with a ``weight`` leaf, also ``dp_scale = N W_r / W`` per micro-batch (0 where the
        whole batch weighs 0). ``weight`` a mapping ``{term: leaf}`` (a loss that sums means over
        different things): ``dp_scale`` a dict ``{term: N W_r / W}``, one per term whose leaf the batch
        has (see :meth:`loss`). The batch itself with one worker."""
        if self.world == 1:
            return batch

        def part(x):
            if not isinstance(x, Tensor) or x.ndim <= axis or x.shape[axis] % self.world:
                raise ValueError(
                    f"shard: every batch leaf needs an axis {axis} divisible by {self.world} workers, "
                    f"got shape {tuple(getattr(x, 'shape', ()))}"
                )
            b = x.shape[axis] // self.world
            return x.narrow(axis, self.rank * b, b)

        def scale(leaf: str) -> Tensor:
            w = batch[leaf].to(torch.float32)
            total = w.sum(dim=axis)
            mine = out[leaf].to(torch.float32).sum(dim=axis)
            return torch.where(total > 0, self.world * mine / total.clamp(min=1e-12), torch.zeros_like(total))

        out = tree_map(part, batch)
        if not isinstance(batch, dict):
            return out
        if isinstance(weight, str):
            return {**out, SCALE: scale(weight)} if weight in batch else out
        scales = {term: scale(leaf) for term, leaf in weight.items() if leaf in batch}
        return {**out, SCALE: scales} if scales else out

    def loss(self, loss_fn: Callable) -> Callable:
        """``loss_fn`` for one worker's rows: the dropout key folded with the rank, the loss and the aux
        metrics multiplied by the batch's ``dp_scale`` (see the module docstring). With one scale per
        term (:meth:`shard` with a ``weight`` mapping), ``loss_fn``'s loss must be the sum of its aux
        ``<term>_loss`` values (as :func:`fnlm.models.pretraining_loss`'s): the worker's loss is
        ``sum_t dp_scale_t aux[<term>_loss]`` and each aux metric ``<term>_*`` is multiplied by its
        term's scale (a ValueError for aux outside every term). ``loss_fn`` itself with one worker."""
        if self.world == 1:
            return loss_fn
        rank = self.rank

        def worker_loss(params, batch, key):
            scale = None
            if isinstance(batch, dict) and SCALE in batch:
                scale = batch[SCALE]
                batch = {k: v for k, v in batch.items() if k != SCALE}
            loss, aux = loss_fn(params, batch, random.fold_in(key, rank))
            if scale is None:
                return loss, aux
            if not isinstance(scale, dict):
                return loss * scale, {k: v * scale for k, v in (aux or {}).items()}
            aux = dict(aux or {})
            missing = [f"{t}_loss" for t in scale if f"{t}_loss" not in aux]
            if missing:
                raise ValueError(f"DataParallel.loss: loss_fn's aux needs {missing} (one loss per weighted term)")

            def term(name: str) -> str:
                for t in scale:
                    if name.startswith(f"{t}_"):
                        return t
                raise ValueError(
                    f"DataParallel.loss: aux metric {name!r} belongs to none of the terms {sorted(scale)} "
                    "(name it <term>_...)"
                )

            total = sum(scale[t] * aux[f"{t}_loss"] for t in scale)
            return total, {k: v * scale[term(k)] for k, v in aux.items()}

        return worker_loss

    def agree(self, requested: str | None) -> str | None:
        """The stop every worker takes: the signal any worker received (``stop.requested``), reduced
        over the workers with one small all-reduce (call it once per step on every worker)."""
        if self.world == 1:
            return requested
        code = 0 if requested is None else (_SIGNALS.index(requested) + 1 if requested in _SIGNALS else 99)
        t = torch.tensor([code], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        code = int(t.item())
        if code == 0:
            return None
        return _SIGNALS[code - 1] if code <= len(_SIGNALS) else (requested or "a stop request")

    # ------------------------------------------------------------------ evaluation
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
        """``[fn(x) for x in items]``, item ``i`` computed by worker ``i mod N``, the results gathered to
        every worker in order (picklable results: CPU tensors, numbers)."""
        items = list(items)
        if self.world == 1:
            return [fn(x) for x in items]
        mine = {i: fn(items[i]) for i in range(self.rank, len(items), self.world)}
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, mine)
        merged = {}
        for p in parts:
            merged.update(p)
        return [merged[i] for i in range(len(items))]

    def predict_in_order(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        token_ids: Sequence[Sequence[int]],
        *,
        batch_size: int,
        buckets: Sequence[int] | None = None,
        pad_id: int = 0,
    ) -> Tensor:
        """:func:`fnlm.data.predict_in_order` with its batches split across the workers and gathered
        (``fn`` should return CPU tensors): the same batches, so bitwise the same result."""
        if self.world == 1:
            return predict_in_order(fn, token_ids, batch_size=batch_size, buckets=buckets, pad_id=pad_id)
        batches = list(length_sorted_batches(token_ids, batch_size=batch_size, buckets=buckets, pad_id=pad_id))
        ys = self.map(lambda b: fn(b[1], b[2]).cpu(), batches)
        if not ys:
            return torch.empty(0)
        out = torch.empty(len(token_ids), *ys[0].shape[1:], dtype=ys[0].dtype)
        for (idx, _, _), y in zip(batches, ys):
            real = idx >= 0
            out[idx[real]] = y[real]
        return out

    # ------------------------------------------------------------------ rank 0 decides
    def from_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed on rank 0 (e.g. a tokenizer trained and written into the run directory) and
        sent to every worker; an error on rank 0 is raised there and ends the others silently."""
        return self._decide(fn, share=True)

    def _decide(self, fn: Callable[[], Any], share: bool) -> Any:
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
                box[0] = ("ok", value if share else None)
            except BaseException as e:  # noqa: BLE001 (re-raised below, after the others know)
                error = e
                box[0] = ("error", 130 if isinstance(e, KeyboardInterrupt) else 2)
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        kind, payload = box[0]
        if kind == "error":
            raise SystemExit(payload)
        return value if self.is_main else payload

    def open_run(self, config, explicit: set[str], *, divisible: tuple[str, ...] = (), **kw) -> Run | WorkerRun:
        """:meth:`fnlm.train.Run.open` on rank 0 (same arguments); with ``N > 1`` a :class:`WorkerRun`
        on every worker, which calls the Run on rank 0 and shares its decisions. ``divisible``: config
        fields (global batch sizes) that must split evenly over the workers (:meth:`check_divides`),
        checked before the run directory is touched (a resumed run's: once its settings are read)."""
        from fnlm.config import flag

        def check(cfg):
            for name in divisible:
                self.check_divides(getattr(cfg, name), flag(name))

        if kw.get("resume") is None:
            check(config)
        if self.world == 1:
            run = Run.open(config, explicit, **kw)
            check(run.config)
            return run
        run = self._decide(lambda: Run.open(config, explicit, **kw), share=False)
        if run is not None:
            run.launcher = f"torchrun --nproc_per_node={self.world}"
        info = self._decide(lambda: (run.config, run.out, run.dir, run.resuming), share=True)
        check(info[0])
        return WorkerRun(self, run, *info)

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


class _NoCheckpoints:
    """A non-main worker's stand-in for :class:`~fnlm.train.RunCheckpoints`: saving is rank 0's job."""

    seconds = 0.0

    def save(self, *args, **kwargs) -> None:
        return None

    def latest(self):
        return None

    def close(self) -> None:
        return None


class _WorkerStop(GracefulStop):
    """GracefulStop for one worker of N: only rank 0 prints, and a repeated signal does not quit at
    once (Ctrl-C in a terminal reaches every worker directly *and* through torchrun's forwarding)."""

    def __init__(self, main: bool):
        super().__init__()
        self.main = main

    def _handle(self, signum, frame):
        if self.requested is not None:
            return
        self.requested = signal.Signals(signum).name
        if self.main:
            print(
                f"\n{self.requested}: finishing this step on every worker, then writing a checkpoint",
                file=sys.stderr,
                flush=True,
            )


class WorkerRun:
    """The run as every worker of a data-parallel run sees it: ``config``, ``out``, ``dir``, ``resuming``
    as rank 0 resolved them; ``checkpoints``/``restore``/``stopped`` called on every worker (rank 0
    does the work and shares the result), ``log`` and checkpoint saving on rank 0 only. ``finish``
    exists on rank 0 only: the other workers return before the outputs are written."""

    def __init__(self, dp: DataParallel, run: Run | None, config, out, dir, resuming: bool):
        self._dp, self._run = dp, run
        self.config, self.out, self.dir, self.resuming = config, out, dir, resuming

    @property
    def is_main(self) -> bool:
        return self._dp.is_main

    def checkpoints(self, fingerprint: dict[str, Any] | None = None, *, keep: int = 2):
        ck = self._dp._decide(lambda: self._run.checkpoints(fingerprint, keep=keep), share=False)
        return ck if self.is_main else _NoCheckpoints()

    def restore(self, ckpts, device: str | torch.device = "cpu") -> RunState | None:
        """Rank 0 restores (see :meth:`Run.restore`) and sends the state to every worker, on ``device``."""
        state = self._dp._decide(lambda: self._run.restore(ckpts, device="cpu"), share=True)
        if state is None:
            return None

        def move(tree):
            return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, tree)

        return state._replace(
            params=move(state.params),
            opt_state=move(state.opt_state),
            best_params=None if state.best_params is None else move(state.best_params),
        )

    def log(self, record: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.log(record)

    def stop_guard(self) -> GracefulStop:
        return _WorkerStop(self.is_main)

    def stopped(self, step: int, total: int, why: str) -> int:
        if self._run is not None:
            return self._run.stopped(step, total, why)
        return 130

    def finish(self, ckpts=None):
        if self._run is None:
            raise RuntimeError(
                "WorkerRun.finish: only rank 0 writes the finished run (return before it on the other workers)"
            )
        return self._run.finish(ckpts)

    def close(self) -> None:
        if self._run is not None:
            self._run.close()

    def __enter__(self) -> WorkerRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._run is not None:
            self._run.__exit__(exc_type, exc, tb)
