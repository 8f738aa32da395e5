"""Per-worker memory of a sharded GPT-2 training step at each level (``fnlm.train.Sharding``).

    torchrun --nproc_per_node=2 benchmarks/shard_memory.py                    # 2 GPUs (NCCL): GPT-2 350M
    torchrun --nproc_per_node=2 benchmarks/shard_memory.py --model tiny --device cpu --compile none
    python benchmarks/shard_memory.py --paper                                 # the docs/scaling.md tables

Measured mode: every worker builds the same GPT-2, and for each level in ``--levels`` trains
``--steps`` steps (its share of a ``--batch`` x ``--seq`` global batch, AdamW, clipping at 1.0) and
reports the bytes of the state it holds (parameters + optimizer state, from the tensors), the peak
memory of the steps (CUDA: ``torch.cuda.max_memory_allocated``, reset between levels; CPU: the
process's peak RSS, which only grows, so on CPU run one level per process with ``--levels L``),
and the largest difference of the final parameters from level 0's (all levels compute the same
training up to float rounding). Worker 0 prints one table; ``--json`` writes it.

``--paper``: no training; the formulas of :func:`fnlm.train.shard_costs` (bytes per worker,
bytes sent per step) and ``6 n + 12 L d s`` FLOPs per token for BERT-base and the GPT-2 sizes on
``--world`` GPUs of ``--gpu-gb`` GB, with the stated bandwidth and throughput assumptions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, n_layer, n_embd, n_head, vocab, context)
MODELS = {
    "tiny": (2, 64, 4, 512, 64),
    "gpt2": (12, 768, 12, 50257, 1024),
    "gpt2-medium": (24, 1024, 16, 50257, 1024),
    "gpt2-large": (36, 1280, 20, 50257, 1024),
    "gpt2-xl": (48, 1600, 25, 50257, 1024),
}


def gpt2_params(n_layer: int, d: int, vocab: int, ctx: int) -> int:
    """GPT-2's parameter count (tied head): ``V d + S d + L (12 d^2 + 13 d) + 2 d``."""
    return vocab * d + ctx * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def bert_base_params() -> int:
    """BERT-base with pooler: embeddings (30522 + 512 + 2) x 768 + LN, 12 layers, pooler."""
    d, L = 768, 12
    return (30522 + 512 + 2) * d + 2 * d + L * (12 * d * d + 13 * d) + d * d + d


