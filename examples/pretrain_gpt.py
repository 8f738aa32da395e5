"""Pretrain a small GPT from scratch on IMDb review text, then sample from it.

The decoder-only half of "a large model from scratch", in pure functions: a byte-level BPE
tokenizer trained (Hugging Face ``tokenizers``, seconds) on the IMDb *training* reviews, a GPT-2
initialised from a key, the compiled training step (AdamW, warm-up + cosine, gradient clipping),
validation loss and perplexity on held-out training reviews at intervals, and samples from a few
prompts at the end. The IMDb *test* split is never read.

    # 2 CPU cores: 10 minutes here (6000 steps; validation perplexity 16.0 vs the bigram's 43.9)
    python examples/pretrain_gpt.py --data ../shared/data/aclImdb_v1_labelled.tar.gz

    # sample from a trained run (a run directory or its model/ folder)
    python examples/pretrain_gpt.py --model runs/gpt-imdb --generate "This movie was" "I expected"

    # an interrupted run (Ctrl-C, SIGTERM, a killed process) continues exactly from its last checkpoint
    python examples/pretrain_gpt.py --resume runs/gpt-imdb

Batches are random windows of ``--block-size + 1`` tokens of the concatenated training reviews
(separated by ``<|endoftext|>``); the window offsets of step ``s`` are drawn from
``fold_in(data_key, s)``, so a resumed run sees exactly the batches it would have seen.

The run directory (``--out``, default ``runs/gpt-imdb``) holds ``tokenizer/``, ``checkpoints/``
(train state every ``--save-every`` steps and on SIGINT/SIGTERM; ``--resume`` continues from it) and,
once training is complete: ``model/`` (Hugging Face layout: ``config.json``, ``model.safetensors``,
tokenizer files; ``GPT2LMHeadModel.from_pretrained`` loads it), ``curves.png`` (training and
validation loss, validation perplexity), ``samples.txt`` and ``metrics.json`` (written last). The
validation perplexity of an add-one bigram model on the same tokens is printed beside the GPT's:
what the Transformer bought.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

import fnlm
from fnlm import optim, random
from fnlm.data import DatasetError, html_clean, load_imdb_splits
from fnlm.io import atomic_dir, atomic_path, write_json
from fnlm.models import GPT2Config, generate, init_gpt2, lm_loss, load_gpt2, save_gpt2
from fnlm.train import GracefulStop, ResumeError, RunCheckpoints, digest, make_eval_step, make_train_step
from fnlm.tree import num_params

EOT = "<|endoftext|>"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "aclImdb_v1_labelled.tar.gz"
PROMPTS = ("This movie was", "I have never seen", "The acting in this film", "My favourite scene")
#: settings a resumed run must share with the run it continues
SETTINGS = ("train_reviews", "val_reviews", "val_tokens", "vocab_size", "n_layer", "n_head", "n_embd", "block_size",
            "batch_size", "steps", "lr", "min_lr", "warmup", "weight_decay", "clip", "dropout", "seed")


class CliError(Exception):
    """A problem with the command line or its inputs: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("data and tokenizer")
    g.add_argument("--data", type=Path, default=DEFAULT_DATA, help="aclImdb_v1 archive or folder (train split used)")
    g.add_argument("--train-reviews", type=int, default=0, help="training reviews (0 = all but the validation ones)")
    g.add_argument("--val-reviews", type=int, default=1000, help="held-out training reviews for validation")
    g.add_argument("--val-tokens", type=int, default=65536, help="validation tokens evaluated (at most)")
    g.add_argument("--vocab-size", type=int, default=512, help="byte-level BPE vocabulary")
    g = ap.add_argument_group("model and training")
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--n-embd", type=int, default=128)
    g.add_argument("--block-size", type=int, default=128, help="context length (n_positions)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--steps", type=int, default=6000)
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=2e-4, help="learning rate at the end of the cosine")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="clip gradients to this global L2 norm")
    g.add_argument("--dropout", type=float, default=0.0, help="embedding/residual/attention dropout")
    g.add_argument("--seed", type=int, default=0, help="init, batches and dropout all derive from it")
    g.add_argument("--no-compile", action="store_true", help="run the steps eagerly (no torch.compile)")
    g.add_argument("--shard", type=int, choices=(0, 1, 2, 3), default=None,
                   help="sharded data parallel (fnlm.train.Sharding; run under torchrun): 0 replicated, 1 optimizer "
                        "state sharded, 2 and gradients, 3 and parameters; --batch-size is the global batch")
    g = ap.add_argument_group("evaluation, checkpoints and output")
    g.add_argument("--eval-every", type=int, default=500)
    g.add_argument("--save-every", type=int, default=500)
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this session; --resume continues")
    g.add_argument("--out", type=Path, default=Path("runs/gpt-imdb"), help="run directory")
    g.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    g = ap.add_argument_group("generation")
    g.add_argument("--generate", nargs="+", metavar="PROMPT", help="sample continuations of these prompts and exit")
    g.add_argument("--model", type=Path, help="a run directory or its model/ folder (for --generate)")
    g.add_argument("--max-new-tokens", type=int, default=60)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.95)
    return ap


