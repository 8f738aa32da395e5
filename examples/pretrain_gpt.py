"""Pretrain a small GPT from scratch on IMDb review text, then sample from it.

The decoder-only half of "a large model from scratch", in pure functions: a byte-level BPE
tokenizer trained (Hugging Face ``tokenizers``, seconds) on the IMDb *training* reviews, a GPT-2
initialised from a key, the compiled training step (AdamW, warm-up + cosine, gradient clipping),
validation loss and perplexity on held-out training reviews at intervals, and samples from a few
prompts at the end. The IMDb *test* split is never read.

    # the default run: 6000 steps of 16 x 128 tokens, evaluated and checkpointed every 500
    python examples/pretrain_gpt.py --data ../shared/data/aclImdb_v1_labelled.tar.gz

    # data parallel: N worker processes, each with --batch-size/N windows of every step (docs/scaling.md)
    torchrun --nproc_per_node=2 examples/pretrain_gpt.py --data ../shared/data/aclImdb_v1_labelled.tar.gz

    # sample from a trained run (a run directory or its model/ folder)
    python examples/pretrain_gpt.py --model runs/gpt-imdb --generate "This movie was" "I expected"

    # an interrupted run (Ctrl-C, SIGTERM, a killed process) continues exactly from its last checkpoint;
    # a finished one trains further with a larger --steps (the cosine is re-planned over the new total)
    python examples/pretrain_gpt.py --resume runs/gpt-imdb
    python examples/pretrain_gpt.py --resume runs/gpt-imdb --steps 8000

    # settings from a JSON (or TOML) file, flags on top; --print-config shows the result
    python examples/pretrain_gpt.py --config gpt.json --steps 3000 --print-config

Batches are random windows of ``--block-size + 1`` tokens of the concatenated training reviews
(separated by ``<|endoftext|>``); the window offsets of step ``s`` are drawn from
``fold_in(data_key, s)``, so a resumed run sees exactly the batches it would have seen.

The run directory (``--out``, default ``runs/gpt-imdb``; ``fnlm.train.Run``) is ``.<name>.partial``
while unfinished: ``run_config.json``, ``metrics.jsonl`` (a line per step and evaluation),
``tokenizer/`` and ``checkpoints/`` (every ``--save-every`` steps and on SIGINT/SIGTERM). The finished
one holds ``model/`` (Hugging Face layout: ``GPT2LMHeadModel.from_pretrained`` loads it),
``tokenizer/``, ``curves.png`` (training and validation loss, validation perplexity), ``samples.txt``,
``metrics.json``, ``README.md`` (model card), ``environment.json`` and the last checkpoint. The
validation perplexity of an add-one bigram model on the same tokens is printed beside the GPT's:
what the Transformer bought.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fnlm import optim, random
from fnlm.config import check, check_ranges, cli_main, config_to_dict, option, parse_config
from fnlm.data import html_clean, load_imdb_splits
from fnlm.io import atomic_dir, write_json
from fnlm.models import GPT2Config, generate, init_gpt2, lm_loss, load_gpt2, save_gpt2
from fnlm.train import DataParallel, Progress, Run, digest, make_eval_step, make_train_step, model_card
from fnlm.tree import num_params

EOT = "<|endoftext|>"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "aclImdb_v1_labelled.tar.gz"
PROMPTS = ("This movie was", "I have never seen", "The acting in this film", "My favourite scene")


@dataclass(frozen=True)
class GptConfig:
    # data and tokenizer
    data: Path = option(DEFAULT_DATA, "aclImdb_v1 archive or folder (its train split is used)")
    train_reviews: int = option(0, "training reviews (0 = all but the validation ones)", ge=0)
    val_reviews: int = option(1000, "held-out training reviews for validation", ge=1)
    val_tokens: int = option(65536, "validation tokens evaluated (at most)", ge=1)
    vocab_size: int = option(512, "byte-level BPE vocabulary", ge=1)
    # model and training
    n_layer: int = option(4, "Transformer blocks", ge=1)
    n_head: int = option(4, "attention heads per block", ge=1)
    n_embd: int = option(128, "model width (d_model)", ge=1)
    block_size: int = option(128, "context length (n_positions)", ge=1)
    batch_size: int = option(16, "windows per step", ge=1)
    steps: int = option(6000, "training steps (a larger value on --resume trains a run further)", ge=1)
    lr: float = option(2e-3, "peak learning rate (AdamW)", gt=0)
    min_lr: float = option(2e-4, "learning rate at the end of the cosine", ge=0)
    warmup: int = option(100, "linear warm-up steps", ge=0)
    weight_decay: float = option(0.1, "AdamW's decoupled weight decay", ge=0)
    clip: float = option(1.0, "clip gradients to this global L2 norm; 0 = no clipping", ge=0)
    dropout: float = option(0.0, "embedding/residual/attention dropout", ge=0, lt=1)
    seed: int = option(0, "init, batches and dropout all derive from it")
    # how this process runs (a resumed run takes these from its command line)
    compile: bool = option(True, "compile the steps with torch.compile (--no-compile: eager)")
    stop_after: int | None = option(
        None, "stop (with a checkpoint) after this many steps of this session; --resume continues", ge=1
    )
    # evaluation, checkpoints and output
    eval_every: int = option(500, "validation loss every N steps (and at the last)", ge=1)
    save_every: int = option(500, "write a checkpoint every N steps (and at the last)", ge=1)
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", ge=1)
    report_to: str | None = option(None, "also log the scalars for TensorBoard", choices=("tensorboard",))
    out: Path | None = option(None, "run directory (default runs/gpt-imdb)")
    resume: Path | None = option(
        None,
        "continue this run: a stopped one from its last checkpoint, a finished one with a larger --steps",
        metavar="RUN_DIR",
    )
    overwrite: bool = option(False, "replace an existing --out")
    # generation (also the samples written at the end of training)
    generate: tuple[str, ...] = option((), "sample continuations of these prompts and exit", metavar="PROMPT")
    model: Path | None = option(None, "a run directory or its model/ folder (for --generate)")
    max_new_tokens: int = option(60, "tokens sampled per prompt (at most)", ge=1)
    temperature: float = option(0.8, "softmax temperature; 0 = greedy", ge=0)
    top_k: int = option(50, "sample among the k most likely tokens; 0 = all", ge=0)
    top_p: float = option(0.95, "sample among the most likely tokens holding this probability (nucleus)", gt=0, le=1)

    def __post_init__(self):
        check_ranges(self)
        check(self.n_embd % self.n_head == 0, "--n-embd {} must be divisible by --n-head {}", self.n_embd, self.n_head)
        check(self.min_lr <= self.lr, "--min-lr must be <= --lr ({}), got {}", self.lr, self.min_lr)
        check(
            not self.generate or self.model is not None,
            "--generate needs --model DIR (a run directory written by this script)",
        )
        check(self.model is None or bool(self.generate), "--model is for --generate")
        object.__setattr__(self, "data", self.data.expanduser().resolve())  # --resume from elsewhere: the same path


# Settings a resumed run takes from its command line (else the run's); every other one must agree.
MAY_CHANGE = (
    "data",
    "steps",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "report_to",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
)
PER_SESSION = ("out", "resume", "overwrite", "compile", "stop_after", "generate", "model")


def main(argv: list[str] | None = None) -> int:
    cfg, explicit = parse_config(GptConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.generate:
        return generate_cli(cfg)
    # under torchrun: this worker of N (one process: a no-op); the run directory is rank 0's
    with (
        DataParallel.start() as dp,
        dp.open_run(
            cfg,
            explicit,
            out=cfg.out,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            name="gpt-imdb",
            may_change=MAY_CHANGE,
            per_session=PER_SESSION,
            repeat=("compile",),
            report_to=cfg.report_to,
            divisible=("batch_size",),
        ) as run,
    ):  # N workers: each takes batch_size / N windows of every step
        return train(run, run.config, dp)


# ----------------------------------------------------------------------------- data and tokenizer
def load_reviews(cfg) -> tuple[list[str], list[str]]:
    """Shuffled IMDb *training* reviews: (training texts, held-out validation texts)."""
    texts = [html_clean(t) for t in load_imdb_splits(cfg.data, ("train",))["train"].texts]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    texts = [texts[i] for i in order]
    if cfg.val_reviews >= len(texts):
        raise ValueError(f"--val-reviews {cfg.val_reviews} leaves no training reviews (the split has {len(texts)})")
    val, train = texts[: cfg.val_reviews], texts[cfg.val_reviews :]
    if cfg.train_reviews:
        train = train[: cfg.train_reviews]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, n_positions: int):
    """A byte-level BPE (GPT-2's scheme) learned from ``texts``, saved with the files
    ``transformers.AutoTokenizer`` needs."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    with atomic_dir(out_dir) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        write_json(
            {
                "tokenizer_class": "GPT2TokenizerFast",
                "bos_token": EOT,
                "eos_token": EOT,
                "unk_token": EOT,
                "model_max_length": n_positions,
                "add_prefix_space": False,
            },
            tmp / "tokenizer_config.json",
        )
    return load_tokenizer(out_dir)


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise OSError(f"{path}: no tokenizer.json (is it a run directory written by this script?)")
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
        raise ValueError(f"the validation reviews hold {len(stream)} tokens, fewer than one window of {block + 1}")
    return torch.stack([stream[i * block : i * block + block + 1] for i in range(n)])


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
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def sample_texts(params, cfg: GPT2Config, tok, prompts: list[str], s: GptConfig, *, compile: bool) -> list[str]:
    """Continuations of ``prompts`` sampled with the settings of ``s`` (temperature, top-k, top-p, seed)."""
    eot = tok.token_to_id(EOT)
    ids = [tok.encode(p).ids for p in prompts]
    if any(not x for x in ids):
        raise ValueError("every prompt needs at least one token (got an empty prompt)")
    # a prompt as long as the context keeps only its last half (a sliding window); the continuation
    # stops where the context is full
    ids = [x if len(x) < cfg.n_positions else x[-(cfg.n_positions // 2) :] for x in ids]
    room = cfg.n_positions - max(len(x) for x in ids)
    out = generate(
        params,
        cfg,
        ids,
        max_new_tokens=min(s.max_new_tokens, room),
        key=random.key(s.seed),
        temperature=s.temperature,
        top_k=s.top_k or None,
        top_p=s.top_p,
        stop_tokens=[eot],
        compile=compile,
    )
    return [p + tok.decode([t for t in new if t != eot]) for p, new in zip(prompts, out)]


def train(run: Run, cfg: GptConfig, dp: DataParallel) -> int:
    t_start = time.time()
    print(f"run directory: {run.dir}", flush=True)
    if not cfg.data.exists():
        raise OSError(f"--data {cfg.data}: no such file or folder (the IMDb archive aclImdb_v1.tar.gz)")
    torch.manual_seed(cfg.seed)

    # 1. The text and the tokenizer (trained on the training reviews; a resumed run reads its own).
    train_texts, val_texts = load_reviews(cfg)
    t0 = time.time()
    if run.resuming:  # a finished run being extended keeps its tokenizer in the finished directory
        tok_dir = next((d for d in (run.dir / "tokenizer", run.out / "tokenizer") if d.is_dir()), run.dir / "tokenizer")
        tok = load_tokenizer(tok_dir)
    else:
        tok_dir = run.dir / "tokenizer"
        tok = dp.from_main(lambda: train_tokenizer(train_texts, cfg.vocab_size, tok_dir, cfg.block_size))
    train_ids, val_ids = token_stream(tok, train_texts), token_stream(tok, val_texts)
    vocab = tok.get_vocab_size()
    windows = val_windows(val_ids, cfg.block_size, cfg.val_tokens)
    bigram_ppl = bigram_perplexity(train_ids, windows, vocab)
    print(
        f"{len(train_texts)} training / {len(val_texts)} validation reviews (IMDb train split); byte-level BPE "
        f"of {vocab} tokens; {len(train_ids):,} / {len(val_ids):,} tokens ({time.time() - t0:.1f}s)",
        flush=True,
    )
    print(
        f"add-one bigram baseline: validation perplexity {bigram_ppl:.1f} on {windows[:, 1:].numel():,} tokens",
        flush=True,
    )

    # 2. The model and the optimizer: clipping, then AdamW with warm-up and a cosine over --steps.
    gcfg = GPT2Config(
        vocab_size=vocab,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tok.token_to_id(EOT),
        eos_token_id=tok.token_to_id(EOT),
    )
    k_init, k_data, k_train = random.split(random.key(cfg.seed), 3)
    params = init_gpt2(k_init, gcfg)
    schedule = optim.cosine(cfg.lr, cfg.steps, warmup_steps=cfg.warmup, final_lr=cfg.min_lr)
    optimizer = optim.chain(
        optim.clip_by_global_norm(cfg.clip),
        optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=cfg.weight_decay),
    )
    opt_state = optimizer.init(params)
    print(
        f"GPT-2: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.n_embd}, context {cfg.block_size}: "
        f"{num_params(params) / 1e6:.2f}M parameters; {cfg.steps} steps of {cfg.batch_size} x {cfg.block_size} "
        "tokens",
        flush=True,
    )

    # 3. The steps: pure functions of the parameters, compiled once.
    def loss_fn(p, batch, key):
        return lm_loss(p, batch, gcfg, key=key, train=True), {}

    def eval_fn(p, batch):
        return {"loss": lm_loss(p, batch, gcfg)}

    train_step = make_train_step(dp.loss(loss_fn), optimizer, compile=cfg.compile, grad_sync=dp.grad_sync)
    eval_step = make_eval_step(eval_fn, compile=cfg.compile)

    # 4. The run's state: checkpoints are restored only for the same tokenizer and data.
    fingerprint = {
        "tokenizer (contents)": digest({"ids": torch.tensor([i for _, i in sorted(tok.get_vocab().items())])}),
        "data (contents)": digest({"train": train_ids, "val": val_ids}),
    }
    ckpts = run.checkpoints(fingerprint, keep=cfg.keep_checkpoints)
    log = {"history": [], "evals": [], "train_s": 0.0, "tokens": 0}
    step = 0
    if (state := run.restore(ckpts)) is not None:
        params, opt_state, step, log = state.params, state.opt_state, state.step, state.extra
        print(f"resumed from {state.path} (step {step} of {cfg.steps})", flush=True)

    def validate() -> dict:
        chunks = [windows[i : i + cfg.batch_size] for i in range(0, len(windows), cfg.batch_size)]
        losses = dp.map(lambda c: float(eval_step(params, c)["loss"]), chunks)  # N workers: split, gathered
        val_loss = sum(loss * len(c) for loss, c in zip(losses, chunks)) / len(windows)
        entry = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)}
        log["evals"].append(entry)
        run.log({"kind": "eval", **entry})
        return entry

    # 5. The steps; SIGINT/SIGTERM (or --stop-after) finish the step and checkpoint.
    session_steps = 0
    with run.stop_guard() as stop, Progress(cfg.steps, "pretraining", initial=step) as bar:
        while step < cfg.steps:
            batch = train_batch(train_ids, k_data, step, cfg.batch_size, cfg.block_size)
            if session_steps == 0 and cfg.compile:
                bar.compiling(f"{tuple(batch.shape)}")
            t = time.time()
            params, opt_state, metrics = train_step(params, opt_state, dp.shard(batch), random.fold_in(k_train, step))
            loss = float(metrics["loss"])
            if session_steps > 0:  # the first call of a session compiles: not counted in tokens/s
                log["train_s"] += time.time() - t
                log["tokens"] += batch[:, 1:].numel()
            step, session_steps = step + 1, session_steps + 1
            log["history"].append({"step": step, "loss": loss, "lr": float(metrics["lr"])})
            run.log({"kind": "train", **log["history"][-1]})
            bar.update(loss=f"{loss:.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                e = validate()
                bar.write(
                    f"step {step}: validation loss {e['val_loss']:.3f}, perplexity {e['val_ppl']:.1f} "
                    f"(bigram {bigram_ppl:.1f})"
                )
            why = dp.agree(stop.requested) or ("--stop-after" if session_steps == cfg.stop_after else None)
            if step % cfg.save_every == 0 or step == cfg.steps or why:
                ckpts.save(params, opt_state, step, k_train, log)
            if why and step < cfg.steps:
                code = run.stopped(step, cfg.steps, why)
                return code if why != "--stop-after" else 0

    # 6. The finished run: model, tokenizer, curves, samples, metrics, model card (written by rank 0).
    if not dp.is_main:
        return 0
    samples = sample_texts(params, gcfg, tok, list(PROMPTS), cfg, compile=cfg.compile)
    final = log["evals"][-1]
    tokens_per_s = log["tokens"] / log["train_s"] if log["train_s"] else float("nan")
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in PER_SESSION}
    metrics = {
        "val_loss": final["val_loss"],
        "val_perplexity": final["val_ppl"],
        "bigram_val_perplexity": bigram_ppl,
        "steps": step,
        "train_tokens_per_s": tokens_per_s,
        "evals": log["evals"],
        "history": log["history"],
        "params": num_params(params),
        "config": settings | fingerprint,
        "wall_s": time.time() - t_start,
    }
    with run.finish(ckpts) as tmp:
        shutil.copytree(tok_dir, tmp / "tokenizer")
        save_gpt2(params, gcfg, tmp / "model", tokenizer_dir=tok_dir)
        plot_curves(tmp / "curves.png", log["history"], log["evals"], bigram_ppl)
        (tmp / "samples.txt").write_text("\n\n".join(samples) + "\n")
        write_json(metrics, tmp / "metrics.json")
        (tmp / "README.md").write_text(
            model_card(
                name=run.out.name,
                base_model=None,
                dataset="imdb",
                task="text-generation",
                metrics={
                    "val_perplexity": final["val_ppl"],
                    "val_loss": final["val_loss"],
                    "bigram_val_perplexity": bigram_ppl,
                },
                hyperparameters=settings,
                description=f"A {num_params(params) / 1e6:.2f}M-parameter GPT-2 pretrained from scratch with fnlm on "
                f"{len(train_texts)} IMDb training reviews ({step} steps); validation on {len(val_texts)} "
                "held-out training reviews.",
            ),
            encoding="utf-8",
        )
    print(f"\nsamples (temperature {cfg.temperature:g}, top-k {cfg.top_k}, top-p {cfg.top_p:g}):")
    for s in samples:
        print(f"  {s!r}")
    print(
        f"\nvalidation perplexity {final['val_ppl']:.1f} (add-one bigram: {bigram_ppl:.1f}); "
        f"{tokens_per_s:,.0f} training tokens/s; model in {run.out / 'model'}",
        flush=True,
    )
    return 0


# ----------------------------------------------------------------------------- generation
def generate_cli(cfg: GptConfig) -> int:
    model_dir = cfg.model / "model" if (cfg.model / "model" / "config.json").is_file() else cfg.model
    if not (model_dir / "config.json").is_file():
        raise OSError(f"--model {cfg.model}: no config.json (pass a finished run directory or its model/ folder)")
    params, gcfg = load_gpt2(model_dir)
    for text in sample_texts(params, gcfg, load_tokenizer(model_dir), list(cfg.generate), cfg, compile=False):
        print(text, end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
