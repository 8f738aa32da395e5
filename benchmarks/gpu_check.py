"""One command that checks fnlm on a GPU machine and prints one summary table.

    python benchmarks/gpu_check.py                   # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu      # smoke mode: every stage, tiny sizes, on the CPU

Stages (each in its own process, so one failure does not hide the others):

1. ``tests``: ``tests/test_device.py`` on the device: BERT parity against float64 on the CPU, the
   compiled bf16 step (float32 master weights), one-process NCCL collectives.
2. ``step``: ``benchmarks/train_step.py`` — BERT-base, 16 x 512, bf16 autocast: compiled fnlm (with
   keyed attention dropout, and with dropout inside the fused flash kernel: ``compiled-fused``) vs
   Hugging Face eager bf16, samples/s and MFU against the measured bf16 matmul peak.
3. ``cold compile``: the same compiled step's first call with an empty Inductor/Triton cache.
4. ``imdb``: ``examples/finetune_imdb.py`` on the full data (25k/25k, one epoch, MiniLM, 256 tokens):
   test accuracy and training time.
5. ``shard``: two GPUs, NCCL: ``benchmarks/shard_memory.py`` under ``torchrun --nproc_per_node=2``,
   GPT-2 350M, 8 x 1024 tokens, bf16 autocast, compiled: each sharding level (0-3) trains 3 steps;
   per-worker state and peak CUDA memory per level, and the largest parameter difference from
   level 0 (the levels compute the same training). Skipped (not failed) with fewer than 2 GPUs.

The smoke mode runs the same stages with tiny sizes (MiniLM 2 x 32, eager/HF only, ``aot_eager`` for
the compile checks, a 32-review eager IMDb run, the shard stage with two gloo CPU processes), so
that the first GPU run is not the script's first run; ``tests/test_benchmarks.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "aclImdb_v1_labelled.tar.gz"


def run(name: str, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> dict:
    """Run one stage; ``{'name', 'ok', 'seconds', 'tail'}``."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        ok, out = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        ok, out = False, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
    tail = "\n".join(out.strip().splitlines()[-12:])
    print(tail, flush=True)
    return {"name": name, "ok": ok, "seconds": time.time() - t0, "tail": tail}


