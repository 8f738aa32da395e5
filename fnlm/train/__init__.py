"""Training: the compiled whole step, train-state checkpoints (a run's rolling, resumable ones:
:class:`RunCheckpoints`, :class:`GracefulStop`), ``vmap`` tricks (per-example gradients, DP-SGD,
ensembles) and data parallel (:mod:`fnlm.train.distributed`, also reachable as ``fnlm.distributed``).
Optimizers live in :mod:`fnlm.optim`."""

from fnlm.train import distributed
from fnlm.train._checkpoint import load_train_state, save_train_state
from fnlm.train._compile_cache import (
    CompileCache,
    Precompiled,
    UnsafeCacheError,
    default_cache_dir,
    pick_background,
    source_digest,
)
from fnlm.train._data_parallel import DataParallel, WorkerRun
from fnlm.train._frozen import freeze, with_frozen
from fnlm.train._guard import worker_guard
from fnlm.train._lifecycle import Run
from fnlm.train._precision import autocast_dtype, native_bf16, pick_device
from fnlm.train._progress import Progress
from fnlm.train._record import EnvironmentRecord, model_card
from fnlm.train._report import plot_training, write_errors
from fnlm.train._run import GracefulStop, ResumeError, RunCheckpoints, RunInUseError, RunState, digest
from fnlm.train._shard import (
    Sharding,
    make_sharded_train_step,
    resident_bytes,
    shard_costs,
    shard_groups,
    sharded_step_fn,
)
from fnlm.train._shard_checkpoint import gather_params, load_sharded, save_sharded
from fnlm.train._step import (
    COMPILE_OPTIONS,
    Step,
    compile_fn,
    finite_flags,
    keep_if_finite,
    make_eval_step,
    make_train_step,
    nonfinite_message,
    param_group,
    train_step_fn,
)
from fnlm.train._validate import validate_train_state
from fnlm.train._vmap import (
    dp_aggregate,
    make_dp_sgd_step,
    make_ensemble_step,
    per_example_grad_norms,
    per_example_grads,
)

__all__ = [
    "COMPILE_OPTIONS",
    "EnvironmentRecord",
    "GracefulStop",
    "Progress",
    "ResumeError",
    "Run",
    "RunCheckpoints",
    "RunInUseError",
    "RunState",
    "Step",
    "autocast_dtype",
    "compile_fn",
    "digest",
    "distributed",
    "dp_aggregate",
    "finite_flags",
    "keep_if_finite",
    "load_train_state",
    "model_card",
    "plot_training",
    "write_errors",
    "make_dp_sgd_step",
    "native_bf16",
    "make_ensemble_step",
    "make_eval_step",
    "make_train_step",
    "nonfinite_message",
    "param_group",
    "pick_device",
    "per_example_grad_norms",
    "per_example_grads",
    "save_train_state",
    "train_step_fn",
    "with_frozen",
    "freeze",
    "Sharding",
    "make_sharded_train_step",
    "resident_bytes",
    "shard_costs",
    "shard_groups",
    "sharded_step_fn",
    "gather_params",
    "load_sharded",
    "save_sharded",
    "worker_guard",
    "validate_train_state",
    "DataParallel",
    "WorkerRun",
    "CompileCache",
    "Precompiled",
    "UnsafeCacheError",
    "default_cache_dir",
    "pick_background",
    "source_digest",
]
