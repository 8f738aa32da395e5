"""``with worker_guard(): ...``: a failed collective ends the worker with one line and exit status 1.

When one worker of a data-parallel or sharded run dies (killed, out of memory, a bug on one rank),
the others are left inside a collective that can never complete. Two things turn that into a
clean stop: the process group's timeout (``init_distributed(timeout=s)``), after which a waiting
collective fails, and the guard, which catches that failure (or gloo's "connection closed by
peer", which comes at once when the dead worker's sockets close) and ends the process::

    rank, world, device = init_distributed(timeout=60)
    with worker_guard():
        for step in ...:
            held, opt_state, metrics = step(held, opt_state, batch, key)

prints ``fnlm: worker 0 of 2: stopped at a collective (a worker died or did not answer within the
60 s timeout): <the backend's first line>`` on stderr and exits with status 1. It exits with
``os._exit``, not ``sys.exit``: after a failed collective the process group is broken, and the
normal interpreter shutdown can block in it (gloo's and NCCL's threads, ``atexit`` hooks), which
would be the hang the guard exists to prevent. Errors that are not a failed collective (a
``ValueError`` in the user's code) propagate unchanged, with their traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch.distributed as dist

_MARKERS = (
    "gloo",
    "nccl",
    "connection",
    "timed out",
    "timeout",
    "peer",
    "socket",
    "broken pipe",
    "c10d",
    "collective",
    "watchdog",
)


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another worker is gone or late."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _MARKERS)


@contextlib.contextmanager
def worker_guard(timeout: float | None = None) -> Iterator[None]:
    """Run the block; if a collective fails (see the module docstring), write one line to stderr
    and ``os._exit(1)``. ``timeout``: the seconds given to ``init_distributed``, for the message."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt and SystemExit propagate below)
        if not is_collective_failure(e):
            raise
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        within = f" within the {timeout:g} s timeout" if timeout is not None else ""
        sys.stdout.flush()
        sys.stderr.write(
            f"fnlm: worker {rank} of {world}: stopped at a collective (a worker died or did not "
            f"answer{within}): {first}\n"
        )
        sys.stderr.flush()
        os._exit(1)