def shard_stage(py: str, smoke: bool, tmp: Path) -> dict:
    """Stage 5: sharded training on two workers (NCCL; gloo on the CPU in smoke mode)."""
    import socket

    if not smoke:
        import torch

        if torch.cuda.device_count() < 2:
            return {
                "name": "shard",
                "ok": True,
                "seconds": 0.0,
                "tail": "",
                "result": f"skipped: needs 2 GPUs, found {torch.cuda.device_count()}",
            }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / "shard.json"
    sizes = (
        ["--model", "tiny", "--device", "cpu", "--compile", "none", "--steps", "1", "--batch", "4", "--seq", "32"]
        if smoke
        else ["--model", "gpt2-medium", "--batch", "8", "--seq", "1024", "--steps", "3"]
    )
    r = run(
        "shard",
        [
            py,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "benchmarks/shard_memory.py",
            *sizes,
            "--json",
            str(out),
        ],
        {"OMP_NUM_THREADS": "1"},
        timeout=1200,
    )
    if r["ok"]:
        res = json.loads(out.read_text())
        w0 = res["workers"][0]
        parts = [
            f"L{x['level']}: state {x['state_bytes'] / 2**20:.0f} MB, peak {x['peak_bytes'] / 2**20:.0f} MB" for x in w0
        ]
        diff = max(x["max_abs_diff_vs_first_level"] for w in res["workers"] for x in w)
        r["result"] = f"{res['params'] / 1e6:.0f}M params, worker 0: " + "; ".join(parts) + f"; max |diff| {diff:.1e}"
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (smoke mode: tiny sizes)")
    ap.add_argument("--data", type=Path, default=DATA, help="IMDb archive for the fine-tuning stage")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: tests,step,compile,imdb,shard")
    args = ap.parse_args(argv)
    smoke = args.device == "cpu"
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device here: run on a GPU machine, or use --device cpu for the smoke mode")
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "tests" not in skip:
            env = {"FNLM_TEST_DEVICE": args.device}
            if smoke:
                env["FNLM_TEST_COMPILE"] = "aot_eager"
            r = run("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py"], env)
            r["result"] = r["tail"].splitlines()[-1] if r["tail"] else ""
            rows.append(r)
        step_args = (
            ["--model", "minilm", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1", "--only", "eager,hf"]
            if smoke
            else [
                "--model",
                "bert-base",
                "--batch",
                "16",
                "--seq",
                "512",
                "--dtype",
                "bf16",
                "--steps",
                "10",
                "--warmup",
                "2",
                "--only",
                "compiled,compiled-fused,hf",
            ]
        )
        if "step" not in skip:
            out = tmp / "step.json"
            r = run("step", [py, "benchmarks/train_step.py", "--device", args.device, *step_args, "--json", str(out)])
            if r["ok"]:
                res = json.loads(out.read_text())
                parts = [
                    f"{name}: {v['samples_per_s']:.1f} samples/s, MFU {v['mfu']:.1%}"
                    for name, v in res["variants"].items()
                ]
                r["result"] = f"peak {res['peak_tflops']:.1f} TFLOP/s measured; " + "; ".join(parts)
            rows.append(r)
        if "compile" not in skip:
            out = tmp / "compile.json"
            cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"), "TRITON_CACHE_DIR": str(tmp / "triton")}
            only = ["--only", "compiled", "--steps", "1", "--warmup", "1"]
            cargs = (
                ["--model", "minilm", "--batch", "2", "--seq", "32", "--backend", "aot_eager"]
                if smoke
                else ["--model", "minilm", "--batch", "16", "--seq", "128", "--dtype", "bf16"]
            )
            r = run(
                "cold compile",
                [py, "benchmarks/train_step.py", "--device", args.device, *cargs, *only, "--json", str(out)],
                cache,
                timeout=900,
            )
            if r["ok"]:
                v = json.loads(out.read_text())["variants"]["fnlm compiled"]
                r["result"] = (
                    f"first step {v['warmup_s']:.1f} s with an empty cache (MiniLM classifier step"
                    f"{', aot_eager: tracing only' if smoke else ''})"
                )
            rows.append(r)
        if "imdb" not in skip:
            run_dir = tmp / "imdb"
            sizes = (
                [
                    "--train-size",
                    "32",
                    "--test-size",
                    "32",
                    "--val-size",
                    "16",
                    "--max-len",
                    "32",
                    "--batch-size",
                    "8",
                    "--no-compile",
                    "--dtype",
                    "fp32",
                ]
                if smoke
                else ["--train-size", "0", "--test-size", "0", "--max-len", "256", "--batch-size", "32"]
            )
            r = run(
                "imdb",
                [
                    py,
                    "examples/finetune_imdb.py",
                    "--data",
                    str(args.data),
                    "--device",
                    args.device,
                    "--out",
                    str(run_dir),
                    *sizes,
                ],
                timeout=1800,
            )
            if r["ok"]:
                m = json.loads((run_dir / "metrics.json").read_text())
                train_s = sum(e.get("train_seconds") or 0 for e in m["epochs"])
                r["result"] = (
                    f"test accuracy {m['final_test_accuracy']:.4f} on {m['test_size']} reviews; "
                    f"training {train_s:.0f} s for {m['train_size']} reviews"
                )
            rows.append(r)
        if "shard" not in skip:
            rows.append(shard_stage(py, smoke, tmp))
    print(f"\nfnlm GPU check on {args.device}{' (smoke mode: tiny sizes)' if smoke else ''}")
    print(f"{'stage':<14}{'ok':<6}{'seconds':>8}  result")
    for r in rows:
        result = r.get("result") or ("" if r["ok"] else r["tail"].splitlines()[-1] if r["tail"] else "failed")
        print(f"{r['name']:<14}{'yes' if r['ok'] else 'NO':<6}{r['seconds']:>8.0f}  {result}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
