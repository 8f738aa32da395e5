"""Data parallelism with ``torch.distributed``: every process holds the params, sees its share of
the batch, and the gradients are averaged by an all-reduce *inside* the compiled training step.

Run with ``torchrun`` (gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node=2 examples/ddp_train.py

and in the script::

    rank, world, device = init_distributed()             # reads RANK / WORLD_SIZE / LOCAL_RANK
    params = broadcast_params(params)                    # everyone starts from rank 0's params
    step = make_train_step(loss_fn, opt, grad_sync=all_reduce_mean)
    ...  params, opt_state, metrics = step(params, opt_state, my_shard_of_the_batch, key)
    destroy_distributed()

``all_reduce_mean`` uses the *functional* collectives (``torch.distributed._functional_collectives``),
which dynamo traces, so the whole step -- forward, backward, all-reduce, optimizer -- stays ONE
``fullgraph=True`` graph, with gloo on CPU as with NCCL on GPU (tested with two gloo processes).
The gradient tree (together with the loss and aux metrics) is flattened into one buffer per dtype,
reduced with one ``sum`` all-reduce and divided by the world size (gloo has no ``avg``): with
equal shards and a mean loss, every process ends with the gradient of the whole batch, so the
processes stay bitwise in sync without further broadcasts. Dropout keys: give each rank its own,
e.g. ``fold_in(step_key, rank)``, or all ranks drop the same units.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fnlm.tree import PyTree, tree_flatten, tree_map, tree_unflatten


def init_distributed(backend: str | None = None, timeout: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``LOCAL_RANK``): ``(rank, world_size, device)``.

    ``backend``: ``'nccl'`` when CUDA is available, else ``'gloo'``. On GPU each process uses
    ``cuda:LOCAL_RANK``. Without ``torchrun`` (no ``WORLD_SIZE``) it is a single process:
    ``(0, 1, device)`` and no group is created. ``timeout``: seconds a collective may wait for the
    other workers before it fails (``init_process_group(timeout=)``; torch's default otherwise);
    with :func:`fnlm.train.worker_guard` a dead or stuck worker then ends the others with one line.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), **kw)
    return dist.get_rank(), dist.get_world_size(), device


def destroy_distributed() -> None:
    """Leave the process group; call it on every rank at the end of the run.

    Why more than ``destroy_process_group``: a gloo worker thread frees a finished collective's
    tensors just *after* the collective returns, and freeing a tensor that Python has seen takes
    the GIL. If the interpreter is already shutting down when the thread asks for it, Python kills
    the thread inside C++ and the process aborts (SIGABRT, "terminate called without an active
    exception"; 9 of 15 torchrun runs of ``examples/ddp_train.py`` on a 2-core machine). Once a
    collective has gone through the functional API or ``torch.compile``, the threads outlive
    ``destroy_process_group`` and torch offers no way to join them. So every rank waits at a
    barrier and then sleeps 0.1 s, both with the GIL released, which lets the threads finish
    first (0 of 40 runs aborted). It narrows a race in torch rather than closing it.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(0.1)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_mean(tree: PyTree, group: Any = None) -> PyTree:
    """``x <- (1/W) sum_r x_r`` for every floating-point leaf, over the ``W`` processes of ``group``.

    The leaves are concatenated into one flat buffer per dtype, so a whole gradient tree costs one
    all-reduce (not one per tensor). Traceable by dynamo (functional collectives), so it can sit
    inside a compiled step as ``make_train_step(..., grad_sync=all_reduce_mean)``. A no-op without
    a process group.
    """
    if not dist.is_initialized():
        return tree
    from torch.distributed import _functional_collectives as fc

    group = dist.group.WORLD if group is None else group
    n = dist.get_world_size(group)
    leaves, spec = tree_flatten(tree)
    for i, x in enumerate(leaves):
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            raise TypeError(
                f"all_reduce_mean: leaf {i} is {type(x).__name__} "
                f"{getattr(x, 'dtype', '')}; only floating-point tensors can be averaged"
            )
    out: list[Tensor | None] = [None] * len(leaves)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        by_dtype.setdefault(x.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([leaves[i].reshape(-1) for i in idx])
        flat = fc.all_reduce(flat, "sum", group)
        flat = fc.wait_tensor(flat) if isinstance(flat, Tensor) and hasattr(fc, "wait_tensor") else flat
        flat = flat / n
        offset = 0
        for i in idx:
            k = leaves[i].numel()
            out[i] = flat[offset : offset + k].reshape(leaves[i].shape)
            offset += k
    return tree_unflatten(out, spec)


def broadcast_params(tree: PyTree, src: int = 0, group: Any = None) -> PyTree:
    """A copy of ``tree`` with every tensor replaced by process ``src``'s value (call at the start,
    so all processes train the same model). Eager, one broadcast per leaf; a no-op without a group."""
    if not dist.is_initialized():
        return tree

    def bcast(x):
        if not isinstance(x, Tensor):
            return x
        y = x.detach().clone().contiguous()
        dist.broadcast(y, src=src, group=group)
        return y

    return tree_map(bcast, tree)


def all_equal(tree: PyTree, group: Any = None) -> bool:
    """True if every process holds bitwise the same tensors (compares a checksum per leaf)."""
    if not dist.is_initialized():
        return True
    leaves, _ = tree_flatten(tree)
    sums = torch.stack([x.detach().double().sum() for x in leaves if isinstance(x, Tensor)]).cpu()
    if dist.get_backend(group) == "nccl":
        sums = sums.cuda()
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, sums, group=group)
    return all(torch.equal(g, gathered[0]) for g in gathered)
