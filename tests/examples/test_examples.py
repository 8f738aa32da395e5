"""The examples run end to end (as a user runs them: a fresh interpreter, the command line)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello_fnlm.py"


def run_hello(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # one intra-op thread: on a shared CI runner an oversubscribed thread pool is what makes a
    # small model slow, not the arithmetic
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(HELLO), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def logged_losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step\s+\d+\s+loss ([0-9.]+)", stdout, flags=re.M)]


def test_hello_runs(tmp_path):
    """A short eager run: exits 0, and the printed training loss falls."""
    proc = run_hello(
        "--steps",
        "80",
        "--seed",
        "1",
        "--no-compile",
        "--min-accuracy",
        "0",
        "--out",
        str(tmp_path / "hello"),
        timeout=120,
    )
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
def test_hello_compiled_learns_the_task(tmp_path):
    """The full example as documented: compiled step, default steps, exits 0 only if it learned."""
    proc = run_hello("--seed", "0", "--out", str(tmp_path / "hello"), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled the training step" in proc.stdout
    acc = float(re.search(r"sequences ([0-9.]+)%", proc.stdout)[1])
    assert acc >= 90.0, proc.stdout


def run_example(
    name: str, *args: str, timeout: float, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = (launcher or [sys.executable]) + [str(ROOT / "examples" / name), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_per_example_grads_example():
    """vmap equals the loop, gradient norms find flipped labels, DP-SGD learns."""
    proc = run_example("per_example_grads.py", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    diff = float(re.search(r"max \|difference\| = ([0-9.e+-]+)", proc.stdout)[1])
    assert diff < 1e-5, proc.stdout
    hits = re.search(r"include (\d+) of the (\d+) flipped labels", proc.stdout)
    assert int(hits[1]) >= int(hits[2]) // 2, proc.stdout
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", proc.stdout).groups())
    assert last < first, proc.stdout


def test_ensemble_example_eager():
    """The ensemble and the learning-rate sweep run (eagerly here; the compiled step's maths is
    tested in test_vmap_tricks) and the averaged ensemble is at least as good as a typical member."""
    proc = run_example("ensemble.py", "--no-compile", "--steps", "150", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mean, ens = map(
        float,
        re.search(r"mean member ([0-9.]+), best member [0-9.]+, averaged ensemble ([0-9.]+)", proc.stdout).groups(),
    )
    assert ens >= mean - 0.01, proc.stdout
    assert proc.stdout.count("   lr ") == 6 and "<- best" in proc.stdout


def test_ddp_example_under_torchrun_two_gloo_processes():
    """The documented launch: two CPU processes end with bitwise identical parameters."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_example("ddp_train.py", "--steps", "20", "--no-compile", timeout=300, launcher=launcher)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout and "parameters identical on all processes: True" in proc.stdout
