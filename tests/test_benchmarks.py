"""The benchmark scripts import (so they cannot rot silently when the library moves): each is
loaded as a module, which runs its imports and definitions but not ``main()``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_script_imports_and_has_main(path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


@pytest.mark.slow  # every stage, tiny sizes, but one cold compile and two gloo workers: minutes on 2 cores
def test_gpu_check_smoke_mode_runs_every_stage_on_the_cpu(imdb_archive, minilm_dir):
    """benchmarks/gpu_check.py --device cpu: every stage but shard runs and the summary table says so."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        # the shard stage's two gloo workers are tests/test_shard.py's; here the other stages
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--data", str(imdb_archive), "--skip", "shard"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("fnlm GPU check on cpu") :]
    for stage in ("tests", "step", "cold compile", "imdb"):
        row = next(line for line in table.splitlines() if line.startswith(stage))
        assert row[14:].startswith("yes"), row
    assert "3 passed" in table and "samples/s" in table and "test accuracy" in table


def test_imdb_reference_runs_the_hf_reference_and_reads_an_fnlm_run(imdb_archive, minilm_dir, tmp_path):
    """benchmarks/imdb_reference.py on 32/32 reviews: the HF reference and TF-IDF run, an existing fnlm
    run directory is read (its settings must match), and the table compares it with the reference."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    settings = {
        "train_size": 32,
        "test_size": 32,
        "max_len": 64,
        "truncation": "head+tail",
        "buckets": "auto",
        "epochs": 1,
        "batch_size": 16,
        "lr": 1e-4,
        "warmup": 0.1,
        "weight_decay": 0.01,
        "clip": 1.0,
        "seed": 0,
    }
    run = tmp_path / "run"
    run.mkdir()
    epoch = {"train_seconds": 30.0, "eval_seconds": 1.0}
    steps = [
        {"kind": "train", "step": 1, "length": 64, "seconds": 20.0},
        {"kind": "eval", "step": 1},
        {"kind": "train", "step": 2, "length": 64, "seconds": 4.0},
        {"kind": "train", "step": 3, "length": 32, "seconds": 6.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (run / "metrics.json").write_text(
        json.dumps(
            {"args": {**settings, "dtype": "bf16"}, "final_test_accuracy": 0.5, "epochs": [epoch], "wall_seconds": 40.0}
        )
    )
    cmd = [
        sys.executable,
        "benchmarks/imdb_reference.py",
        "--data",
        str(imdb_archive),
        "--weights",
        str(minilm_dir),
        "--train-size",
        "32",
        "--test-size",
        "32",
        "--max-len",
        "64",
        "--fnlm-run",
        str(run),
        "--json",
        str(tmp_path / "out.json"),
    ]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    hf = out["hf_reference"]
    assert 0.0 <= hf["accuracy"] <= 1.0 and hf["train_seconds"] > 0 and 0.0 <= out["tfidf_logreg"]["accuracy"] <= 1.0
    given = out["fnlm"]["given run"]
    assert given["dtype"] == "bf16" and given["train_seconds"] == 30.0
    # the first step of each padded length compiles it; the others run at batch 16 / their seconds
    assert given["compile_and_first_steps_seconds"] == 26.0 and given["examples_per_s_after_compile"] == 16 / 4.0
    row = next(line for line in proc.stdout.splitlines() if line.startswith("fnlm given run"))
    assert f"{30.0 / hf['train_seconds']:.2f}" in row  # its time as a fraction of the reference's

    # a run made with other settings is refused, naming the setting
    (run / "metrics.json").write_text(
        json.dumps({"args": {**settings, "seed": 1, "dtype": "bf16"}, "final_test_accuracy": 0.5, "epochs": [epoch]})
    )
    proc = subprocess.run(cmd[:-2] + ["--skip", "hf", "tfidf"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "seed=1" in proc.stderr
