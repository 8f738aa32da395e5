"""Progress of a training loop: a tqdm bar on a terminal, plain lines in a log file or a pipe.

The first call of a compiled step for a new input shape compiles it (seconds to a minute on a
CPU) while nothing moves: :meth:`Progress.compiling` says so before that call.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """``with Progress(total, "epoch 1/2") as bar: ... bar.update(loss=...)``.

    ``every``: without a terminal, print one line per ``every`` updates (default: a tenth of
    ``total``) and on the last; with one, a tqdm bar. ``initial``: updates already done (a resumed run).
    """

    #: True: print nothing (the workers other than rank 0 of a data-parallel run; fnlm.train.DataParallel)
    quiet = False

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        initial: int = 0,
        every: int | None = None,
        stream: TextIO | None = None,
        tty: bool | None = None,
    ):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.n = total, desc, initial
        self.every = every or max(1, total // 10)
        self.tty = self.stream.isatty() if tty is None else tty
        if Progress.quiet:
            self.tty, self.every = False, float("inf")
        self._bar = None
        self._t0 = time.time()
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=self.stream)

    def compiling(self, what: str) -> None:
        """Say that the next call compiles (``what``: e.g. the batch shape)."""
        msg = f"compiling the step for {what} (first call of this shape)..."
        if self._bar is not None:
            self._bar.set_postfix_str(msg, refresh=True)
        else:
            self.write(f"{self.desc}: {msg}")

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        text = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix_str(text, refresh=False)
        elif self.n % self.every == 0 or self.n == self.total:
            self.write(f"{self.desc}: {self.n}/{self.total} ({time.time() - self._t0:.0f}s) {text}")

    def write(self, msg: str) -> None:
        if Progress.quiet:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