def parse_args(argv):
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("val_reviews", "val_tokens", "vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size",
                 "steps", "eval_every", "save_every", "max_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_reviews < 0:
        ap.error(f"--train-reviews must be >= 0 (0 = all), got {args.train_reviews}")
    if args.n_embd % args.n_head:
        ap.error(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    if args.generate and args.model is None:
        ap.error("--generate needs --model DIR (a run directory written by this script)")
    if args.model is not None and not args.generate:
        ap.error("--model is for --generate")
    return args


# ----------------------------------------------------------------------------- data and tokenizer
def load_reviews(args) -> tuple[list[str], list[str]]:
    """Shuffled IMDb *training* reviews: (training texts, held-out validation texts)."""
    if not Path(args.data).exists():
        raise CliError(f"--data {args.data}: no such file or folder (the IMDb archive aclImdb_v1.tar.gz)")
    texts = [html_clean(t) for t in load_imdb_splits(args.data, ("train",))["train"].texts]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    texts = [texts[i] for i in order]
    if args.val_reviews >= len(texts):
        raise CliError(f"--val-reviews {args.val_reviews} leaves no training reviews (the split has {len(texts)})")
    val, train = texts[: args.val_reviews], texts[args.val_reviews:]
    if args.train_reviews:
        train = train[: args.train_reviews]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, n_positions: int):
    """A byte-level BPE (GPT-2's scheme) learned from ``texts``, saved with the files
    ``transformers.AutoTokenizer`` needs."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    with atomic_dir(out_dir) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        write_json({"tokenizer_class": "GPT2TokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
                    "model_max_length": n_positions, "add_prefix_space": False}, tmp / "tokenizer_config.json")
    return load_tokenizer(out_dir)


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise CliError(f"{path}: no tokenizer.json (is it a run directory written by this script?)")
    return Tokenizer.from_file(str(f))


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """``text_1 <eot> text_2 <eot> ...`` as one 1-D tensor of ids."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eot]
    return torch.tensor(ids, dtype=torch.long)


def train_batch(stream: torch.Tensor, key, step: int, batch: int, block: int) -> torch.Tensor:
    """``batch`` windows of ``block + 1`` tokens at offsets drawn from ``fold_in(key, step)``."""
    starts = random.bits(random.fold_in(key, step), (batch,)) % (len(stream) - block - 1)
    return stream[starts[:, None] + torch.arange(block + 1)]


def val_windows(stream: torch.Tensor, block: int, max_tokens: int) -> torch.Tensor:
    """Consecutive, non-overlapping windows of ``block + 1`` tokens (``block`` targets each)."""
    n = min(max_tokens // block, (len(stream) - 1) // block)
    if n < 1:
        raise CliError(f"the validation reviews hold {len(stream)} tokens, fewer than one window of {block + 1}")
    return torch.stack([stream[i * block: i * block + block + 1] for i in range(n)])


def bigram_perplexity(train: torch.Tensor, windows: torch.Tensor, vocab: int) -> float:
    """Add-one bigram ``p(b | a) = (c(a, b) + 1) / (c(a) + V)`` from the training stream, evaluated
    on the same (previous, target) pairs as the GPT's validation loss."""
    counts = torch.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).reshape(vocab, vocab).double()
    logp = torch.log(counts + 1.0) - torch.log(counts.sum(1, keepdim=True) + vocab)
    a, b = windows[:, :-1].reshape(-1), windows[:, 1:].reshape(-1)
    return math.exp(-logp[a, b].mean().item())


# ----------------------------------------------------------------------------- training
def plot_curves(path: Path, history: list[dict], evals: list[dict], bigram_ppl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.8, label="training loss")
    ax1.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation loss")
    ax1.axhline(math.log(bigram_ppl), color="grey", ls="--", label="add-one bigram (validation)")
    ax1.set_xlabel("step"), ax1.set_ylabel("cross-entropy (nats/token)"), ax1.legend()
    ax2.plot([e["step"] for e in evals], [e["val_ppl"] for e in evals], "o-", color="C1", label="GPT")
    ax2.axhline(bigram_ppl, color="grey", ls="--", label="add-one bigram")
    ax2.set_yscale("log"), ax2.set_xlabel("step"), ax2.set_ylabel("validation perplexity"), ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def sample_texts(params, cfg, tok, prompts, *, max_new_tokens, seed, temperature=0.8, top_k=50, top_p=0.95,
                 compile=True) -> list[str]:
    eot = tok.token_to_id(EOT)
    ids = [tok.encode(p).ids for p in prompts]
    if any(not x for x in ids):
        raise CliError("every prompt needs at least one token (got an empty prompt)")
    # a prompt as long as the context keeps only its last half (a sliding window); the continuation
    # stops where the context is full
    ids = [x if len(x) < cfg.n_positions else x[-(cfg.n_positions // 2):] for x in ids]
    room = cfg.n_positions - max(len(x) for x in ids)
    out = generate(params, cfg, ids, max_new_tokens=min(max_new_tokens, room), key=random.key(seed),
                   temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=[eot], compile=compile)
    return [p + tok.decode([t for t in new if t != eot]) for p, new in zip(prompts, out)]


def train(args) -> int:
    t_start = time.time()
    out = args.resume if args.resume is not None else args.out
    if args.resume is not None:
        saved = RunCheckpoints.saved_config(out)
        if saved is None:
            raise CliError(f"--resume {out}: no checkpoint found")
        for name in SETTINGS:  # the run's own settings, so that `--resume DIR` alone suffices
            setattr(args, name, saved["--" + name.replace("_", "-")])
    elif out.exists() and worker_rank(args) == 0:  # --shard: worker 0 sets the run directory up
        if not args.overwrite:
            raise CliError(f"--out {out} already exists (pass --overwrite to replace it, or --resume {out})")
        import shutil

        shutil.rmtree(out)
    torch.manual_seed(args.seed)

    train_texts, val_texts = load_reviews(args)
    tok_dir = out / "tokenizer"
    t0 = time.time()
    tok = load_tokenizer(tok_dir) if args.resume is not None else worker0_first(
        args, lambda: train_tokenizer(train_texts, args.vocab_size, tok_dir, args.block_size),
        lambda: load_tokenizer(tok_dir))
    train_ids, val_ids = token_stream(tok, train_texts), token_stream(tok, val_texts)
    vocab = tok.get_vocab_size()
    windows = val_windows(val_ids, args.block_size, args.val_tokens)
    bigram_ppl = bigram_perplexity(train_ids, windows, vocab)
    print(f"{len(train_texts)} training / {len(val_texts)} validation reviews (IMDb train split); byte-level BPE "
          f"of {vocab} tokens; {len(train_ids):,} / {len(val_ids):,} tokens ({time.time() - t0:.1f}s)", flush=True)
    print(f"add-one bigram baseline: validation perplexity {bigram_ppl:.1f} on {windows[:, 1:].numel():,} tokens",
          flush=True)

    cfg = GPT2Config(vocab_size=vocab, n_positions=args.block_size, n_embd=args.n_embd, n_layer=args.n_layer,
                     n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                     bos_token_id=tok.token_to_id(EOT), eos_token_id=tok.token_to_id(EOT))
    k_init, k_data, k_train = random.split(random.key(args.seed), 3)
    params = init_gpt2(k_init, cfg)
    schedule = optim.cosine(args.lr, args.steps, warmup_steps=args.warmup, final_lr=args.min_lr)
    optimizer = optim.chain(optim.clip_by_global_norm(args.clip),
                            optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=args.weight_decay))
    opt_state = optimizer.init(params)
    print(f"GPT-2: {args.n_layer} layers, {args.n_head} heads, d_model {args.n_embd}, context {args.block_size}: "
          f"{num_params(params) / 1e6:.2f}M parameters; {args.steps} steps of {args.batch_size} x {args.block_size} "
          "tokens", flush=True)

    def loss_fn(p, batch, key):
        return lm_loss(p, batch, cfg, key=key, train=True), {}

    def eval_fn(p, batch):
        return {"loss": lm_loss(p, batch, cfg)}

    compile_ = not args.no_compile
    train_step = make_train_step(loss_fn, optimizer, compile=compile_)
    eval_step = make_eval_step(eval_fn, compile=compile_)
    config = {"--" + n.replace("_", "-"): getattr(args, n) for n in SETTINGS}
    config["tokenizer (contents)"] = digest({"ids": torch.tensor([i for _, i in sorted(tok.get_vocab().items())])})
    config["data (contents)"] = digest({"train": train_ids, "val": val_ids})
    ckpts = RunCheckpoints(out, config, keep=2)
    if args.shard is not None:  # the same loop over what this worker holds (see shard_run)
        params, opt_state, train_step, eval_step, ckpts, finish = shard_run(
            args, params, loss_fn, eval_fn, schedule, compile_, ckpts, out)

    log = {"history": [], "evals": [], "train_s": 0.0, "tokens": 0}
    step = 0
    if args.resume is not None:
        state = ckpts.restore()
        params, opt_state, step, log = state.params, state.opt_state, state.step, state.extra
        print(f"resumed from {state.path} (step {step} of {args.steps})", flush=True)

    def validate() -> dict:
        losses = [float(eval_step(params, windows[i: i + args.batch_size])["loss"])
                  for i in range(0, len(windows), args.batch_size)]
        sizes = [len(windows[i: i + args.batch_size]) for i in range(0, len(windows), args.batch_size)]
        val_loss = sum(l * n for l, n in zip(losses, sizes)) / sum(sizes)
        entry = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)}
        log["evals"].append(entry)
        return entry

    from tqdm.auto import tqdm

    session_steps = 0
    stop = GracefulStop()
    with stop, tqdm(total=args.steps, initial=step, desc="pretraining", unit="step", dynamic_ncols=True,
                    disable=None) as bar:
        while step < args.steps:
            batch = train_batch(train_ids, k_data, step, args.batch_size, args.block_size)
            t = time.time()
            params, opt_state, metrics = train_step(params, opt_state, batch, random.fold_in(k_train, step))
            loss = float(metrics["loss"])
            if session_steps > 0:  # the first call of a session compiles: not counted in tokens/s
                log["train_s"] += time.time() - t
                log["tokens"] += batch[:, 1:].numel()
            step += 1
            session_steps += 1
            log["history"].append({"step": step, "loss": loss, "lr": float(metrics["lr"])})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % args.eval_every == 0 or step == args.steps:
                e = validate()
                bar.write(f"step {step}: validation loss {e['val_loss']:.3f}, perplexity {e['val_ppl']:.1f} "
                          f"(bigram {bigram_ppl:.1f})")
            stopping = stop.requested or (args.stop_after is not None and session_steps >= args.stop_after)
            if step % args.save_every == 0 or step == args.steps or stopping:
                ckpts.save(params, opt_state, step, k_train, log)
            if stopping and step < args.steps:
                bar.write(f"stopped after step {step}; continue with: python {sys.argv[0]} --resume {out}")
                return 0

    if args.shard is not None:
        params = finish(params)  # the whole tree (a collective at level 3); None on workers other than 0
        if params is None:
            return 0
    # ---- the finished run: model, curves, samples, metrics (last)
    save_gpt2(params, cfg, out / "model", tokenizer_dir=tok_dir)
    plot_curves(out / "curves.png", log["history"], log["evals"], bigram_ppl)
    samples = sample_texts(params, cfg, tok, list(PROMPTS), max_new_tokens=args.max_new_tokens, seed=args.seed,
                           compile=compile_)
    with atomic_path(out / "samples.txt") as tmp:
        tmp.write_text("\n\n".join(samples) + "\n")
    print("\nsamples (temperature 0.8, top-k 50, top-p 0.95):")
    for s in samples:
        print(f"  {s!r}")
    final = log["evals"][-1]
    tokens_per_s = log["tokens"] / log["train_s"] if log["train_s"] else float("nan")
    metrics = {"val_loss": final["val_loss"], "val_perplexity": final["val_ppl"], "bigram_val_perplexity": bigram_ppl,
               "steps": step, "train_tokens_per_s": tokens_per_s, "evals": log["evals"], "history": log["history"],
               "params": num_params(params), "config": config, "wall_s": time.time() - t_start}
    write_json(metrics, out / "metrics.json")
    print(f"\nvalidation perplexity {final['val_ppl']:.1f} (add-one bigram: {bigram_ppl:.1f}); "
          f"{tokens_per_s:,.0f} training tokens/s; model in {out / 'model'}", flush=True)
    return 0


def worker_rank(args) -> int:
    """This worker's rank under ``torchrun`` with ``--shard`` (0 otherwise)."""
    return int(os.environ.get("RANK", 0)) if args.shard is not None else 0


def worker0_first(args, first, others):
    """``first()`` on worker 0, then (after a barrier) ``others()`` on the other workers."""
    if args.shard is None or "WORLD_SIZE" not in os.environ:
        return first()
    from fnlm.train.distributed import init_distributed

    rank, _, _ = init_distributed(timeout=600)
    result = first() if rank == 0 else None
    torch.distributed.barrier()
    return result if rank == 0 else others()


def shard_run(args, params, loss_fn, eval_fn, schedule, compile_, ckpts, out):
    """``--shard L``: ``(held, opt_state, train_step, eval_step, ckpts, finish)`` for this worker.

    The train step takes the global batch and passes this worker its rows; the eval step gathers
    the parameters (``Sharding.unshard``) for every batch. With one process the run's checkpoints
    are the usual ones (resumable); with several, each is a sharded checkpoint
    (``fnlm.train.save_sharded``, every worker writes its part) in ``checkpoints-sharded/step-N``,
    the last two kept. ``finish(held)``: the whole parameter tree on worker 0, ``None`` on the others
    (which print nothing and write no outputs).
    """
    from fnlm.train import Sharding, make_sharded_train_step, save_sharded
    from fnlm.train.distributed import init_distributed

    rank, world, _ = init_distributed(timeout=600)
    if args.batch_size % world:
        raise CliError(f"--batch-size {args.batch_size} must be divisible by the {world} workers")
    if world > 1 and args.resume is not None:
        raise CliError("--resume with --shard on several workers is not supported yet; resume on one process")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    sharding = Sharding(params, args.shard)
    adamw = optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=args.weight_decay)
    held = sharding.shard(params)
    state = sharding.init(adamw, held)
    step = make_sharded_train_step(loss_fn, adamw, sharding, max_grad_norm=args.clip, compile=compile_)
    evaluate = make_eval_step(eval_fn, compile=compile_)
    print(f"{sharding}", flush=True)

    class ShardedCheckpoints:
        def save(self, held, opt_state, step, key, extra):
            root = out / "checkpoints-sharded"
            save_sharded(root / f"step-{step:07d}", sharding, held, opt_state, step, key, extra)
            if rank == 0:
                import shutil

                for old in sorted(root.glob("step-*"))[:-2]:
                    shutil.rmtree(old, ignore_errors=True)

    def finish(held):
        whole = sharding.unshard(held)
        return whole if rank == 0 else None

    return (held, state, lambda p, s, b, k: step(p, s, sharding.split_batch(b), k),
            lambda p, b: evaluate(sharding.unshard(p), b), ckpts if world == 1 else ShardedCheckpoints(), finish)


# ----------------------------------------------------------------------------- generation
def generate_cli(args) -> int:
    model_dir = args.model / "model" if (args.model / "model" / "config.json").is_file() else args.model
    if not (model_dir / "config.json").is_file():
        raise CliError(f"--model {args.model}: no config.json (pass a finished run directory or its model/ folder)")
    params, cfg = load_gpt2(model_dir)
    tok = load_tokenizer(model_dir)
    for text in sample_texts(params, cfg, tok, args.generate, max_new_tokens=args.max_new_tokens, seed=args.seed,
                             temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, compile=False):
        print(text, end="\n\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return generate_cli(args) if args.generate else train(args)
    except (CliError, DatasetError, ResumeError, fnlm.io.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