def paper(args) -> int:
    from fnlm.train import shard_costs

    N, GB = args.world, 1e9
    rows = [("BERT-base", bert_base_params(), 12, 768, 512)]
    rows += [(name, gpt2_params(L, d, V, S), L, d, S) for name, (L, d, _, V, S) in MODELS.items() if name != "tiny"]
    budget = args.gpu_gb * GB
    print(
        f"Per-worker bytes on {N} workers (float32 weights and gradients, AdamW moments float32; "
        "activations excluded)\n"
    )
    print("| model | parameters | level | resident GB | peak in step GB | sent per step GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, *_ in rows:
        for level in (0, 1, 2, 3):
            c = shard_costs(n, level, N)
            print(
                f"| {name} | {n / 1e6:.0f}M | {level} | {c['resident'] / GB:.2f} | {c['peak'] / GB:.2f} | "
                f"{c['sent'] / GB:.2f} |"
            )
    print(
        f"\nCommunication against compute per step, {args.tokens} tokens per worker, "
        f"{args.tflops:g} TFLOP/s achieved, {args.bus_gbs:g} GB/s per worker (ring collectives)\n"
    )
    print("| model | compute ms | level 0 comm ms | level 1 | level 2 | level 3 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, L, d, S in rows:
        flops = (6 * n + 12 * L * d * S) * args.tokens
        ms = 1e3 * flops / (args.tflops * 1e12)
        comm = [1e3 * shard_costs(n, lv, N)["sent"] / (args.bus_gbs * 1e9) for lv in (0, 1, 2, 3)]
        print(f"| {name} | {ms:.0f} | " + " | ".join(f"{c:.0f}" for c in comm) + " |")
    print(
        f"\nActivations per worker, {args.tokens} tokens per step (34 s b h bytes per layer: 16-bit activations, "
        "fused attention storing no s x s scores; remat: each layer's input, 2 s b h, plus one layer's 34 s b h)\n"
    )
    print("| model | activations GB | with per-layer remat GB |")
    print("|---|---:|---:|")
    for name, n, L, d, S in rows:
        sbh = args.tokens * d  # s * b * h with s * b = tokens per worker
        print(f"| {name} | {34 * sbh * L / GB:.1f} | {(2 * sbh * L + 34 * sbh) / GB:.1f} |")
    print(
        f"\nLargest model whose peak model state fits {args.gpu_gb:g} GB less {args.reserve_gb:g} GB for "
        "activations and workspace\n"
    )
    print("| level | peak bytes per parameter | largest n |")
    print("|---:|---:|---:|")
    for level in (0, 1, 2, 3):
        per = shard_costs(1, level, N)["peak"]
        print(f"| {level} | {per:.2f} | {(budget - args.reserve_gb * GB) / per / 1e9:.2f}B |")
    return 0


def measure(args) -> int:
    import torch

    from fnlm import optim, random
    from fnlm.models import GPT2Config, init_gpt2, lm_loss
    from fnlm.train import Sharding, make_sharded_train_step, resident_bytes, worker_guard
    from fnlm.train.distributed import destroy_distributed, init_distributed
    from fnlm.tree import cast, tree_leaves

    rank, world, device = init_distributed(timeout=args.timeout)
    if args.device == "cpu":
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(world, 1)))
    L, d, h, V, S = MODELS[args.model]
    seq = min(args.seq, S)
    cfg = GPT2Config(vocab_size=V, n_positions=S, n_embd=d, n_layer=L, n_head=h)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    compile_ = {"none": False, "inductor": True}.get(args.compile, args.compile)

    def loss_fn(p, batch, key):
        return lm_loss(p, batch, cfg, key=key, train=True), {}

    def batch_at(step):
        return random.bits(random.fold_in(random.key(7), step), (args.batch, seq + 1)) % V

    cuda = device.type == "cuda"
    rows, final0 = [], None
    with worker_guard(args.timeout):
        for level in args.levels:
            params = cast(init_gpt2(random.key(0), cfg), device=device)
            sh = Sharding(params, level)
            held = sh.shard(params)
            del params
            opt = optim.adamw(1e-4, weight_decay=0.1)
            state = sh.init(opt, held)
            step = make_sharded_train_step(loss_fn, opt, sh, max_grad_norm=1.0, compile=compile_, autocast_dtype=dtype)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            state_bytes = resident_bytes(held, state)
            t0 = time.perf_counter()
            for s in range(args.steps):
                held, state, m = step(held, state, sh.split_batch(batch_at(s)), random.key(s))
            float(m["loss"])
            seconds = time.perf_counter() - t0
            peak = (
                torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            final = sh.unshard(held)
            diff = 0.0
            if final0 is None:
                final0 = [x.detach().float().cpu() for x in tree_leaves(final)]
            else:
                diff = max(
                    float((a.detach().float().cpu() - b).abs().max()) for a, b in zip(tree_leaves(final), final0)
                )
            rows.append(
                {
                    "level": level,
                    "state_bytes": state_bytes,
                    "peak_bytes": peak,
                    "loss": float(m["loss"]),
                    "max_abs_diff_vs_first_level": diff,
                    "seconds_incl_compile": seconds,
                }
            )
            del held, state, step, final
    gathered = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, rows)
    else:
        gathered = [rows]
    if rank == 0:
        n = sum(sh.sizes.values())
        print(
            f"GPT-2 {args.model} ({n / 1e6:.1f}M parameters), {world} worker(s) on {device.type}, "
            f"global batch {args.batch} x {seq}, {args.dtype}, compile={args.compile}"
        )
        print(f"{'level':>5} {'worker':>6} {'state MB':>9} {'peak MB':>9} {'max |diff|':>11} {'loss':>8}")
        for r, rws in enumerate(gathered):
            for row in rws:
                print(
                    f"{row['level']:>5} {r:>6} {row['state_bytes'] / 2**20:>9.1f} {row['peak_bytes'] / 2**20:>9.1f} "
                    f"{row['max_abs_diff_vs_first_level']:>11.2e} {row['loss']:>8.4f}"
                )
        if not cuda:
            print("(CPU peak = process peak RSS since start: it only grows; run one level per process to compare)")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"model": args.model, "params": n, "world": world, "device": device.type, "workers": gathered},
                    indent=2,
                )
            )
    bad = [row for rws in gathered for row in rws if not row["max_abs_diff_vs_first_level"] <= args.tolerance]
    if bad and rank == 0:
        print(f"levels disagree beyond {args.tolerance}: {bad}")
    destroy_distributed()
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", action="store_true", help="print the docs/scaling.md tables (no training)")
    ap.add_argument("--model", default="gpt2-medium", choices=sorted(MODELS))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--levels", default="0,1,2,3", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences), split across workers")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"), help="autocast dtype of the forward")
    ap.add_argument("--compile", default="inductor", help="inductor, none, or a dynamo backend (aot_eager)")
    ap.add_argument("--timeout", type=float, default=300, help="collective timeout, seconds")
    ap.add_argument("--tolerance", type=float, default=1e-2, help="max |param difference| allowed between levels")
    ap.add_argument("--json", default=None)
    ap.add_argument("--world", type=int, default=8, help="--paper: workers")
    ap.add_argument("--gpu-gb", type=float, default=80, help="--paper: memory per GPU, GB")
    ap.add_argument("--reserve-gb", type=float, default=16, help="--paper: kept for activations and workspace")
    ap.add_argument("--tokens", type=int, default=8 * 1024, help="--paper: tokens per worker per step")
    ap.add_argument("--tflops", type=float, default=400, help="--paper: achieved TFLOP/s per GPU")
    ap.add_argument("--bus-gbs", type=float, default=300, help="--paper: collective bandwidth per GPU, GB/s")
    args = ap.parse_args(argv)
    return paper(args) if args.paper else measure(args)


if __name__ == "__main__":
    sys.exit(main())
