"""GPT-2 decoding and training throughput: fnlm (compiled) vs Hugging Face (eager), same weights, one run.

Decoding: the GPT-2-small shape (124M parameters, random weights), a 32-token prompt, 128 new
tokens, greedy, batch 1 and 8. fnlm's ``generate`` (eager prefill, then one ``torch.compile``-d
pure ``decode_step`` + argmax per token over a preallocated KV cache; at batch 1 on a CPU its
matrix-vector kernels, ``fnlm.models._matvec``, and for comparison the same with the BLAS's
products, ``matvec=False``) vs ``GPT2LMHeadModel.generate`` (eager, its own KV cache). Each
generates exactly 128 tokens (no stop token); tokens/s counts the new tokens of all rows over
the whole call (prefill and the matvec weight copy included); compilation happens in an untimed
warm-up call. Both must produce the same tokens (checked).

The memory-bandwidth bound: a decode step reads every weight once (the tied LM head included),
so it cannot be faster than ``param_bytes / copy_bandwidth``; ``copy_bandwidth`` is measured here
(a large tensor copy, read + write bytes). tokens/s <= batch * bandwidth / param_bytes.

Training: the configuration of ``examples/pretrain_gpt.py`` (4 layers, d_model 128, vocab 512,
16 x 128 tokens); fnlm's compiled step (AdamW + clipping) vs ``GPT2LMHeadModel`` +
``torch.nn.utils.clip_grad_norm_`` + ``torch.optim.AdamW``, eager; interleaved, median step.

    python benchmarks/generate.py                 # CPU, float32, all threads
    python benchmarks/generate.py --threads 1 --only decode
    python benchmarks/generate.py --device cuda --dtype bf16 --only decode   (untested here: no GPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers

from fnlm import optim, random
from fnlm.models import generate, lm_loss, load_gpt2
from fnlm.train import make_train_step
from fnlm.tree import cast, tree_leaves

transformers.logging.set_verbosity_error()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth_gbs(device: str, n_bytes: int = 1 << 30, reps: int = 5) -> float:
    """Best of ``reps`` copies of an ``n_bytes`` tensor: (read + write) bytes / second, in GB/s."""
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    x.fill_(1.0)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best / 1e9


def bench_decode(args) -> None:
    torch.manual_seed(0)
    hc = transformers.GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0)  # GPT-2 small, random
    hf = transformers.GPT2LMHeadModel(hc).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        params, cfg = load_gpt2(d)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    params = cast(params, dtype=dtype, device=args.device)
    hf = hf.to(device=args.device, dtype=dtype)
    param_bytes = sum(t.numel() * t.element_size() for t in tree_leaves(params))
    n_params = sum(t.numel() for t in tree_leaves(params))
    bw = copy_bandwidth_gbs(args.device)
    print(
        f"GPT-2 small: {n_params / 1e6:.1f}M parameters ({param_bytes / 1e6:.0f} MB in {args.dtype}); "
        f"measured copy bandwidth {bw:.1f} GB/s; {args.prompt}-token prompt, {args.new} new tokens, greedy; "
        f"device {args.device}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'batch':>5} {'fnlm compiled tok/s':>20} {'(BLAS products)':>16} {'HF generate tok/s':>18} "
        f"{'fnlm / HF':>9} {'bound tok/s':>11} {'fnlm / bound':>12}"
    )
    for batch in args.batches:
        prompt = torch.randint(0, cfg.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))

        def run_fnlm(matvec=None):
            return generate(params, cfg, prompt.to(args.device), max_new_tokens=args.new, compile=True, matvec=matvec)

        def run_hf():
            with torch.no_grad():
                out = hf.generate(
                    prompt.to(args.device),
                    attention_mask=torch.ones_like(prompt).to(args.device),
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                    use_cache=True,
                )
            return out[:, args.prompt :].tolist()

        runners = {"fnlm": run_fnlm, "hf": run_hf}
        if batch == 1 and args.device == "cpu":
            runners["blas"] = lambda: run_fnlm(matvec=False)
        outs = {name: fn() for name, fn in runners.items()}  # warm-up: compiles fnlm's decode steps
        same = all(out == outs["hf"] for out in outs.values())
        times = {name: [] for name in runners}
        for _ in range(args.reps):  # interleaved
            for name, fn in runners.items():
                sync(args.device)
                t = time.perf_counter()
                fn()
                sync(args.device)
                times[name].append(time.perf_counter() - t)
        tps = {k: batch * args.new / statistics.median(v) for k, v in times.items()}
        bound = batch * bw * 1e9 / param_bytes
        blas = f"{tps['blas']:>16.1f}" if "blas" in tps else f"{'':>16}"
        print(
            f"{batch:>5} {tps['fnlm']:>20.1f} {blas} {tps['hf']:>18.1f} {tps['fnlm'] / tps['hf']:>8.2f}x "
            f"{bound:>11.1f} {tps['fnlm'] / bound:>11.1%}" + ("" if same else "   (tokens DIFFER from HF)")
        )


def bench_train(args) -> None:
    V, T, B, D, L, H = 512, 128, 16, 128, 4, 4
    torch.manual_seed(0)
    hc = transformers.GPT2Config(
        vocab_size=V,
        n_positions=T,
        n_embd=D,
        n_layer=L,
        n_head=H,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hc).train().to(args.device)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        params, cfg = load_gpt2(d, device=args.device)
    batch = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(args.device)
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.inject_hyperparams(optim.adamw)(lr=optim.cosine(1e-3, 1000, warmup_steps=10), weight_decay=0.1),
    )
    state = opt.init(params)
    step = make_train_step(lambda p, b, k: (lm_loss(p, b, cfg, key=k, train=True), {}), opt)
    torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda s: min(1.0, (s + 1) / 10))
    key = random.key(0)

    def run_fnlm():
        nonlocal params, state
        params, state, m = step(params, state, batch, key)
        return float(m["loss"])

    def run_hf():
        loss = hf(batch[:, :-1], labels=batch[:, :-1]).loss  # same targets: HF shifts inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        torch_opt.step()
        sched.step()
        torch_opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(2):  # warm-up (compilation)
        run_fnlm(), run_hf()
    times = {"fnlm": [], "hf": []}
    for _ in range(args.train_steps):
        for name, fn in (("fnlm", run_fnlm), ("hf", run_hf)):
            sync(args.device)
            t = time.perf_counter()
            fn()
            sync(args.device)
            times[name].append(time.perf_counter() - t)
    tps = {k: B * T / statistics.median(v) for k, v in times.items()}
    print(
        f"\ntraining, examples/pretrain_gpt.py shape ({L} layers, d_model {D}, vocab {V}, batch {B} x {T}), "
        f"median of {args.train_steps} interleaved steps:"
    )
    print(
        f"  fnlm compiled step {tps['fnlm']:,.0f} tokens/s, HF + torch.optim.AdamW eager {tps['hf']:,.0f} tokens/s: "
        f"{tps['fnlm'] / tps['hf']:.2f}x"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="decoding weights' dtype")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2, help="timed generate calls per variant and batch (median)")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    ap.add_argument("--only", choices=["decode", "train"], default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only in (None, "decode"):
        bench_decode(args)
    if args.only in (None, "train"):
        bench_train(args)


if __name__ == "__main__":
    main()
