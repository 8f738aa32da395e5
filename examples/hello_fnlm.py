"""Hello, fnlm: train a tiny encoder–decoder Transformer to reverse digit sequences, from scratch.

Everything is a pure function of explicit data: the params are a dict of tensors, the optimizer
state is a pytree, randomness (init, data, dropout) comes from ``fnlm.random`` keys, and one
training step, loss + gradient (``torch.func.grad_and_value``) + Adam update, is a single
function that ``torch.compile`` turns into one graph (through ``fnlm.compile_fn``, which
adds the Inductor options that keep compiling fnlm's key-based dropout fast).

    python examples/hello_fnlm.py                 # 500 compiled steps
    python examples/hello_fnlm.py --steps 100 --no-compile
    python examples/hello_fnlm.py --out runs/hello    # checkpoints every --save-every steps; Ctrl-C, then
    python examples/hello_fnlm.py --resume runs/hello # ... continues exactly where it stopped
    python examples/hello_fnlm.py --resume runs/hello --steps 800   # a finished run, trained further

Task: ``src = 3 1 4 1 5 9 2 6`` -> ``tgt = 6 2 9 5 1 4 1 3``. Exits with status 1 if the
held-out sequence accuracy after training is below ``--min-accuracy``. The run directory
(``fnlm.train.Run``, default ``runs/hello-<timestamp>``) holds ``run_config.json``, ``metrics.jsonl``
and the checkpoints; the finished one also ``metrics.json``, ``README.md`` and ``environment.json``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fnlm
import fnlm.optim as optim
from fnlm import random
from fnlm.config import check_ranges, cli_main, config_to_dict, option, parse_config
from fnlm.io import write_json
from fnlm.train import Run, model_card

PAD, BOS, EOS, DIGIT0 = 0, 1, 2, 3  # token ids; digit d is DIGIT0 + d
VOCAB = DIGIT0 + 10
SEQ_LEN = 8


@dataclass(frozen=True)
class HelloConfig:
    steps: int = option(500, "training steps (a larger value on --resume trains a run further)", ge=1)
    seed: int = option(0, "init, data and dropout all derive from it")
    batch_size: int = option(64, "sequences per step", ge=1)
    lr: float = option(2e-3, "Adam's learning rate", gt=0)
    log_every: int | None = option(None, "print the loss every N steps; default: a tenth of --steps", ge=1)
    compile: bool = option(True, "compile the step with torch.compile (--no-compile: eager)")
    min_accuracy: float = option(0.9, "exit 1 if held-out sequence accuracy ends below this", ge=0, le=1)
    save_every: int = option(100, "write a checkpoint every N steps (and at the last)", ge=1)
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", ge=1)
    out: Path | None = option(None, "run directory (default runs/hello-<timestamp>)")
    resume: Path | None = option(
        None,
        "continue the run in RUN_DIR from its last checkpoint (a finished one with a larger --steps)",
        metavar="RUN_DIR",
    )
    overwrite: bool = option(False, "replace an existing --out")

    def __post_init__(self):
        check_ranges(self)


def make_batch(key: random.Key, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``src`` digits, decoder input ``[BOS, reversed]`` and target ``[reversed, EOS]``."""
    src = DIGIT0 + random.bits(key, (batch_size, SEQ_LEN)) % 10
    rev = src.flip(-1)
    bos = torch.full((batch_size, 1), BOS, dtype=torch.long)
    eos = torch.full((batch_size, 1), EOS, dtype=torch.long)
    return src, torch.cat([bos, rev], -1), torch.cat([rev, eos], -1)


def main(argv: list[str] | None = None) -> int:
    cfg, explicit = parse_config(HelloConfig, argv, description=__doc__.split("\n\n")[0])
    # Adam's rate is constant, so --steps only says where to stop: a resumed run may raise it.
    with Run.open(
        cfg,
        explicit,
        out=cfg.out,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        name="hello-%Y%m%d-%H%M%S",
        may_change=("steps", "log_every", "min_accuracy", "save_every", "keep_checkpoints"),
        per_session=("out", "resume", "overwrite", "compile"),
        repeat=("compile",),
    ) as run:
        return train(run, run.config)


