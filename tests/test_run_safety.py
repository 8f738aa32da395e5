"""A run directory never loses its last good state: fnlm.train.RunCheckpoints' run id, pruning, best
parameters, one-writer lock, and fnlm.io.atomic_dir's rename window (issue 21, item 2).

Every check of "intact" reads the files back with safetensors' own loader and compares them with
the tensors that were saved (``torch.equal``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fnlm import optim, random
from fnlm.config import option
from fnlm.io import _safetensors as st
from fnlm.io import atomic_dir
from fnlm.train import ResumeError, Run, RunCheckpoints, RunInUseError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _params(scale: float) -> dict:
    return {"w": torch.full((3, 4), float(scale)), "layers": [{"b": torch.arange(4.0) * scale}]}


OPT = optim.adamw(1e-3)


def _save(ckpts: RunCheckpoints, step: int, **kw):
    p = _params(step)
    return ckpts.save(p, OPT.init(p), step, random.fold_in(random.key(0), step), {"step": step}, **kw)


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _intact_steps(run_dir: Path) -> list[int]:
    """Steps whose tensors file loads (safetensors' loader) and holds exactly what was saved."""
    out = []
    for d in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(d.name.split("-")[1])
        try:
            t = load_file(str(d / "tensors.safetensors"))
        except Exception:
            continue
        if torch.equal(t["params.w"], _params(step)["w"]) and torch.equal(
            t["params.layers.0.b"], _params(step)["layers"][0]["b"]
        ):
            out.append(step)
    return out


def _quiet_restore(ckpts: RunCheckpoints):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        state = ckpts.restore()
    return state, [str(x.message) for x in w]


# ----------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("keep_before,keep_after", [(3, 3), (3, 1), (2, 1)])
def test_resume_past_damaged_checkpoints_then_save_keeps_an_intact_one(tmp_path, keep_before, keep_after):
    """Fallback past damaged newer checkpoints, then a save (also with --keep-checkpoints lowered)."""
    with RunCheckpoints(tmp_path, {"lr": 1}, keep=keep_before) as run:
        for s in (3, 6, 9):
            _save(run, s)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    for name in names[1:]:  # all but the oldest damaged
        _corrupt(tmp_path / "checkpoints" / name / "tensors.safetensors")
    oldest = int(names[0].split("-")[1])
    with RunCheckpoints(tmp_path, {"lr": 1}, keep=keep_after) as run:
        state, warned = _quiet_restore(run)
        assert state.step == oldest and sum("skipping checkpoint" in m for m in warned) == len(names) - 1
        assert oldest in _intact_steps(tmp_path)
        _save(run, oldest + 1)
        assert oldest + 1 in _intact_steps(tmp_path)
    state, _ = _quiet_restore(RunCheckpoints(tmp_path, {"lr": 1}))
    assert state.step == oldest + 1 and torch.equal(state.params["w"], _params(oldest + 1)["w"])


def test_a_failed_save_after_resume_keeps_the_checkpoint_resumed_from(tmp_path, monkeypatch):
    with RunCheckpoints(tmp_path, {}, keep=1) as run:
        _save(run, 4)
    with RunCheckpoints(tmp_path, {}, keep=1) as run:
        assert run.restore().step == 4
        from fnlm.train import _checkpoint

        def disk_full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(_checkpoint, "write_safetensors", disk_full)
        with pytest.raises(OSError, match="No space left"):
            _save(run, 5)
    assert _intact_steps(tmp_path) == [4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004"]


def test_foreign_and_unparsable_folders_are_ignored_with_a_warning_and_never_pruned(tmp_path):
    other = tmp_path / "other"
    with RunCheckpoints(other, {}, keep=2) as run:
        _save(run, 90)
    with RunCheckpoints(tmp_path / "run", {}, keep=1) as run:
        _save(run, 2)
        # a higher-numbered step folder of another run, and one whose metadata cannot be read
        os.rename(other / "checkpoints" / "step-00000090", tmp_path / "run" / "checkpoints" / "step-00000090")
        junk = tmp_path / "run" / "checkpoints" / "step-00000091"
        junk.mkdir()
        (junk / "train_state.json").write_text("{not json")
        with pytest.warns(RuntimeWarning) as rec:
            _save(run, 4)
            _save(run, 6)
    msgs = [str(w.message) for w in rec]
    assert any("step-00000090" in m and "belongs to run" in m for m in msgs)
    assert any("step-00000091" in m and "no readable run id" in m for m in msgs)
    assert sum("step-00000090" in m for m in msgs) == 1  # warned once, not at every save
    assert _intact_steps(tmp_path / "run") == [6, 90]  # its own newest (keep=1), the foreign one untouched
    assert (junk / "train_state.json").read_text() == "{not json"
    state, warned = _quiet_restore(RunCheckpoints(tmp_path / "run", {}))
    assert sorted(m.split()[1].rsplit("/", 1)[1] for m in warned) == ["step-00000090", "step-00000091"]
    assert state.step == 6 and torch.equal(state.params["w"], _params(6)["w"])


def test_a_directory_whose_checkpoints_are_all_foreign_does_not_resume(tmp_path):
    with RunCheckpoints(tmp_path / "a", {}) as run:
        _save(run, 1)
    (tmp_path / "a" / "run.json").write_text(json.dumps({"run_id": "someone-else"}))
    with pytest.warns(RuntimeWarning, match="belongs to run"):
        with pytest.raises(ResumeError, match="none of its checkpoints belongs to this run") as e:
            RunCheckpoints(tmp_path / "a", {}).restore()
    assert "\n" not in str(e.value)
    assert _intact_steps(tmp_path / "a") == [1]


# ----------------------------------------------------------------------------- best parameters
@pytest.mark.parametrize("damage", ["flip", "delete", "foreign", "swapped"])
def test_damaged_or_foreign_best_params_cost_only_the_best_params(tmp_path, damage):
    with RunCheckpoints(tmp_path / "run", {}, keep=2) as run:
        _save(run, 2, best=(1, _params(100)))
        _save(run, 3, best=(1, _params(100)))
    best = tmp_path / "run" / "checkpoints" / "best-step-00000001"
    if damage == "flip":
        _corrupt(best / "params.safetensors")
    elif damage == "delete":
        (best / "params.safetensors").unlink()
    else:  # another run's best parameters of the same step put in its place
        with RunCheckpoints(tmp_path / "other", {}) as other:
            _save(other, 2, best=(1, _params(-5)))
        src = tmp_path / "other" / "checkpoints" / "best-step-00000001"
        if damage == "swapped":  # only the tensors file, the run id in checksums.json kept
            sums = json.loads((best / "checksums.json").read_text())
            os.replace(src / "params.safetensors", best / "params.safetensors")
            sums["sha256"]["params.safetensors"] = json.loads((src / "checksums.json").read_text())["sha256"][
                "params.safetensors"
            ]
            (best / "checksums.json").write_text(json.dumps(sums))
        else:
            import shutil

            shutil.rmtree(best)
            os.rename(src, best)
    with pytest.warns(RuntimeWarning, match="best parameters of step 1 unusable.*falling back to the last step's"):
        state = RunCheckpoints(tmp_path / "run", {}).restore()
    assert state.step == 3 and torch.equal(state.params["w"], _params(3)["w"])
    assert state.best_step == 3 and torch.equal(state.best_params["w"], _params(3)["w"])


def test_intact_best_params_are_restored_with_their_step(tmp_path):
    with RunCheckpoints(tmp_path, {}, keep=1) as run:
        _save(run, 2, best=(1, _params(100)))
    state = RunCheckpoints(tmp_path, {}).restore()
    assert state.best_step == 1 and torch.equal(state.best_params["w"], _params(100)["w"])


# ----------------------------------------------------------------------------- one writer
HOLDER = textwrap.dedent("""
    import sys, time
    from fnlm.train import RunCheckpoints
    run = RunCheckpoints(sys.argv[1], {}).start()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_writer_is_refused_naming_the_pid_and_a_dead_owner_is_taken_over(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=rf"in use by process {p.pid} ") as e:
            RunCheckpoints(tmp_path, {}).start()
        assert "\n" not in str(e.value) and isinstance(e.value, OSError)
        assert RunCheckpoints.in_use(tmp_path).startswith(f"process {p.pid} ")
        with pytest.raises(RunInUseError):  # save starts the run too
            _save(RunCheckpoints(tmp_path, {}), 1)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        p.kill()
        p.wait()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == p.pid  # a stale lock: its owner died
    run = RunCheckpoints(tmp_path, {}).start()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert RunCheckpoints.in_use(tmp_path) is not None
    _save(run, 1)
    run.close()
    assert not (tmp_path / "run.lock").exists() and RunCheckpoints.in_use(tmp_path) is None


def test_the_run_id_is_written_once_and_kept(tmp_path):
    with RunCheckpoints(tmp_path, {}) as run:
        rid = run.run_id
        _save(run, 1)
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == rid
    with RunCheckpoints(tmp_path, {}) as run:
        assert run.run_id == rid
    (tmp_path / "run.json").write_text("{trunc")
    with pytest.raises(ValueError, match=r"run\.json: unreadable") as e:
        RunCheckpoints(tmp_path, {}).start()
    assert "\n" not in str(e.value)
    assert RunCheckpoints.in_use(tmp_path) is None  # the failed start released the lock


# ----------------------------------------------------------------------------- the rename window
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from fnlm import optim, random
    from fnlm.io import _safetensors as st
    from fnlm.train import RunCheckpoints
    import torch

    run_dir, mode = sys.argv[1], sys.argv[2]
    final = "step-00000002"
    real_replace, real_exchange = os.replace, st._exchange

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "fallback":  # no renameat2: killed between moving the old aside and the new in
        st._exchange = lambda a, b: False
        def replace(a, b):
            real_replace(a, b)
            if Path(a).name == final:
                die()
        os.replace = replace
    else:
        def exchange(a, b):
            if Path(b).name == final and mode == "before":
                die()
            ok = real_exchange(a, b)
            if Path(b).name == final and mode == "after":
                die()
            return ok
        st._exchange = exchange
    params = {"w": torch.full((3, 4), 7.0), "layers": [{"b": torch.arange(4.0) * 7}]}
    run = RunCheckpoints(run_dir, {}, keep=2).start()
    run.save(params, optim.adamw(1e-3).init(params), 2, random.key(0), {"step": 2})
""")


@pytest.mark.parametrize("mode", ["fallback", "before", "after"])
def test_a_kill_during_the_renames_leaves_a_complete_checkpoint_under_the_final_name(tmp_path, mode):
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir(), b.mkdir()
    if mode != "fallback" and not st._exchange(a, b):
        pytest.skip("this filesystem cannot exchange directories (renameat2)")
    run_dir = tmp_path / "run"
    with RunCheckpoints(run_dir, {}, keep=2) as run:
        _save(run, 1)
        _save(run, 2)  # the state a re-save of step 2 replaces (the killed process writes 7s)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(run_dir), mode], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    final = run_dir / "checkpoints" / "step-00000002"
    if mode == "fallback":
        assert not final.exists() and final.with_name(".step-00000002.old").is_dir()  # the window
    with RunCheckpoints(run_dir, {}, keep=2) as run:  # starting the run puts the previous one back
        state, warned = _quiet_restore(run)
        assert not [m for m in warned if "skipping" in m]
        assert state.step == 2
        want = 7.0 if mode == "after" else 2.0
        assert torch.equal(state.params["w"], torch.full((3, 4), want))
        _save(run, 3)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def test_atomic_dir_puts_back_a_leftover_old_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "f").write_text("previous")
    os.rename(target, tmp_path / ".model.old")  # what a kill between the fallback's renames leaves
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            raise RuntimeError("failed build")
    assert (target / "f").read_text() == "previous" and not (tmp_path / ".model.old").exists()


# ----------------------------------------------------------------------------- fnlm.train.Run
@dataclass(frozen=True)
class _Cfg:
    lr: float = option(0.1, "learning rate")
    steps: int = option(4, "steps")
    keep_checkpoints: int = option(2, "checkpoints kept")


def _open(tmp_path, **kw):
    return Run.open(
        _Cfg(**{k: v for k, v in kw.items() if k in ("steps",)}),
        {k for k in kw if k in ("steps",)},
        out=None if kw.get("resume") else tmp_path / "run",
        resume=kw.get("resume"),
        may_change=("steps", "keep_checkpoints"),
        script="train.py",
    )


def test_run_holds_the_lock_until_finish_and_an_extension_keeps_the_run_id(tmp_path):
    run = _open(tmp_path)
    ckpts = run.checkpoints({"data": "sha256:x"}, keep=1)
    assert RunCheckpoints.in_use(run.dir) is not None
    with pytest.raises(RunInUseError):
        RunCheckpoints(run.dir, {}).start()
    _save(ckpts, 2)
    _save(ckpts, 4)
    rid = ckpts.run_id
    with run.finish(ckpts) as out:
        (out / "model.txt").write_text("done")
    final = tmp_path / "run"
    assert not run.dir.exists() and json.loads((final / "run.json").read_text())["run_id"] == rid
    assert _intact_steps(final) == [4]
    ext = _open(tmp_path, resume=final, steps=8)
    ckpts = ext.checkpoints({"data": "sha256:x"}, keep=1)
    assert ckpts.run_id == rid
    state = ext.restore(ckpts)
    assert state.step == 4 and torch.equal(state.params["w"], _params(4)["w"])
    ext.close()
    assert RunCheckpoints.in_use(ext.dir) is None
