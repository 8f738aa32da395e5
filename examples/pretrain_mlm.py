"""Continued (domain-adaptive) masked-language-model pretraining of a BERT on IMDb reviews, and fill-mask.

BERT's own objective on in-domain text before fine-tuning (Gururangan et al. 2020, "Don't Stop
Pretraining"): every step masks a fresh 15% of the tokens from that step's random key (80%
[MASK], 10% random token, 10% unchanged; ``--whole-word`` masks all pieces of a word together),
and the model predicts them. Only the training split's text is used (plus ``aclImdb/train/unsup``
when the archive has it), never the test split's: the test reviews stay unseen for the
fine-tuning run that follows. A held-out slice of the training reviews gives MLM loss and
accuracy at intervals. The output directory is a Hugging Face ``BertForMaskedLM`` checkpoint (it
keeps the source's pooler), which ``examples/finetune_imdb.py --weights DIR`` fine-tunes.

``--nsp`` adds BERT's second objective, next-sentence prediction (Devlin et al. 2019, §3.1): the
examples are sentence pairs ``[CLS] A [SEP] B [SEP]`` packed to ``--max-len`` from the training
reviews (``fnlm.data.nsp_pairs``: half with B the actual continuation of A, half with B from
another review, drawn afresh each epoch), masked as above; the loss is ``L_MLM + L_NSP``
(``fnlm.models.pretraining_loss``), the held-out pairs (from the held-out training reviews) give
NSP loss and accuracy beside the MLM ones, and the output is a ``BertForPreTraining`` checkpoint.

    python examples/pretrain_mlm.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --out runs/mlm
    python examples/finetune_imdb.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --weights runs/mlm

    # MLM + next-sentence prediction on sentence pairs (a BertForPreTraining checkpoint)
    python examples/pretrain_mlm.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --nsp --out runs/mlm-nsp

    # data parallel: N worker processes, each with --batch-size/N reviews of every step (docs/scaling.md)
    torchrun --nproc_per_node=2 examples/pretrain_mlm.py --data ../shared/data/aclImdb_v1_labelled.tar.gz

    # a stopped run (Ctrl-C, SIGTERM, a killed process) continues exactly, with any number of workers;
    # a finished one trains further
    python examples/pretrain_mlm.py --resume runs/mlm
    python examples/pretrain_mlm.py --resume runs/mlm --steps 600

    # fill-mask with the result (or any BERT with an MLM head)
    python examples/pretrain_mlm.py --model runs/mlm --predict "the film was [MASK] ."

The run directory (``fnlm.train.Run``) is ``.<name>.partial`` while unfinished (``run_config.json``,
``metrics.jsonl``, ``checkpoints/``); the finished one also holds ``metrics.json``, ``README.md`` (model
card), ``environment.json`` and its last checkpoint (for ``--resume`` with a larger ``--steps``).

all-MiniLM-L6-v2 (the default ``--weights``) was distilled without an MLM head (nor an NSP head):
the run then starts from freshly initialised heads, the MLM one tied to the word embeddings, and says so.
"""

from __future__ import annotations

import functools
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fnlm
from fnlm import optim, random
from fnlm.config import check, check_ranges, cli_main, config_to_dict, option, parse_config
from fnlm.data import bucket_lengths, download_imdb, html_clean, load_imdb_splits, make_batches, nsp_pairs
from fnlm.io import CheckpointError, MissingHeadError, MissingPoolerError, ensure_minilm, write_json
from fnlm.models import bert_mlm, init_nsp_head, load_pretrained, mask_tokens, mlm_loss, pretraining_loss, save_bert
from fnlm.train import DataParallel, Progress, Run, digest, make_eval_step, make_train_step, model_card
from fnlm.tree import num_params

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "weights" / "all-MiniLM-L6-v2"
TEXT_SPLITS = ("train", "unsup")  # the only IMDb text pretraining may read


