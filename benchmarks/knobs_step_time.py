"""Step time of the fine-tuning knobs: gradient accumulation and the float16 / bf16 / float32 steps.

The same BERT classifier (all-MiniLM-L6-v2, or ``--model tiny``: a random 2-layer one for smoke
runs) and the same ``--batch`` samples per optimizer step, each variant a :func:`make_train_step`:

* ``fp32``: one batch per step; ``accum-2``, ``accum-4``: the same samples as 2 / 4 micro-batches
  (``accum_steps``), the overhead of accumulation at equal work;
* ``bf16``: bf16 autocast; ``fp16``: fp16 autocast with :func:`fnlm.optim.dynamic_loss_scale`
  (meant for GPUs without bf16; on a CPU it shows what it costs there).

Warm-up steps (compilation included) are not timed; timed steps are interleaved across variants
and the median is printed, with each variant's time relative to ``fp32``::

    python benchmarks/knobs_step_time.py --steps 10
    python benchmarks/knobs_step_time.py --model tiny --steps 1 --warmup 1 --backend none --seq 16   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from fnlm import optim, random
from fnlm.io import ensure_minilm
from fnlm.models import BertConfig, classifier_loss, init_bert_classifier, load_bert
from fnlm.train import make_train_step

VARIANTS = ("fp32", "accum-2", "accum-4", "bf16", "fp16")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16, help="samples per optimizer step (all variants)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--backend", default="inductor", help="torch.compile backend; 'none': eager (smoke runs)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.model == "minilm":
        params, cfg = load_bert(
            ensure_minilm(ROOT / "weights" / "all-MiniLM-L6-v2"),
            head="classifier",
            num_labels=2,
            head_key=random.key(0),
        )
    else:
        cfg = BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=max(args.seq, 16),
        )
        params = init_bert_classifier(random.key(0), cfg)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1, cfg.vocab_size, (args.batch, args.seq), generator=g),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }
    batch = {k: v.to(args.device) for k, v in batch.items()}

    def loss_fn(p, b, key):
        return classifier_loss(p, b, cfg, key=key, train=True)

    compile_ = {"inductor": True, "none": False}.get(args.backend, args.backend)
    runners = {}
    for name in args.only.split(","):
        if name not in VARIANTS:
            ap.error(f"--only: unknown variant {name!r}; choose from {VARIANTS}")
        accum = int(name.split("-")[1]) if name.startswith("accum") else 1
        opt = optim.adamw(2e-5)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        if name == "fp16":
            opt = optim.dynamic_loss_scale(opt)
        step = make_train_step(loss_fn, opt, compile=compile_, accum_steps=accum, autocast_dtype=dtype)
        b = batch if accum == 1 else {k: v.reshape(accum, args.batch // accum, *v.shape[1:]) for k, v in batch.items()}
        state = {"p": params, "s": opt.init(params), "k": random.key(1)}

        def run(step=step, state=state, b=b):
            state["k"], sub = random.split(state["k"])
            state["p"], state["s"], _ = step(state["p"], state["s"], b, sub)

        runners[name] = run
    for name, run in runners.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            run()
        print(f"  {name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    times = {name: [] for name in runners}
    for _ in range(args.steps):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med.get("fp32")
    print(f"\nmodel={args.model} device={args.device} batch={args.batch} seq={args.seq}, median of {args.steps}")
    for name, sec in med.items():
        rel = f"{sec / base:.2f}x fp32" if base else ""
        print(f"{name:<10}{sec:>9.3f} s/step  {rel}")
    if args.json:
        args.json.write_text(json.dumps({"median_s_per_step": med, **vars(args)}, default=str, indent=1))
    return med


if __name__ == "__main__":
    main()
