"""What a train-state checkpoint costs: fnlm.train.RunCheckpoints.save of a BERT classifier's
params + AdamW state (as examples/finetune_imdb.py saves them), and the share of a run it takes.

    python benchmarks/checkpoint.py                                  # all-MiniLM-L6-v2, 5 saves
    python benchmarks/checkpoint.py --step-seconds 2.0 --every 200   # also: the share of a run

Each save writes the params (fp32), AdamW's two moments, the key and a JSON ``extra`` through
``save_train_state`` into a temporary directory, hashes every file (sha256) into ``checksums.json``
(with the run id), flushes the files to disk (fsync), renames it into place, checks it under its
final name, then prunes to the newest ``--keep`` intact checkpoints of the run. The run's lock and
run id are taken once, before the first save (:meth:`RunCheckpoints.start`). Reported: seconds per save (median, min,
max), the bytes written, and, given the seconds per training step, the share of training that
checkpointing every ``--every`` steps costs: ``t_save / (every * t_step + t_save)``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fnlm import optim, random
from fnlm.models import load_bert
from fnlm.train import RunCheckpoints

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=ROOT / "weights" / "all-MiniLM-L6-v2")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--step-seconds", type=float, default=None, help="seconds per training step, for the share")
    ap.add_argument("--every", type=int, default=200, help="checkpoint every N steps, for the share")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args(argv)

    params, _ = load_bert(args.weights, head="classifier", num_labels=2, head_key=random.key(0))
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.inject_hyperparams(optim.adamw)(lr=optim.constant(1e-4), weight_decay=0.01),
    )
    opt_state = opt.init(params)
    extra = {"epoch": 1, "batch": 100, "step_losses": [0.5] * 1000}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run = RunCheckpoints(Path(tmp) / "run", {"lr": 1e-4}, keep=args.keep).start()
        for step in range(1, args.saves + 1):
            run.save(params, opt_state, step, random.key(0), extra, best=(step, params))
        size = sum(f.stat().st_size for f in run.checkpoints()[-1].rglob("*") if f.is_file())
        best = sum(f.stat().st_size for f in sorted(run.dir.glob("best-step-*"))[-1].iterdir())
        t0 = time.perf_counter()
        state = run.restore()
        restore_s = time.perf_counter() - t0
        assert state is not None and state.step == args.saves
        run.close()
    s = run.seconds
    print(
        f"{args.weights.name}: checkpoint {size / 1e6:.0f} MB (+ {best / 1e6:.0f} MB of best params when they changed)"
    )
    print(
        f"save (train state + best params + sha256 + rename + prune), {len(s)} saves: median {statistics.median(s):.2f}s, "
        f"min {min(s):.2f}s, max {max(s):.2f}s; restore (verify + load): {restore_s:.2f}s"
    )
    if args.step_seconds:
        t = statistics.median(s)
        print(
            f"every {args.every} steps at {args.step_seconds:.2f}s/step: {t / (args.every * args.step_seconds + t):.2%} "
            "of training time"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
