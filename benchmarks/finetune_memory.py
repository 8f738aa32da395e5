"""Fine-tuning that fits, measured: LoRA vs full fine-tuning step time and trainable share, and the
peak memory of one compiled training step with and without rematerialisation.

    python benchmarks/finetune_memory.py lora                 # MiniLM, batch 16 x 256, r=8 on q,v
    python benchmarks/finetune_memory.py remat                # BERT-base shapes, batch 8 x 512
    python benchmarks/finetune_memory.py remat --layers 4 --batch 4 --seq 256   # a smaller shape

``lora``: the compiled step of full fine-tuning (AdamW on every leaf) and of LoRA (AdamW on the
adapters + classifier; the rest frozen and closed over, adapters merged into the weights inside
the loss, :func:`fnlm.merge_lora`), same model (all-MiniLM-L6-v2) and batch, timed interleaved in
one process (median of ``--steps`` after compile warm-up); prints the trainable share. ``--inline``
adds the alternative design, the low-rank term computed inside the attention projections.

``remat``: one compiled training step (AdamW) of a randomly initialised BERT with the given
shape, each variant (``none``, ``nothing``; ``matmuls`` is eager-only and not run) in its own
process. The first step compiles; then freed heap is returned to the OS (``malloc_trim``) and the
peak-RSS counter restarted (``/proc/self/clear_refs``), so the peak reported is the timed steps'
(the params, the optimizer state and Inductor's code are resident in both variants; the step's
own memory is the peak minus the RSS before the steps). The max RSS including compilation is
printed too. Step time: median of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fnlm
from fnlm import optim, random
from fnlm.io import ensure_minilm
from fnlm.tree import combine, num_params, partition

ROOT = Path(__file__).resolve().parents[1]


def batch_of(cfg: fnlm.BertConfig, b: int, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, cfg.vocab_size, (b, n), generator=g),
        "attention_mask": torch.ones(b, n, dtype=torch.long),
        "labels": torch.randint(0, 2, (b,), generator=g),
    }


def timed(step, state, batch, key):
    t = time.perf_counter()
    out = step(*state, batch, key)
    float(out[2]["loss"])
    return out[:2], time.perf_counter() - t


def run_lora(args) -> None:
    params, cfg = fnlm.load_bert(
        ensure_minilm(ROOT / "weights" / "all-MiniLM-L6-v2"), head="classifier", head_key=random.key(0)
    )
    batch = batch_of(cfg, args.batch, args.seq)

    def full_loss(p, b, key):
        return fnlm.classifier_loss(p, b, cfg, key=key, train=True)

    lcfg = fnlm.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=tuple(args.targets.split(",")))
    head, frozen = partition(params, "classifier.*")
    trainable = {"head": head, "lora": fnlm.init_lora(random.key(1), params, lcfg)}

    def lora_loss(tr, b, key):
        return fnlm.classifier_loss(
            fnlm.merge_lora(combine(tr["head"], frozen), tr["lora"], lcfg), b, cfg, key=key, train=True
        )

    opt = optim.adamw(2e-5)
    variants = {
        "full": (fnlm.make_train_step(full_loss, opt), [params, opt.init(params)]),
        "lora": (fnlm.make_train_step(lora_loss, opt), [trainable, opt.init(trainable)]),
    }
    if args.inline:  # the alternative design: the projections add (x A) B themselves (q/k/v targets only)
        variants["lora-inline"] = (
            fnlm.make_train_step(inline_lora_loss(cfg, frozen, lcfg), opt),
            [trainable, opt.init(trainable)],
        )
    times: dict[str, list[float]] = {k: [] for k in variants}
    t0 = time.perf_counter()
    for i in range(args.warmup + args.steps):
        for name, (step, state) in variants.items():
            new_state, dt = timed(step, state, batch, random.key(i))
            variants[name] = (step, list(new_state))
            if i >= args.warmup:
                times[name].append(dt)
    n_all, n_train = num_params(params), num_params(trainable)
    full, lora = statistics.median(times["full"]), statistics.median(times["lora"])
    print(
        f"model all-MiniLM-L6-v2 ({n_all / 1e6:.1f} M params), batch {args.batch} x {args.seq}, CPU, "
        f"{torch.get_num_threads()} threads, {args.steps} timed steps each, interleaved "
        f"(run took {time.perf_counter() - t0:.0f} s incl. compiles)"
    )
    print(
        f"LoRA r={args.rank} alpha={2 * args.rank} on {lcfg.targets}: trainable {n_train} of {n_all} "
        f"= {100 * n_train / n_all:.2f}% (adapters {num_params(trainable['lora'])}, head {num_params(head)})"
    )
    print("| step | median s | min s |\n|---|---|---|")
    for k in times:
        print(f"| {k} | {statistics.median(times[k]):.3f} | {min(times[k]):.3f} |")
    print(f"full / LoRA step time: {full / lora:.2f}x")


def inline_lora_loss(cfg, frozen, lcfg):
    """LoRA applied inside the attention projections, ``x W + (alpha/r) (x A) B`` with the
    low-rank product computed on the activations (never forming ``A B``), by patching
    ``fnlm.nn._attention._project`` for dicts that carry ``lora_A``/``lora_B``: what fnlm would
    have to build into its layers instead of :func:`fnlm.merge_lora`. Benchmark only."""
    from einops import rearrange

    from fnlm.nn import _attention
    from fnlm.tree import flatten_names, unflatten_names

    project = _attention._project

    def project_lora(p, x):
        if "lora_A" not in p:
            return project(p, x)
        y = project({k: p[k] for k in ("weight", "bias") if k in p}, x)
        d = (x @ p["lora_A"]) @ p["lora_B"] * lcfg.scale
        return y + rearrange(d, "... l (h k) -> ... h l k", h=y.shape[-3])

    _attention._project = project_lora

    def loss(tr, b, key):
        flat = flatten_names(combine(tr["head"], frozen))
        flat.update(flatten_names(tr["lora"]))
        return fnlm.classifier_loss(unflatten_names(flat), b, cfg, key=key, train=True)

    return loss


def run_remat_variant(args) -> None:
    cfg = fnlm.BertConfig(num_hidden_layers=args.layers)
    params = fnlm.init_bert_classifier(random.key(0), cfg)
    spec = None if args.variant == "none" else args.variant

    def loss_fn(p, b, key):
        return fnlm.classifier_loss(p, b, cfg, key=key, train=True, remat=spec)

    opt = optim.adamw(2e-5)
    step = fnlm.make_train_step(loss_fn, opt, compile=not args.eager)
    state = [params, opt.init(params)]
    batch = batch_of(cfg, args.batch, args.seq)
    times = []
    new_state, _ = timed(step, state, batch, random.key(0))  # compiles: its memory is not the step's
    state = list(new_state)
    compile_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    base = reset_peak_rss()
    for i in range(1, 1 + args.steps):
        new_state, dt = timed(step, state, batch, random.key(i))
        state = list(new_state)
        times.append(dt)
    print(
        json.dumps(
            {
                "variant": args.variant,
                "peak_mib": peak_rss(),
                "before_mib": base,
                "max_rss_with_compile_mib": compile_rss,
                "step_s": statistics.median(times),
            }
        )
    )


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> float:
    """Return freed heap to the OS (glibc ``malloc_trim``) and restart the peak-RSS counter
    (``/proc/self/clear_refs`` 5, Linux), so that the peak measured next is the steps', not the
    compiler's. Returns the resident size now (MiB)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_rss() -> float:
    """Peak resident size (MiB) since :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_mib("VmHWM")


def run_remat(args) -> None:
    rows = []
    for variant in ("none", "nothing"):
        cmd = [
            sys.executable,
            __file__,
            "remat-variant",
            "--variant",
            variant,
            "--layers",
            str(args.layers),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
        ]
        if args.eager:
            cmd.append("--eager")
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mode = "eager" if args.eager else "compiled"
    print(
        f"BERT-base widths, {args.layers} layers, batch {args.batch} x {args.seq}, {mode} step, AdamW, CPU, "
        f"each variant in its own process (max RSS after 1 warm-up + {args.steps} steps)"
    )
    print(
        "| remat | peak RSS during the steps MiB | RSS before them MiB | step's own MiB | max RSS incl. compile MiB | step s |\n"
        "|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['variant']} | {r['peak_mib']:.0f} | {r['before_mib']:.0f} | {r['peak_mib'] - r['before_mib']:.0f} | "
            f"{r['max_rss_with_compile_mib']:.0f} | {r['step_s']:.2f} |"
        )
    base, rem = rows
    print(
        f"peak RSS during the steps: {100 * (1 - rem['peak_mib'] / base['peak_mib']):.1f}% lower with remat "
        f"(the step's own memory above what was resident before: "
        f"{100 * (1 - (rem['peak_mib'] - rem['before_mib']) / (base['peak_mib'] - base['before_mib'])):.1f}% lower); "
        f"step time: {100 * (rem['step_s'] / base['step_s'] - 1):+.1f}%"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["lora", "remat", "remat-variant"])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="*.attn.q,*.attn.v")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--variant", default="none")
    ap.add_argument("--eager", action="store_true", help="remat: measure the eager step instead")
    ap.add_argument(
        "--inline",
        action="store_true",
        help="lora: also time LoRA computed inside the attention projections (the alternative design)",
    )
    args = ap.parse_args()
    if args.what == "lora":
        args.batch, args.seq, args.steps = args.batch or 16, args.seq or 256, args.steps or 5
        run_lora(args)
    else:
        args.batch, args.seq, args.steps = args.batch or 8, args.seq or 512, args.steps or 2
        run_remat(args) if args.what == "remat" else run_remat_variant(args)


if __name__ == "__main__":
    main()
