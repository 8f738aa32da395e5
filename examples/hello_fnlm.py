"""Hello, fnlm: train a tiny encoder–decoder Transformer to reverse digit sequences, from scratch.

Everything is a pure function of explicit data: the params are a dict of tensors, the optimizer
state is a pytree, randomness (init, data, dropout) comes from ``fnlm.random`` keys, and one
training step, loss + gradient (``torch.func.grad_and_value``) + Adam update, is a single
function that ``torch.compile`` turns into one graph (through ``fnlm.compile_fn``, which
adds the Inductor options that keep compiling fnlm's key-based dropout fast).

    python examples/hello_fnlm.py                 # ~1 minute on 2 CPU cores
    python examples/hello_fnlm.py --steps 100 --no-compile
    python examples/hello_fnlm.py --out runs/hello    # checkpoints every --save-every steps; Ctrl-C, then
    python examples/hello_fnlm.py --resume runs/hello # ... continues exactly where it stopped

Task: ``src = 3 1 4 1 5 9 2 6`` -> ``tgt = 6 2 9 5 1 4 1 3``. Exits with status 1 if the
held-out sequence accuracy after training is below ``--min-accuracy``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

import fnlm
import fnlm.optim as optim
from fnlm import random
from fnlm.io import CheckpointError
from fnlm.train import GracefulStop, RunCheckpoints

PAD, BOS, EOS, DIGIT0 = 0, 1, 2, 3  # token ids; digit d is DIGIT0 + d
VOCAB = DIGIT0 + 10
SEQ_LEN = 8


def make_batch(key: random.Key, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``src`` digits, decoder input ``[BOS, reversed]`` and target ``[reversed, EOS]``."""
    src = DIGIT0 + random.bits(key, (batch_size, SEQ_LEN)) % 10
    rev = src.flip(-1)
    bos = torch.full((batch_size, 1), BOS, dtype=torch.long)
    eos = torch.full((batch_size, 1), EOS, dtype=torch.long)
    return src, torch.cat([bos, rev], -1), torch.cat([rev, eos], -1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--log-every", type=int, default=None, help="default: steps // 10")
    ap.add_argument("--no-compile", action="store_true", help="run the step eagerly")
    ap.add_argument("--min-accuracy", type=float, default=0.9,
                    help="exit 1 if held-out sequence accuracy ends below this")
    ap.add_argument("--out", type=Path, help="run directory for train-state checkpoints (default: none)")
    ap.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (with --out/--resume)")
    ap.add_argument("--keep-checkpoints", type=int, default=2)
    ap.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    args = ap.parse_args(argv)
    peeked = RunCheckpoints.peek(args.resume) if args.resume is not None else None
    if peeked is not None:  # the run's settings become the defaults; one given with another value is refused
        ap.set_defaults(**{k[2:].replace("-", "_"): v for k, v in peeked[0].items()})
        args = ap.parse_args(argv)
    log_every = args.log_every or max(1, args.steps // 10)
    if args.resume is not None and args.out is not None:
        ap.error("--resume RUN_DIR continues that run in place; leave out --out")
    if args.save_every < 1 or args.keep_checkpoints < 1:
        ap.error("--save-every and --keep-checkpoints must be >= 1")
    run_dir = args.resume or args.out

    cfg = fnlm.TransformerConfig(
        d_model=64, n_heads=4, d_ff=128, n_layers=2, dropout=0.1,
        src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, max_len=SEQ_LEN + 2,
    )
    k_init, k_data, k_eval = random.split(random.key(args.seed), 3)
    params = fnlm.init_transformer(k_init, cfg)
    opt = optim.adam(args.lr)
    opt_state = opt.init(params)
    print(f"model: {fnlm.tree.num_params(params):,} params; task: reverse {SEQ_LEN} digits")

    def loss_fn(params, src, tgt_in, tgt_out, key):
        logits = fnlm.transformer(params, src, tgt_in, cfg, key=key, train=True)
        return fnlm.cross_entropy(logits, tgt_out)

    def train_step(params, opt_state, src, tgt_in, tgt_out, key):
        grads, loss = torch.func.grad_and_value(loss_fn)(params, src, tgt_in, tgt_out, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, loss

    # fnlm.compile_fn(f) = torch.compile(f, fullgraph=True) + fnlm's Inductor options (see fnlm.train)
    step_fn = train_step if args.no_compile else fnlm.compile_fn(train_step)

    # Checkpoints (fnlm.train.RunCheckpoints): the data of step s is a function of fold_in(k_data, s),
    # so (params, opt_state, step) is the whole train state and a resumed run equals an uninterrupted one.
    ckpts, start, log = None, 0, {"first_loss": None, "last_loss": None}
    if run_dir is not None:
        config = {"--steps": args.steps, "--seed": args.seed, "--batch-size": args.batch_size, "--lr": args.lr}
        ckpts = RunCheckpoints(run_dir, config, keep=args.keep_checkpoints)
        if args.resume is None and ckpts.checkpoints():
            print(f"error: {run_dir} already holds checkpoints; continue with --resume {run_dir}", file=sys.stderr)
            return 2
        try:
            state = ckpts.restore() if args.resume is not None else None
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.resume is not None and state is None:
            print(f"error: --resume {run_dir}: no checkpoint there", file=sys.stderr)
            return 2
        if state is not None:
            params, opt_state, start, log = state.params, state.opt_state, state.step, state.extra
            print(f"resumed from {state.path} at step {start}")

    t0 = time.perf_counter()
    stop = GracefulStop() if ckpts is not None else None
    with stop or contextlib.nullcontext():
        for step in range(start, args.steps):
            k_batch, k_drop = random.split(random.fold_in(k_data, step))
            src, tgt_in, tgt_out = make_batch(k_batch, args.batch_size)
            params, opt_state, loss = step_fn(params, opt_state, src, tgt_in, tgt_out, k_drop)
            if step == start and not args.no_compile:
                print(f"compiled the training step (loss + grad + Adam) in {time.perf_counter() - t0:.1f}s")
            if step == 0:
                log["first_loss"] = loss.item()
            if step % log_every == 0 or step == args.steps - 1:
                log["last_loss"] = loss.item()
                print(f"step {step:5d}  loss {log['last_loss']:.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
            done = step + 1
            if ckpts is not None and (done % args.save_every == 0 or done == args.steps or stop.requested):
                ckpts.save(params, opt_state, done, k_data, log)
                if stop.requested:
                    print(f"stopped by {stop.requested} at step {done}, checkpoint written; resume with: "
                          f"python {sys.argv[0]} --resume {run_dir}{' --no-compile' if args.no_compile else ''}",
                          file=sys.stderr)
                    return 130
    train_s = time.perf_counter() - t0
    first_loss, last_loss = log["first_loss"], log["last_loss"]

    # Held-out evaluation: greedy auto-regressive decoding, no teacher forcing.
    src, _, tgt_out = make_batch(k_eval, 256)
    with torch.no_grad():
        out = fnlm.greedy_decode(params, src, cfg, bos_id=BOS, max_len=SEQ_LEN + 2)[:, 1:]
    seq_acc = (out == tgt_out).all(-1).float().mean().item()
    tok_acc = (out == tgt_out).float().mean().item()

    def show(ids):
        return " ".join(str(int(t) - DIGIT0) if t >= DIGIT0 else {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}[int(t)]
                        for t in ids)

    print("\nexamples (greedy decoding):")
    for i in range(5):
        mark = "ok " if bool((out[i] == tgt_out[i]).all()) else "BAD"
        print(f"  [{mark}] {show(src[i])}  ->  {show(out[i])}")
    print(f"\nfirst loss {first_loss:.4f}, final loss {last_loss:.4f}; training took {train_s:.1f}s")
    print(f"held-out accuracy: sequences {seq_acc:.1%}, tokens {tok_acc:.1%}")
    if seq_acc < args.min_accuracy:
        print(f"FAIL: sequence accuracy {seq_acc:.1%} < --min-accuracy {args.min_accuracy:.0%}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