@dataclass(frozen=True)
class MlmConfig:
    # data and model
    data: Path | None = option(None, "IMDb archive or folder (default: download into ~/.cache/fnlm)")
    splits: str = option(
        "train,unsup",
        "IMDb text to pretrain on: train and/or unsup (unsup is used when the "
        "archive has it); the test split is refused",
    )
    train_size: int = option(0, "use only this many reviews (0 = all)", ge=0)
    eval_size: int = option(200, "training reviews held out for the MLM evaluation", ge=0)
    weights: Path = option(DEFAULT_WEIGHTS, "the BERT checkpoint to continue from")
    max_len: int = option(128, "word pieces per review ([CLS], [SEP] included)", ge=1)
    # training
    steps: int = option(300, "training steps (a larger value on --resume trains a run further)", ge=1)
    batch_size: int = option(16, "reviews per step", ge=1)
    lr: float = option(1e-4, "peak learning rate (AdamW, linear warm-up and decay)", gt=0)
    warmup: float = option(0.06, "warm-up, as a fraction of --steps", ge=0, lt=1)
    weight_decay: float = option(0.01, "AdamW's decoupled weight decay", ge=0)
    clip: float = option(1.0, "clip gradients to this global L2 norm; 0 = no clipping", ge=0)
    mask_prob: float = option(0.15, "fraction of the word pieces masked at each step", gt=0, lt=1)
    whole_word: bool = option(False, "mask all word pieces of a word together")
    nsp: bool = option(
        False,
        "also train next-sentence prediction on sentence pairs of the training reviews "
        "(half IsNext, half NotNext; loss MLM + NSP); saves a BertForPreTraining checkpoint",
    )
    seed: int = option(0, "head init, data order, masks and dropout derive from it")
    compile: bool = option(True, "compile the steps with torch.compile (--no-compile: eager)")
    # evaluation, checkpoints and output
    eval_every: int = option(100, "held-out MLM loss / accuracy every N steps (and at the last)", ge=1)
    save_every: int = option(100, "write a checkpoint every N steps (and at the last)", ge=1)
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", ge=1)
    report_to: str | None = option(None, "also log the scalars for TensorBoard", choices=("tensorboard",))
    out: Path | None = option(None, "output directory (default runs/mlm-<timestamp>)")
    resume: Path | None = option(
        None,
        "continue this run: a stopped one from its last checkpoint, a finished one with a larger --steps",
        metavar="RUN_DIR",
    )
    overwrite: bool = option(False, "replace an existing --out")
    # fill-mask
    predict: tuple[str, ...] = option((), "print the top-k fillers of each [MASK] and exit", metavar="TEXT")
    model: Path | None = option(None, "an MLM checkpoint directory for --predict (default --weights)")
    top_k: int = option(5, "fillers printed per [MASK]", ge=1)

    def __post_init__(self):
        check_ranges(self)
        splits = [s.strip() for s in self.splits.split(",") if s.strip()]
        check(
            "test" not in splits,
            "--splits: refusing to pretrain on the IMDb test split's text (it is the "
            "held-out evaluation set of the fine-tuning that follows); use train and/or unsup",
        )
        check(
            bool(splits) and set(splits) <= set(TEXT_SPLITS),
            "--splits must name train and/or unsup, got {!r}",
            self.splits,
        )
        check(self.model is None or bool(self.predict), "--model is for --predict")
        object.__setattr__(self, "splits", ",".join(splits))
        for name in ("data", "weights"):  # absolute, so --resume from elsewhere compares the same paths
            if getattr(self, name) is not None:
                object.__setattr__(self, name, getattr(self, name).expanduser().resolve())


# Settings a resumed run takes from its command line (else the run's); every other one must agree.
MAY_CHANGE = ("data", "steps", "eval_every", "save_every", "keep_checkpoints", "report_to", "top_k")
PER_SESSION = ("out", "resume", "overwrite", "compile", "predict", "model")