def train(run: Run, args: HelloConfig) -> int:
    print(f"run directory: {run.dir}", flush=True)
    log_every = args.log_every or max(1, args.steps // 10)
    cfg = fnlm.TransformerConfig(
        d_model=64,
        n_heads=4,
        d_ff=128,
        n_layers=2,
        dropout=0.1,
        src_vocab_size=VOCAB,
        tgt_vocab_size=VOCAB,
        max_len=SEQ_LEN + 2,
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
    step_fn = fnlm.compile_fn(train_step) if args.compile else train_step

    # Checkpoints (fnlm.train.Run): the data of step s is a function of fold_in(k_data, s), so
    # (params, opt_state, step) is the whole train state and a resumed run equals an uninterrupted one.
    ckpts = run.checkpoints(keep=args.keep_checkpoints)
    start, log = 0, {"first_loss": None, "last_loss": None}
    if (state := run.restore(ckpts)) is not None:
        params, opt_state, start, log = state.params, state.opt_state, state.step, state.extra
        print(f"resumed from {state.path} at step {start}")

    t0 = time.perf_counter()
    with run.stop_guard() as stop:
        for step in range(start, args.steps):
            k_batch, k_drop = random.split(random.fold_in(k_data, step))
            src, tgt_in, tgt_out = make_batch(k_batch, args.batch_size)
            if step == start and args.compile:
                print("compiling the training step (its first call)...", flush=True)
            params, opt_state, loss = step_fn(params, opt_state, src, tgt_in, tgt_out, k_drop)
            if step == start and args.compile:
                print(f"compiled the training step (loss + grad + Adam) in {time.perf_counter() - t0:.1f}s")
            if step == 0:
                log["first_loss"] = loss.item()
            run.log({"step": step + 1, "loss": loss.item()})
            if step % log_every == 0 or step == args.steps - 1:
                log["last_loss"] = loss.item()
                print(f"step {step:5d}  loss {log['last_loss']:.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
            done = step + 1
            if done % args.save_every == 0 or done == args.steps or stop.requested:
                ckpts.save(params, opt_state, done, k_data, log)
            if stop.requested and done < args.steps:
                return run.stopped(done, args.steps, stop.requested)
    train_s = time.perf_counter() - t0
    first_loss, last_loss = log["first_loss"], log["last_loss"]

    # Held-out evaluation: greedy auto-regressive decoding, no teacher forcing.
    src, _, tgt_out = make_batch(k_eval, 256)
    with torch.no_grad():
        out = fnlm.greedy_decode(params, src, cfg, bos_id=BOS, max_len=SEQ_LEN + 2)[:, 1:]
    seq_acc = (out == tgt_out).all(-1).float().mean().item()
    tok_acc = (out == tgt_out).float().mean().item()

    def show(ids):
        return " ".join(
            str(int(t) - DIGIT0) if t >= DIGIT0 else {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}[int(t)] for t in ids
        )

    print("\nexamples (greedy decoding):")
    for i in range(5):
        mark = "ok " if bool((out[i] == tgt_out[i]).all()) else "BAD"
        print(f"  [{mark}] {show(src[i])}  ->  {show(out[i])}")
    print(f"\nfirst loss {first_loss:.4f}, final loss {last_loss:.4f}; training took {train_s:.1f}s")
    print(f"held-out accuracy: sequences {seq_acc:.1%}, tokens {tok_acc:.1%}")
    settings = {k: v for k, v in config_to_dict(args).items() if k not in ("out", "resume", "overwrite", "compile")}
    with run.finish(ckpts) as tmp:  # the trained parameters are the kept checkpoint's
        write_json(
            {
                "steps": args.steps,
                "first_loss": first_loss,
                "final_loss": last_loss,
                "sequence_accuracy": seq_acc,
                "token_accuracy": tok_acc,
                "train_seconds": train_s,
            },
            tmp / "metrics.json",
        )
        (tmp / "README.md").write_text(
            model_card(
                name=run.out.name,
                base_model=None,
                dataset="synthetic-digit-reversal",
                task="text2text-generation",
                metrics={"sequence_accuracy": seq_acc, "token_accuracy": tok_acc},
                hyperparameters=settings,
                description=f"A {fnlm.tree.num_params(params):,}-parameter encoder-decoder Transformer trained with fnlm "
                f"to reverse {SEQ_LEN} digits (examples/hello_fnlm.py).",
            ),
            encoding="utf-8",
        )
    if seq_acc < args.min_accuracy:
        print(f"FAIL: sequence accuracy {seq_acc:.1%} < --min-accuracy {args.min_accuracy:.0%}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
