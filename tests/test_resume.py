"""Runs that survive interruption: fnlm.train.RunCheckpoints / GracefulStop (library), and the
examples that use them (finetune_imdb.py, hello_fnlm.py) killed and resumed as a user would."""
from __future__ import annotations

import json
import os
import signal
import warnings

import pytest
import torch

from fnlm import optim, random
from fnlm.train import GracefulStop, ResumeError, RunCheckpoints, digest


def _state(seed: int = 0):
    k1, k2 = random.split(random.key(seed))
    params = {"w": random.normal(k1, (3, 4)), "layers": [{"b": random.normal(k2, (4,))}]}
    opt = optim.adamw(1e-3)
    return params, opt.init(params)


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_save_restore_keeps_last_k(tmp_path):
    params, opt_state = _state()
    run = RunCheckpoints(tmp_path / "run", {"lr": 1e-3}, keep=2)
    assert run.restore() is None  # a fresh run: nothing to resume
    for step in (10, 20, 30):
        run.save(params, opt_state, step, random.fold_in(random.key(0), step), {"pos": step // 10})
    assert [p.name for p in run.checkpoints()] == ["step-00000020", "step-00000030"]
    st = RunCheckpoints(tmp_path / "run", {"lr": 1e-3}).restore()
    assert st.step == 30 and st.extra == {"pos": 3} and st.best_params is None
    assert torch.equal(st.key, random.fold_in(random.key(0), 30))
    assert torch.equal(st.params["layers"][0]["b"], params["layers"][0]["b"])
    assert type(st.opt_state) is type(opt_state) and torch.equal(st.opt_state.count, opt_state.count)
    assert RunCheckpoints.saved_config(tmp_path / "run") == {"lr": 1e-3}
    assert len(run.seconds) == 3 and all(s > 0 for s in run.seconds)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_sums"])
def test_corrupted_latest_falls_back_with_warning(tmp_path, damage):
    params, opt_state = _state()
    run = RunCheckpoints(tmp_path, {"lr": 1e-3}, keep=3)
    run.save(params, opt_state, 1, random.key(1))
    params2 = {"w": params["w"] + 1, "layers": params["layers"]}
    latest = run.save(params2, opt_state, 2, random.key(2))
    f = latest / "tensors.safetensors"
    if damage == "flip":
        _corrupt(f)
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    else:
        (latest / "checksums.json").unlink()
    with pytest.warns(RuntimeWarning, match="skipping checkpoint step-00000002"):
        st = run.restore()
    assert st.step == 1 and torch.equal(st.params["w"], params["w"])


def test_no_intact_checkpoint_is_a_clear_error_and_nothing_is_touched(tmp_path):
    params, opt_state = _state()
    run = RunCheckpoints(tmp_path, {}, keep=2)
    for step in (1, 2):
        _corrupt(run.save(params, opt_state, step, random.key(0)) / "tensors.safetensors")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ResumeError, match=r"none of its 2 checkpoint\(s\) is intact.*checksum mismatch") as e:
            run.restore()
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("changed", [{"lr": 2e-3}, {"data": "sha256:other"}, {"extra_setting": 1}])
def test_different_configuration_names_the_setting(tmp_path, changed):
    params, opt_state = _state()
    config = {"lr": 1e-3, "data": "sha256:abc", "max-len": 64}
    RunCheckpoints(tmp_path, config).save(params, opt_state, 5, random.key(0))
    name = next(iter(changed))
    with pytest.raises(ResumeError, match=rf"^cannot resume .*: {name} differs") as e:
        RunCheckpoints(tmp_path, config | changed).restore()
    assert "\n" not in str(e.value)


def test_best_params_follow_the_checkpoints_that_refer_to_them(tmp_path):
    params, opt_state = _state()
    run = RunCheckpoints(tmp_path, {}, keep=2)
    bests = {s: {"w": params["w"] * s, "layers": params["layers"]} for s in (1, 3)}
    run.save(params, opt_state, 2, random.key(0), best=(1, bests[1]))
    run.save(params, opt_state, 4, random.key(0), best=(3, bests[3]))
    run.save(params, opt_state, 6, random.key(0), best=(3, bests[3]))
    # step 2 (the only one referring to best-step 1) was pruned, and best-step 1 with it
    assert sorted(p.name for p in run.dir.iterdir()) == ["best-step-00000003", "step-00000004", "step-00000006"]
    st = run.restore()
    assert st.step == 6 and torch.equal(st.best_params["w"], bests[3]["w"])
    assert torch.equal(st.best_params["layers"][0]["b"], params["layers"][0]["b"])


def test_digest_sees_values_dtypes_and_names():
    t = torch.arange(6.0).reshape(2, 3)
    d = digest({"a": t, "n": 3})
    assert d.startswith("sha256:") and d == digest({"a": t.clone(), "n": 3})
    assert len({d, digest({"a": t + 1e-6, "n": 3}), digest({"a": t.double(), "n": 3}), digest({"b": t, "n": 3}),
                digest({"a": t, "n": 4})}) == 5


def test_graceful_stop_first_signal_flags_second_interrupts():
    old = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is old
