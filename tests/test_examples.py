"""The examples run end to end (as a user runs them: a fresh interpreter, the command line)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello_fnlm.py"


def run_hello(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # one intra-op thread: on a shared CI runner an oversubscribed thread pool is what makes a
    # small model slow, not the arithmetic
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, str(HELLO), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def logged_losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step\s+\d+\s+loss ([0-9.]+)", stdout, flags=re.M)]


def test_hello_runs():
    """A short eager run: exits 0, and the printed training loss falls."""
    proc = run_hello("--steps", "80", "--seed", "1", "--no-compile", "--min-accuracy", "0", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = logged_losses(proc.stdout)
    assert len(losses) >= 5, proc.stdout
    m = re.search(r"first loss ([0-9.]+), final loss ([0-9.]+)", proc.stdout)
    assert m, proc.stdout
    first, final = float(m[1]), float(m[2])
    assert first > 3.0  # ~ln(13): an untrained model
    assert final < 0.8 * first and min(losses[-3:]) < losses[0]
    assert "held-out accuracy" in proc.stdout and "->" in proc.stdout  # decoded examples are shown


@pytest.mark.slow
def test_hello_compiled_learns_the_task():
    """The full example as documented: compiled step, default steps, exits 0 only if it learned."""
    proc = run_hello("--seed", "0", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled the training step" in proc.stdout
    acc = float(re.search(r"sequences ([0-9.]+)%", proc.stdout)[1])
    assert acc >= 90.0, proc.stdout
