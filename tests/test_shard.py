"""Sharded training (fnlm.train.Sharding, levels 0-3) with two gloo CPU processes: each level ends
where ONE process ends with make_train_step(accum_steps=2) (GPT-2 with dropout, AdamW, clipping);
each worker holds 1/N of the state; sharded checkpoints move between 2 and 1 workers; a dead
worker stops the other with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import _shard_worker as W
import pytest
import torch

from fnlm import optim, random
from fnlm.io import CheckpointError, read_safetensors
from fnlm.models import init_gpt2, save_gpt2
from fnlm.train import Sharding, load_sharded, make_train_step, save_sharded
from fnlm.tree import flatten_names, num_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(mode: str, out: Path, timeout: float = 60, extra_env: dict | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "FNLM_TEST_TIMEOUT": str(timeout),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "_shard_worker.py"), mode, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def run_workers(mode: str, out: Path, timeout: float = 60, wait: float = 600) -> list[subprocess.CompletedProcess]:
    procs = start_workers(mode, out, timeout)
    done = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return done


def reference(steps: int):
    """One process, the global batch as 2 micro-batches (micro i gets fold_in(key, i), as worker i)."""
    params = init_gpt2(random.key(0), W.CFG)
    opt = optim.chain(optim.clip_by_global_norm(W.MAX_NORM), W.make_opt())
    state = opt.init(params)
    step = make_train_step(W.loss_fn, opt, accum_steps=2, compile=False)
    for s in range(steps):
        micro = {k: v.reshape(2, W.BATCH // 2, *v.shape[1:]) for k, v in W.global_batch(s).items()}
        params, state, m = step(params, state, micro, random.key(100 + s))
    return flatten_names(params), float(m["loss"])


def check_ok(results):
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]


def test_every_level_equals_one_process_and_holds_a_1_over_n_share(tmp_path):
    check_ok(run_workers("equiv", tmp_path))
    ref, ref_loss = reference(W.STEPS)
    n = num_params(init_gpt2(random.key(0), W.CFG))
    for level in (0, 1, 2, 3):
        r0, _ = read_safetensors(tmp_path / f"rank0_level{level}.safetensors")
        r1, _ = read_safetensors(tmp_path / f"rank1_level{level}.safetensors")
        for name in ref:
            assert torch.equal(r0[name], r1[name]), (level, name)  # the workers agree bitwise
            torch.testing.assert_close(
                r0[name], ref[name], atol=2e-6, rtol=1e-5, msg=lambda m: f"level {level}, {name}: {m}"
            )
    c0, _ = read_safetensors(tmp_path / "rank0_compiled.safetensors")
    ref2, _ = reference(2)
    for name in ref2:
        torch.testing.assert_close(c0[name], ref2[name], atol=2e-6, rtol=1e-5)
    for rank in (0, 1):
        rep = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rep["unique_graphs"] == 1  # the level-3 step with its collectives is one graph
        assert abs(rep["loss3"] - ref_loss) < 1e-5
        assert rep["n"] == n and 0 < rep["padded"] - n < 2 * rep["groups"]  # odd groups: padding, < N per group
        p, count = rep["padded"], 8  # float32 elements of the padded vectors; AdamW's int64 step count
        expect = {0: 4 * 3 * p, 1: 4 * (p + 2 * p // 2), 2: 4 * (p + 2 * p // 2), 3: 4 * 3 * p // 2}
        for level, b in expect.items():
            assert rep[f"bytes{level}"] == b + count, (rank, level)
            assert rep[f"bytes_after{level}"] == b + count, (rank, level)  # no growth after steps
        assert rep["params_bytes3"] * 2 == 4 * p  # level 3: each worker holds half the parameters


@pytest.mark.slow  # two gloo workers for a minute or more
def test_sharded_checkpoints_move_between_2_and_1_workers(tmp_path):
    check_ok(run_workers("ckpt_save", tmp_path))
    params = init_gpt2(random.key(0), W.CFG)
    sh = Sharding(params, 1)  # this process: one worker, another level than the writers' 3
    held, state, step, key, extra = load_sharded(tmp_path / "ckpt2", sh)
    assert (step, extra) == (2, {"note": "two"}) and torch.equal(key, random.key(9))
    ref, _ = reference(2)
    full = sh.unshard(held)
    for name, x in flatten_names(full).items():
        torch.testing.assert_close(x, ref[name], atol=2e-6, rtol=1e-5)
    # the HF directory from the 2-worker gathered state is bitwise the one-process one
    save_gpt2(full, W.CFG, tmp_path / "hf_from_1")
    files = sorted(p.name for p in (tmp_path / "hf_from_2").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "hf_from_1").iterdir()) and "model.safetensors" in files
    for f in files:
        assert (tmp_path / "hf_from_2" / f).read_bytes() == (tmp_path / "hf_from_1" / f).read_bytes(), f
    # 1 -> 2: this process saves, two workers load (level 2) and take step 3; one process's run agrees
    save_sharded(tmp_path / "ckpt1", sh, held, state, step, key)
    check_ok(run_workers("ckpt_resume", tmp_path))
    resumed, _ = read_safetensors(tmp_path / "resumed_on_2.safetensors")
    ref3, _ = reference(3)
    for name in ref3:
        torch.testing.assert_close(resumed[name], ref3[name], atol=2e-6, rtol=1e-5)
    # a corrupted shard is refused by its checksum
    shard = tmp_path / "ckpt2" / "shard-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_sharded(tmp_path / "ckpt2", sh)


def test_a_dead_worker_stops_the_other_with_one_line(tmp_path):
    timeout = 30
    t0 = time.monotonic()
    r0, r1 = run_workers("dead", tmp_path, timeout=timeout, wait=240)
    elapsed = time.monotonic() - t0
    assert r1.returncode == 3
    assert r0.returncode == 1, r0.stderr[-2000:]
    lines = [
        ln for ln in r0.stderr.strip().splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith(" ")
    ]
    assert lines[-1].startswith("fnlm: worker 0 of 2: stopped at a collective"), r0.stderr[-2000:]
    assert sum(ln.startswith("fnlm: worker") for ln in lines) == 1
    assert "Traceback" not in r0.stderr
    assert elapsed < timeout + 120  # startup of two interpreters plus at most one timeout


@pytest.mark.slow  # two gloo workers for a minute or more
def test_a_stuck_worker_stops_the_other_after_the_collective_timeout(tmp_path):
    """Worker 1 stays alive but stops calling collectives: worker 0 exits with one line once the
    process group's timeout (10 s here) has passed, instead of waiting for ever."""
    timeout = 10
    p0, p1 = start_workers("dead", tmp_path, timeout=timeout, extra_env={"FNLM_TEST_STUCK": "1"})
    try:
        t0 = time.monotonic()
        _, err = p0.communicate(timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        p1.kill()
        p1.communicate()
    assert p0.returncode == 1, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fnlm: worker")]
    assert len(lines) == 1 and "within the 10 s timeout" in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert elapsed >= timeout  # it waited for the timeout (the peer was alive), then gave up


def test_single_process_layout_and_errors():
    params = init_gpt2(random.key(0), W.CFG)
    sh = Sharding(params, 3)
    held = sh.shard(params)
    assert set(flatten_names(held)) == set(sh.labels) and "layers_0.weight" in sh.labels
    for name, x in flatten_names(sh.unshard(held)).items():
        assert torch.equal(x, flatten_names(params)[name])
    with pytest.raises(ValueError, match="level"):
        Sharding(params, 4)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
    from fnlm.train import make_sharded_train_step

    with pytest.raises(ValueError, match="max_grad_norm"):
        make_sharded_train_step(W.loss_fn, opt, sh, compile=False)
    # one worker, accum_steps=2: make_train_step's accumulation (same micro keys fold_in(key, i))
    ref, _ = reference(2)
    step = make_sharded_train_step(W.loss_fn, W.make_opt(), sh, max_grad_norm=W.MAX_NORM, accum_steps=2, compile=False)
    state = sh.init(W.make_opt(), held)
    for s in range(2):
        micro = {k: v.reshape(2, W.BATCH // 2, *v.shape[1:]) for k, v in W.global_batch(s).items()}
        held, state, _ = step(held, state, micro, random.key(100 + s))
    for name, x in flatten_names(sh.unshard(held)).items():
        torch.testing.assert_close(x, ref[name], atol=2e-6, rtol=1e-5)


def test_nonfinite_skip_keeps_the_sharded_state_and_names_the_group():
    """One process (N = 1): a NaN gradient in one group is flagged for that group; 'skip' keeps the
    held parameters and the optimizer state; 'raise' names the group."""
    from fnlm.train import make_sharded_train_step

    params = init_gpt2(random.key(0), W.CFG)
    sh = Sharding(params, 3)
    held = sh.shard(params)
    opt = optim.adamw(1e-2)
    state = sh.init(opt, held)

    def bad_loss(p, batch, key):
        loss, aux = W.loss_fn(p, batch, key)
        return loss + 0 * p["layers"][1]["ffn"]["w1"]["weight"].sum() * float("nan"), aux

    step = make_sharded_train_step(bad_loss, opt, sh, compile=False, nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="layers_1"):
        new_held, new_state, m = step(held, state, W.global_batch(0), random.key(0))
    assert not bool(m["finite"])
    for a, b in zip(flatten_names(new_held).values(), flatten_names(held).values()):
        assert torch.equal(a, b)
    assert int(new_state.count) == 0
    step = make_sharded_train_step(bad_loss, opt, sh, compile=False)
    with pytest.raises(FloatingPointError, match="layers_1"):
        step(held, state, W.global_batch(0), random.key(0))
