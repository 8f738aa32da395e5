"""fnlm.train.CompileCache: compiled steps saved once per machine and loaded by the next process
without tracing; background compilation that keeps the caller's keys and data order."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from _compile_step import setup  # a module, so that the saved graph can name its loss function

from fnlm import random
from fnlm.train import CompileCache, UnsafeCacheError, make_eval_step
from fnlm.tree import tree_allclose


def run(params, opt_state, batches, step, *, wait_after: int | None = None):
    """Train on ``batches`` with keys ``fold_in(key(0), i)``; ``wait_after``: let the background compile finish then."""
    losses = []
    for i, b in enumerate(batches):
        params, opt_state, m = step(params, opt_state, b, random.fold_in(random.key(0), i))
        losses.append(float(m["loss"]))
        if wait_after is not None and i + 1 == wait_after:
            assert step.wait(timeout=600)
    return params, losses


def test_a_second_process_loads_the_step_and_compiles_nothing(tmp_path):
    """Process 1 compiles and saves; process 2 loads: dynamo traces no frame and no kernel is compiled
    there (Inductor's kernel cache gains no file), and both processes' trained parameters equal the
    eager step's."""
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import torch
            from torch._dynamo.utils import counters
            from fnlm import random
            from _compile_step import setup
            params, opt_state, batches, step = setup(sys.argv[1])
            for i, b in enumerate(batches):
                params, opt_state, m = step(params, opt_state, b, random.fold_in(random.key(0), i))
            torch.save(params, sys.argv[2])
            print("EVENTS", [e[0] for e in step.compiled.events])
            print("FRAMES", counters["stats"]["unique_graphs"])
            """
        )
    )
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    outs, kernels = [], []
    for i in range(2):
        kernels.append(sorted(p for p in (tmp_path / "inductor").rglob("*") if p.is_file()))
        r = subprocess.run(
            [sys.executable, str(script), str(cache), str(tmp_path / f"p{i}.pt")],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(r.stdout)
    assert "EVENTS ['compiled']" in outs[0], outs[0]
    assert "EVENTS ['loaded']" in outs[1], outs[1]
    assert "FRAMES 0" in outs[1], outs[1]
    assert "FRAMES 0" not in outs[0]  # the first process did trace: the counters can tell
    assert not kernels[0] and kernels[1]  # process 1 compiled kernels into Inductor's cache ...
    after = sorted(p for p in (tmp_path / "inductor").rglob("*") if p.is_file())
    assert [p for p in after if p not in kernels[1]] == []  # ... process 2 compiled none
    assert len(list(cache.glob("*.pt2"))) == 1
    p_eager, _ = run(*setup(None))
    for i in range(2):
        assert tree_allclose(torch.load(tmp_path / f"p{i}.pt"), p_eager, rtol=1e-5, atol=1e-6)


def test_background_compile_keeps_keys_and_data_order(tmp_path):
    """Eager steps while the graph compiles, then compiled ones: the same training as eager
    throughout (same keys, same batches), within float rounding."""
    params, opt_state, batches, step = setup(tmp_path / "cache", background=True)
    p_bg, losses_bg = run(params, opt_state, batches, step, wait_after=2)
    assert step.compiled.eager_calls >= 1  # the first step did not wait for the compile
    assert step.compiled.eager_calls <= 2  # ... and after wait() every step ran the graph
    assert [e[0] for e in step.compiled.events] == ["compiled"]
    p_eager, losses_eager = run(*setup(None))
    assert tree_allclose(p_bg, p_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses_bg), torch.tensor(losses_eager), rtol=1e-5, atol=1e-6)


def test_a_damaged_cache_file_is_compiled_again_with_a_warning(tmp_path):
    params, opt_state, batches, step = setup(tmp_path / "cache")
    key = random.key(0)
    step(params, opt_state, batches[0], key)
    (path,) = (tmp_path / "cache").glob("*.pt2")
    path.write_bytes(path.read_bytes()[:100])  # a truncated write
    params, opt_state, batches, step = setup(tmp_path / "cache")
    with pytest.warns(UserWarning, match="could not be loaded"):
        p1, _, _ = step(params, opt_state, batches[0], key)
    assert [e[0] for e in step.compiled.events] == ["compiled"]
    eager_step = setup(None)[3]
    p_eager, _, _ = eager_step(params, opt_state, batches[0], key)
    assert tree_allclose(p1, p_eager, rtol=1e-5, atol=1e-6)
    assert path.stat().st_size > 1000  # replaced by a whole file


def test_a_cache_directory_others_can_write_is_refused(tmp_path):
    cache_dir = tmp_path / "shared"
    cache_dir.mkdir()
    cache_dir.chmod(0o777)
    params, opt_state, batches, step = setup(cache_dir)
    with pytest.raises(UnsafeCacheError, match="writable by others"):
        step(params, opt_state, batches[0], random.key(0))
    assert not list(cache_dir.iterdir())  # refused before anything was written


def test_new_directories_are_private_and_keys_and_shapes_name_different_files(tmp_path):
    cache = CompileCache(tmp_path / "a" / "b", key="k1")
    assert (cache.ready().stat().st_mode & 0o777) == 0o700
    other = CompileCache(tmp_path / "a" / "b", key="k2")
    assert cache.path("step", "sig") != other.path("step", "sig")
    assert cache.path("step", "sig") != cache.path("step", "sig2")
    assert cache.path("step", "sig") != cache.path("eval", "sig")


def test_a_cache_needs_inductor_and_static_shapes(tmp_path):
    cache = CompileCache(tmp_path, key="k")
    with pytest.raises(ValueError, match="compile=True"):
        make_eval_step(lambda p, x: x, compile="aot_eager", cache=cache)
    with pytest.raises(ValueError, match="dynamic=False"):
        make_eval_step(lambda p, x: x, dynamic=True, cache=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn = lambda p, x: x  # noqa: E731
        assert make_eval_step(fn, compile=False, cache=cache).compiled is fn  # no compile: nothing cached