def main(argv: list[str] | None = None) -> int:
    cfg, explicit = parse_config(MlmConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.predict:
        return predict(cfg)
    # under torchrun: this worker of N (one process: a no-op); the run directory is rank 0's
    with (
        DataParallel.start() as dp,
        dp.open_run(
            cfg,
            explicit,
            out=cfg.out,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            name="mlm-%Y%m%d-%H%M%S",
            may_change=MAY_CHANGE,
            per_session=PER_SESSION,
            repeat=("compile",),
            report_to=cfg.report_to,
            divisible=("batch_size",),
        ) as run,
    ):  # N workers: each takes batch_size / N reviews (or pairs) of every step
        return train(run, run.config, dp)


# ----------------------------------------------------------------------------- data
def read_unsup(path: Path) -> list[str] | None:
    """The unlabelled reviews ``aclImdb/train/unsup/*.txt`` of an archive or folder (None if absent)."""
    member = re.compile(r"(?:^|/)aclImdb/train/unsup/\d+_\d+\.txt$")
    texts = []
    if path.is_dir():
        for f in sorted(path.glob("**/aclImdb/train/unsup/*.txt")):
            texts.append(f.read_text(encoding="utf-8"))
    else:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and member.search(m.name):
                    texts.append(tar.extractfile(m).read().decode("utf-8"))
    return texts or None


def load_texts(cfg, path: Path | None = None) -> list[str]:
    """Training-split review texts (+ unsup if asked and present) of ``path`` (default ``--data``, else
    the downloaded archive); never the test split."""
    path = path or (cfg.data if cfg.data is not None else download_imdb())
    splits = cfg.splits.split(",")
    texts: list[str] = []
    if "train" in splits:
        texts += load_imdb_splits(path, ("train",))["train"].texts
    if "unsup" in splits:
        unsup = read_unsup(Path(path))
        if unsup is None:
            print(f"note: {path} has no aclImdb/train/unsup reviews; pretraining on the train split only", flush=True)
        else:
            texts += unsup
    if not texts:
        raise ValueError(f"{path}: no training text found for --splits {cfg.splits}")
    return [html_clean(t) for t in texts]


def load_model(path: Path, key, nsp: bool = False):
    """``(params, pooler, cfg, tokenizer, fresh)``: an MLM model, the source's pooler kept aside
    (None if it has none) so the output can still be fine-tuned as a classifier; with ``nsp`` a
    ``BertForPreTraining`` model (MLM + NSP heads; the pooler stays in: NSP reads the pooled [CLS]).
    What the checkpoint holds is read from which load succeeds: with its heads (and pooler), else
    with fresh heads initialised from ``key``. ``fresh``: the names of the freshly initialised heads."""
    if path == DEFAULT_WEIGHTS and not (path / "config.json").is_file():
        ensure_minilm(path)
    if not (path / "config.json").is_file():
        raise OSError(f"{path}: no config.json, so not a Hugging Face checkpoint directory")
    if not nsp:
        params, cfg, tokenizer, fresh = load_pretrained(path, head="mlm", head_key=key, pooler="if_present")
        fresh = ("mlm",) if fresh else ()
    else:
        try:
            params, cfg, tokenizer, fresh = load_pretrained(path, head="pretraining", head_key=key, pooler=True)
            fresh = ("mlm", "nsp") if fresh else ()
        except MissingPoolerError:
            raise MissingPoolerError(
                f"{path}: the checkpoint has no pooler, which --nsp needs (next-sentence "
                "prediction reads the pooled [CLS] vector)"
            ) from None
        except MissingHeadError:
            raise
        except CheckpointError:  # an MLM head but no NSP head (e.g. a run without --nsp): a fresh NSP head
            params, cfg, tokenizer, fresh = load_pretrained(path, head="mlm", head_key=key, pooler=True)
            params["nsp"] = init_nsp_head(random.fold_in(key, 1), cfg)
            fresh = ("mlm", "nsp") if fresh else ("nsp",)
    if tokenizer.mask_id is None:
        raise ValueError(f"{path}: the tokenizer has no [MASK] token")
    pooler = None if nsp else params["bert"].pop("pooler", None)
    return params, pooler, cfg, tokenizer, fresh


# ----------------------------------------------------------------------------- masking
def masked(batch: dict, key, tokenizer, vocab_size: int, cfg) -> dict:
    """The batch with a fresh BERT mask drawn from ``key`` (dynamic masking): ``input_ids`` masked,
    ``labels`` the original ids at the selected positions, -100 elsewhere."""
    special = [tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id]
    starts = tokenizer.word_starts(batch["input_ids"]) if cfg.whole_word else None
    ids, labels = mask_tokens(
        key,
        batch["input_ids"],
        batch["attention_mask"],
        tokenizer.mask_id,
        vocab_size,
        special,
        prob=cfg.mask_prob,
        word_starts=starts,
    )
    out = {
        "input_ids": ids,
        "attention_mask": batch["attention_mask"],
        "token_type_ids": batch["token_type_ids"],
        "labels": labels,
    }
    if "next_sentence_label" in batch:
        out["next_sentence_label"] = batch["next_sentence_label"]
    return out


# ----------------------------------------------------------------------------- sentence pairs (--nsp)
def pair_batches(pairs, batch_size: int, buckets, pad_id: int, **kw) -> list[dict]:
    """``make_batches`` over the pairs ``[CLS] A [SEP] B [SEP]``, with ``token_type_ids`` 1 on B and
    ``next_sentence_label`` (0 IsNext, 1 NotNext; -100 on the rows that only pad a batch)."""
    out = []
    for b in make_batches(pairs.input_ids, pairs.labels, batch_size, buckets, pad_id=pad_id, **kw):
        b["token_type_ids"] = pairs.token_type_ids(b["index"], b["attention_mask"])
        b["next_sentence_label"] = torch.where(b["weight"] > 0, b["labels"], -100)
        out.append(b)
    return out


# ----------------------------------------------------------------------------- training
def train(run: Run, cfg: MlmConfig, dp: DataParallel) -> int:
    t_start = time.time()
    print(f"run directory: {run.dir}", flush=True)

    # 1. The model (fresh heads where the checkpoint has none) and the text; downloads by rank 0 alone.
    k_head, k_mask, k_drop, k_eval, k_pairs = random.split(random.key(cfg.seed), 5)
    if cfg.weights == DEFAULT_WEIGHTS and not (cfg.weights / "config.json").is_file():
        dp.from_main(lambda: ensure_minilm(cfg.weights))
    data = cfg.data if cfg.data is not None else dp.from_main(download_imdb)
    params, pooler, bcfg, tokenizer, fresh = load_model(cfg.weights, k_head, nsp=cfg.nsp)
    if cfg.max_len > bcfg.max_position_embeddings:
        raise ValueError(
            f"--max-len {cfg.max_len} is longer than the model's position table "
            f"(max_position_embeddings={bcfg.max_position_embeddings})"
        )
    if "mlm" in fresh:
        print(
            f"note: {cfg.weights} has no MLM head (cls.predictions); training a freshly initialised one, "
            "tied to the word embeddings",
            flush=True,
        )
    if "nsp" in fresh:
        print(
            f"note: {cfg.weights} has no NSP head (cls.seq_relationship); training a freshly initialised one",
            flush=True,
        )
    texts = load_texts(cfg, data)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_eval = min(cfg.eval_size, len(texts) // 5)
    eval_texts = [texts[i] for i in order[:n_eval]]
    train_texts = [texts[i] for i in order[n_eval:]]
    if cfg.train_size:
        train_texts = train_texts[: cfg.train_size]
    buckets = bucket_lengths(cfg.max_len, 2)
    if cfg.nsp:  # sentence pairs: the training ones drawn afresh each epoch, the held-out ones once

        @functools.lru_cache(maxsize=1)
        def epoch_pairs(epoch: int):
            return nsp_pairs(
                tokenizer, train_texts, max_len=cfg.max_len, seed=random.seed_of(random.fold_in(k_pairs, epoch))
            )

        ids = epoch_pairs(1).input_ids
        eval_pairs = (
            nsp_pairs(tokenizer, eval_texts, max_len=cfg.max_len, seed=random.seed_of(k_pairs)) if n_eval >= 2 else None
        )
        if not ids:
            raise ValueError(
                f"--nsp: no sentence pairs in the {len(train_texts)} training reviews (each pair needs "
                "a review of at least two sentences)"
            )
        eval_batches = (
            pair_batches(eval_pairs, cfg.batch_size, buckets, tokenizer.pad_id, shuffle=False)
            if eval_pairs is not None and eval_pairs.labels
            else []
        )
        what = (
            f"{len(ids)} sentence pairs per epoch from {len(train_texts)} training reviews / "
            f"{len(eval_pairs.labels) if eval_pairs else 0} held-out pairs from {n_eval}"
        )
    else:
        ids = tokenizer.encode_ids(train_texts, max_len=cfg.max_len)
        eval_batches = make_batches(
            tokenizer.encode_ids(eval_texts, max_len=cfg.max_len),
            None,
            cfg.batch_size,
            buckets,
            shuffle=False,
            pad_id=tokenizer.pad_id,
        )
        what = f"{len(ids)} training / {n_eval} held-out reviews"
    print(
        f"model {cfg.weights} ({num_params(params) / 1e6:.1f}M params), {what}, {cfg.steps} steps of "
        f"{cfg.batch_size}, masking {'whole words' if cfg.whole_word else 'word pieces'} with p={cfg.mask_prob}"
        + (", loss MLM + NSP" if cfg.nsp else ""),
        flush=True,
    )

    # 2. The optimizer and the steps; the held-out batches are masked once, from their own key.
    V = bcfg.vocab_size
    eval_batches = [masked(b, random.fold_in(k_eval, i), tokenizer, V, cfg) for i, b in enumerate(eval_batches)]
    schedule = optim.linear_warmup_linear_decay(cfg.lr, round(cfg.warmup * cfg.steps), cfg.steps)
    optimizer = optim.chain(
        optim.clip_by_global_norm(cfg.clip),
        optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=cfg.weight_decay),
    )
    opt_state = optimizer.init(params)

    objective = pretraining_loss if cfg.nsp else mlm_loss  # L_MLM + L_NSP, or L_MLM

    def loss_fn(p, batch, key):
        return objective(p, batch, bcfg, key=key, train=True)

    def eval_fn(p, batch):
        loss, aux = objective(p, batch, bcfg)
        return aux if cfg.nsp else {"mlm_loss": loss, "mlm_accuracy": aux["accuracy"]}

    # N workers: each loss term is a mean over its own things (masked tokens; pairs), so each worker's
    # term is weighted by its share of them (DataParallel.shard's weight per term): the global-batch step
    train_step = make_train_step(dp.loss(loss_fn), optimizer, compile=cfg.compile, grad_sync=dp.grad_sync)
    eval_step = make_eval_step(eval_fn, compile=cfg.compile)
    weight = {"mlm": "mlm_weight", "nsp": "nsp_weight"} if cfg.nsp else "mlm_weight"

    def shard(batch: dict) -> dict:
        """This worker's rows of ``batch``, with the masked tokens (and pairs) per row as the weights."""
        w = {"mlm_weight": (batch["labels"] != -100).sum(-1)}
        if cfg.nsp:
            w["nsp_weight"] = (batch["next_sentence_label"] != -100).long()
        return dp.shard(batch | w, weight=weight)

    def evaluate() -> None:
        """Held-out means: the MLM ones over masked tokens, the NSP ones over pairs (N workers: the
        batches split across them, the per-batch figures gathered in order)."""
        sums = {}
        per_batch = dp.map(lambda b: {k: float(v) for k, v in eval_step(params, b).items()}, eval_batches)
        for b, m in zip(eval_batches, per_batch):
            n_tok = float((b["labels"] != -100).sum())
            sums["masked_tokens"] = sums.get("masked_tokens", 0.0) + n_tok
            for k in ("mlm_loss", "mlm_accuracy"):
                sums[k] = sums.get(k, 0.0) + m[k] * n_tok
            if cfg.nsp:
                n_pairs = float((b["next_sentence_label"] != -100).sum())
                sums["pairs"] = sums.get("pairs", 0.0) + n_pairs
                for k in ("nsp_loss", "nsp_accuracy"):
                    sums[k] = sums.get(k, 0.0) + m[k] * n_pairs
        entry = {
            "step": step,
            "mlm_loss": sums["mlm_loss"] / max(sums["masked_tokens"], 1.0),
            "mlm_accuracy": sums["mlm_accuracy"] / max(sums["masked_tokens"], 1.0),
            "masked_tokens": int(sums["masked_tokens"]),
        }
        if cfg.nsp:
            entry |= {
                "nsp_loss": sums["nsp_loss"] / max(sums["pairs"], 1.0),
                "nsp_accuracy": sums["nsp_accuracy"] / max(sums["pairs"], 1.0),
                "pairs": int(sums["pairs"]),
            }
        log["history"].append(entry)
        run.log({"kind": "eval", **entry})
        print(
            f"step {step}: held-out MLM loss {entry['mlm_loss']:.4f}, accuracy {entry['mlm_accuracy']:.4f}"
            + (f"; NSP loss {entry['nsp_loss']:.4f}, accuracy {entry['nsp_accuracy']:.4f}" if cfg.nsp else ""),
            flush=True,
        )

    # 3. The run's state: (params, opt_state, step) plus where the data is (epoch, batch) and the log.
    fingerprint = {
        "--weights (contents)": digest(params | {"pooler": pooler or {}}),
        "--data (contents)": digest({"train": "\0".join(train_texts), "eval": "\0".join(eval_texts)}),
    }
    ckpts = run.checkpoints(fingerprint, keep=cfg.keep_checkpoints)
    log = {"epoch": 1, "batch": 0, "history": [], "losses": [], "train_s": 0.0}
    step = 0
    if (state := run.restore(ckpts)) is not None:
        params, opt_state, step, log = state.params, state.opt_state, state.step, state.extra
        print(f"resumed from {state.path} (step {step} of {cfg.steps})", flush=True)
    elif eval_batches:
        evaluate()

    cache: dict[int, list] = {}

    def epoch_batches(epoch: int) -> list[dict]:
        """The shuffled batches of ``epoch`` (the last one's only: an epoch is a pure function of its number)."""
        if epoch not in cache:
            cache.clear()
            kw = {"shuffle": True, "seed": cfg.seed, "epoch": epoch, "drop_last": len(ids) >= cfg.batch_size}
            if cfg.nsp:
                cache[epoch] = pair_batches(epoch_pairs(epoch), cfg.batch_size, buckets, tokenizer.pad_id, **kw)
            else:
                cache[epoch] = make_batches(ids, None, cfg.batch_size, buckets, pad_id=tokenizer.pad_id, **kw)
        return cache[epoch]

    # 4. The steps: each masks its batch afresh from its own key; SIGINT/SIGTERM finish the step and checkpoint.
    shapes = set()
    with run.stop_guard() as stop, Progress(cfg.steps, "pretraining", initial=step) as bar:
        while step < cfg.steps:
            if log["batch"] == len(epoch_batches(log["epoch"])):
                log["epoch"], log["batch"] = log["epoch"] + 1, 0
            batch = masked(epoch_batches(log["epoch"])[log["batch"]], random.fold_in(k_mask, step), tokenizer, V, cfg)
            if cfg.compile and batch["input_ids"].shape not in shapes:
                bar.compiling(f"{tuple(batch['input_ids'].shape)}")
            shapes.add(batch["input_ids"].shape)
            t = time.time()
            params, opt_state, m = train_step(params, opt_state, shard(batch), random.fold_in(k_drop, step))
            loss = float(m["loss"])
            step, log["batch"], log["train_s"] = step + 1, log["batch"] + 1, log["train_s"] + time.time() - t
            log["losses"].append(loss)
            run.log(
                {
                    "kind": "train",
                    "step": step,
                    "epoch": log["epoch"],
                    "loss": loss,
                    "lr": float(m["lr"]),
                    **({k: float(m[k]) for k in ("mlm_loss", "nsp_loss")} if cfg.nsp else {}),
                }
            )
            bar.update(loss=f"{sum(log['losses'][-20:]) / len(log['losses'][-20:]):.3f}", lr=f"{float(m['lr']):.1e}")
            if eval_batches and (step % cfg.eval_every == 0 or step == cfg.steps):
                evaluate()
            why = dp.agree(stop.requested)  # N workers: all stop at the same step
            if step % cfg.save_every == 0 or step == cfg.steps or why:
                ckpts.save(params, opt_state, step, k_drop, log)
            if why and step < cfg.steps:
                return run.stopped(step, cfg.steps, why)

    # 5. The outputs: a BertForMaskedLM checkpoint (with the source's pooler) or, with --nsp, a
    #    BertForPreTraining one; metrics, model card (written by rank 0).
    if not dp.is_main:
        return 0
    history = log["history"]
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in PER_SESSION}
    metrics = {
        "history": history,
        "train_loss_per_step": log["losses"],
        "train_seconds": log["train_s"],
        "fresh_mlm_head": "mlm" in fresh,
        "source": str(cfg.weights),
        "texts": len(ids),
        "held_out": n_eval,
        "args": settings,
        "fnlm": fnlm.__version__,
    }
    if cfg.nsp:
        metrics |= {"fresh_nsp_head": "nsp" in fresh, "texts": len(train_texts), "pairs_per_epoch": len(ids)}
    if pooler is not None:
        params["bert"]["pooler"] = pooler
    first, last = (history[0], history[-1]) if history else ({}, {})
    with run.finish(ckpts) as tmp:
        save_bert(params, bcfg, tmp, head="pretraining" if cfg.nsp else "mlm", tokenizer_dir=cfg.weights)
        write_json(metrics, tmp / "metrics.json")
        objective_text = "masked-language-model + next-sentence-prediction" if cfg.nsp else "masked-language-model"
        (tmp / "README.md").write_text(
            model_card(
                name=run.out.name,
                base_model=str(cfg.weights),
                dataset="imdb",
                task="fill-mask",
                metrics={k: last[k] for k in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy") if k in last},
                hyperparameters=settings,
                description=f"{cfg.weights.name} with {step} steps of continued {objective_text} pretraining "
                f"(fnlm) on {metrics['texts']} IMDb training reviews; evaluated on {n_eval} held-out ones.",
            ),
            encoding="utf-8",
        )
    print(
        f"pretrained {step} steps in {log['train_s']:.0f}s"
        + (
            f"; held-out MLM loss {first['mlm_loss']:.4f} -> {last['mlm_loss']:.4f}, accuracy "
            f"{first['mlm_accuracy']:.4f} -> {last['mlm_accuracy']:.4f}"
            if history
            else ""
        )
        + (
            f"; NSP loss {first['nsp_loss']:.4f} -> {last['nsp_loss']:.4f}, accuracy {first['nsp_accuracy']:.4f} "
            f"-> {last['nsp_accuracy']:.4f}"
            if history and cfg.nsp
            else ""
        )
        + f"; wrote {run.out}/ ({'BertForPreTraining' if cfg.nsp else 'BertForMaskedLM'} layout) in "
        f"{time.time() - t_start:.0f}s"
    )
    return 0


# ----------------------------------------------------------------------------- fill-mask
def fill_mask(params, cfg, tokenizer, text: str, top_k: int) -> list[list[tuple[str, float, str]]]:
    """For each [MASK] of ``text``: the ``top_k`` ``(token, probability, filled sequence)``, as the
    ``transformers`` ``fill-mask`` pipeline (softmax over the vocabulary at the masked position)."""
    b = tokenizer.encode([text], max_len=min(512, cfg.max_position_embeddings))
    ids = b["input_ids"][0]
    where = (ids == tokenizer.mask_id).nonzero().flatten().tolist()
    if not where:
        raise ValueError(f"no [MASK] token in {text!r}: write the word to predict as [MASK]")
    with torch.no_grad():
        probs = torch.softmax(
            bert_mlm(
                params, b["input_ids"], cfg, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
            )[0].float(),
            -1,
        )
    out = []
    for pos in where:
        top = probs[pos].topk(top_k)
        rows = []
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            filled = ids.clone()
            filled[pos] = i
            rows.append((tokenizer.id_to_token(i), p, tokenizer.decode(filled)))
        out.append(rows)
    return out


def predict(cfg: MlmConfig) -> int:
    path = cfg.model or cfg.weights
    if not (path / "config.json").is_file():
        raise OSError(f"{path}: no config.json, so not a Hugging Face checkpoint directory")
    try:
        params, bcfg, tokenizer, _ = load_pretrained(path, head="mlm")
    except MissingHeadError:
        raise MissingHeadError(
            f"{path}: no MLM head (cls.predictions) to fill masks with; pretrain it first "
            "(python examples/pretrain_mlm.py --weights ...)"
        ) from None
    for text in cfg.predict:
        for k, rows in enumerate(fill_mask(params, bcfg, tokenizer, text, cfg.top_k)):
            print(f"{text}" + (f"  [MASK] #{k + 1}" if k else ""))
            for token, p, seq in rows:
                print(f"  {p:.4f}\t{token}\t{seq}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
