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


def test_gpu_check_smoke_mode_runs_every_stage_on_the_cpu(imdb_archive, minilm_dir):
    """benchmarks/gpu_check.py --device cpu: every stage runs and the summary table says so."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--data", str(imdb_archive)],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("fnlm GPU check on cpu"):]
    for stage in ("tests", "step", "cold compile", "imdb"):
        row = next(line for line in table.splitlines() if line.startswith(stage))
        assert row[14:].startswith("yes"), row
    assert "3 passed" in table and "samples/s" in table and "test accuracy" in table
