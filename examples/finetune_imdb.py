"""Fine-tune a pretrained BERT on IMDb movie-review sentiment, end to end.

fnlm's main example: a real checkpoint (all-MiniLM-L6-v2 by default), the real dataset, one
compiled training step per sequence-length bucket, and a fine-tuned model that Hugging Face
``transformers`` loads as it is.

    # laptop CPU (2 cores, 5.5-7 minutes): 2,000 training reviews, 1,000 test reviews, 1 epoch
    python examples/finetune_imdb.py --data ../shared/data/aclImdb_v1_labelled.tar.gz

    # the full dataset on a GPU (bf16 autocast): all 25,000 + 25,000 reviews, 512 tokens, 3 epochs
    python examples/finetune_imdb.py --data aclImdb_v1.tar.gz \\
        --train-size 0 --test-size 0 --max-len 512 --epochs 3

    # classify reviews with a fine-tuned model
    python examples/finetune_imdb.py --model runs/imdb-20250101-120000 \\
        --predict "A wonderful, moving film." "Two hours I will never get back."

    # fast inference: export the model as a compiled package (MODEL/export), then classify a file of
    # reviews (one per line) with it; --predict and --predict-file use MODEL/export when it is there
    python examples/finetune_imdb.py --model runs/imdb-20250101-120000 --export
    python examples/finetune_imdb.py --model runs/imdb-20250101-120000 --predict-file reviews.txt

    # LoRA (Hu et al. 2021): train rank-8 adapters on the attention query/value maps and the classifier
    # only (~1% of the weights); RUN is a peft adapter directory (PeftModel.from_pretrained loads it),
    # --merge also writes RUN/merged, a plain checkpoint; --predict takes either. --remat recomputes
    # each layer's activations in the backward pass (less memory for longer sequences / bigger batches)
    python examples/finetune_imdb.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --lora-rank 8 --merge
    python examples/finetune_imdb.py --model runs/imdb-20250101-120000 --predict "A wonderful, moving film."

    # an interrupted run (Ctrl-C, SIGTERM, a killed process) continues where its last checkpoint was
    python examples/finetune_imdb.py --resume runs/imdb-20250101-120000

Without ``--data`` the official archive is downloaded once into ``~/.cache/fnlm``. A label-balanced
validation slice is carved from the *training* reviews and evaluated every ``--eval-every`` steps and
at each epoch's end; ``--keep best`` (default) keeps the parameters of the best validation evaluation,
and the test set is evaluated once, at the end, on the kept model.

The run directory (``--out``, default ``runs/imdb-<timestamp>``) is ``.<name>.partial`` while the run
is unfinished: it holds the train-state checkpoints (every ``--save-every`` steps, at each epoch's end
and on SIGINT/SIGTERM; the last ``--keep-checkpoints``), from which ``--resume`` continues exactly
(same data order, dropout keys and schedule). When training is complete the finished directory is
written under its own name: the model in Hugging Face layout (``config.json``, ``model.safetensors``,
tokenizer files), ``metrics.json`` (validation curve, test accuracy with its 95% interval, precision,
recall, F1 per class, confusion matrix), ``errors.tsv`` (the most confidently wrong test reviews) and
``training.png``; the checkpoints are then deleted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

import fnlm
from fnlm import optim, random
from fnlm.data import (DatasetError, DownloadError, bucket_lengths, choose_buckets, download_imdb, html_clean,
                       load_imdb_splits, load_tokenizer, make_batches, subset)
from fnlm.io import CheckpointError, atomic_dir, ensure_minilm, write_json
from fnlm.models import (bert_classifier, bert_config_to_hf, classifier_loss, export_classifier,
                         load_bert, load_classifier_package, save_bert, text_classifier)
from fnlm.train import (GracefulStop, ResumeError, RunCheckpoints, autocast_dtype, digest, make_eval_step,
                        make_train_step)
from fnlm.models import load_lora, save_lora
from fnlm.models._bert_hf import TOKENIZER_FILES
from fnlm.nn import LoraConfig, init_lora, lora_targets, merge_lora
from fnlm.tree import cast, combine, num_params, partition

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "weights" / "all-MiniLM-L6-v2"
LABELS = ("neg", "pos")  # label 0 = negative review (rating <= 4), 1 = positive (rating >= 7)
DEFAULT_MAX_LEN = 256
EXPORT_DTYPES = ("fp32", "bf16", "int8")
REMAT_POLICIES = ("nothing", "matmuls")
FULL_LR = 1e-4  # full fine-tuning's peak learning rate
LORA_LR = 3e-3  # --lora-rank's: 1e-4 left the default LoRA run at chance (0.518), 1e-3 gave 0.826, 3e-3 0.868 (README)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


# Settings a run's result depends on: stored in its checkpoints, taken from there by --resume, and an
# error if given on the resuming command line with another value.
SETTINGS = ("data", "weights", "train_size", "val_size", "test_size", "max_len", "truncation", "buckets", "epochs",
            "batch_size", "lr", "warmup", "weight_decay", "clip", "seed", "dtype", "eval_every",
            "lora_rank", "lora_alpha", "lora_targets")
# How the run checkpoints and which parameters it keeps: taken from the run too, but may be changed on resuming
# (e.g. --resume RUN --keep last after a run's training is done but before its test evaluation).
OPTIONS = ("save_every", "keep_checkpoints", "keep")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("data and model")
    g.add_argument("--data", type=Path, help="aclImdb_v1.tar.gz or a folder containing aclImdb/ "
                   "(default: download the official archive into ~/.cache/fnlm)")
    g.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                   help="a Hugging Face BERT checkpoint directory (config.json, model.safetensors, vocab)")
    g.add_argument("--train-size", type=int, default=2000, help="label-balanced training subset; 0 = all 25,000")
    g.add_argument("--val-size", type=int, default=None,
                   help="label-balanced validation reviews taken from the training split (not trained on); "
                   "default: a tenth of the training subset, at most 1,000; 0 = no validation")
    g.add_argument("--test-size", type=int, default=1000, help="label-balanced test subset; 0 = all 25,000")
    g.add_argument("--max-len", type=int, default=None,
                   help=f"word pieces per review, [CLS] and [SEP] included (default {DEFAULT_MAX_LEN}; "
                   "with --predict: the model's training value)")
    g.add_argument("--truncation", choices=("head", "head+tail"), default="head+tail",
                   help="keep the first max-len pieces, or the first quarter and the last three quarters")
    g.add_argument("--buckets", default="auto",
                   help="number of padded sequence lengths (max-len, max-len/2, ...), each compiled once; "
                   "auto = only those that save more compute than their compilation costs")
    g = ap.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=argparse.SUPPRESS,  # resolved in parse_args: it depends on --lora-rank
                   help=f"peak learning rate (AdamW); default {FULL_LR:g}, with --lora-rank {LORA_LR:g}")
    g.add_argument("--warmup", type=float, default=0.1, help="linear warm-up, as a fraction of all steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="clip gradients to this global L2 norm")
    g.add_argument("--seed", type=int, default=0, help="head init, data order and dropout all derive from it")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 = autocast with fp32 master weights; auto = bf16 where the device multiplies bf16 "
                   "natively (Ampere+ GPUs, CPUs with AVX512-BF16/AMX), else fp32")
    g.add_argument("--no-compile", action="store_true", help="run the steps eagerly (no torch.compile)")
    g.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="train LoRA adapters of rank R (+ the classifier) instead of every weight; the run directory "
                   "is then a peft adapter directory (0 = full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha (update x alpha/R); default 2R")
    g.add_argument("--lora-targets", default="*.attn.q,*.attn.v",
                   help="comma-separated glob patterns over fnlm's linear-map names (e.g. '*.attn.q,*.attn.v,*.ffn.*')")
    g.add_argument("--merge", action="store_true",
                   help="with --lora-rank: also write RUN/merged, a plain Hugging Face checkpoint with the adapters "
                   "folded into the weights")
    g.add_argument("--remat", nargs="?", const="nothing", choices=REMAT_POLICIES, default=None,
                   help="recompute each layer's activations in the backward pass (less memory, more compute); "
                   "'matmuls' (keep matrix products) runs with --no-compile only")
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible compiled steps (torch deterministic algorithms): the same --seed "
                   "gives the very same run; steps 0-15%% slower on CPU, and every run compiles (no compile cache). Without it "
                   "runs agree to float rounding (Inductor sums repeated ids' embedding gradients atomically)")
    g = ap.add_argument_group("validation, checkpoints and output")
    g.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on the validation slice every N steps (and at each epoch's end); default: twice "
                   "per epoch; 0 = at epochs' ends only")
    g.add_argument("--keep", choices=("best", "last"), default="best",
                   help="the saved model: the parameters of the best validation evaluation (lowest loss, then "
                   "highest accuracy, as transformers.Trainer's default) or of the last step")
    g.add_argument("--save-every", type=int, default=200,
                   help="write a train-state checkpoint every N steps (also at each epoch's end); 0 = epochs' ends only")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    g.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an unfinished run (its --out, or its .partial directory) from its last checkpoint; "
                   "its settings are taken from there")
    g.add_argument("--out", type=Path, help="run directory (default runs/imdb-<timestamp>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    g = ap.add_argument_group("prediction")
    g.add_argument("--predict", nargs="+", metavar="TEXT", help="classify these reviews and exit")
    g.add_argument("--predict-file", type=Path, metavar="FILE",
                   help="classify every non-empty line of FILE (one review per line) and exit")
    g.add_argument("--model", type=Path, help="a fine-tuned run directory (for --predict, --predict-file, --export)")
    g.add_argument("--export", nargs="?", const="fp32", choices=EXPORT_DTYPES, metavar="{fp32,bf16,int8}",
                   help="write MODEL/export: the classifier compiled ahead of time (torch.export + AOTInductor) "
                   "with its tokenizer, in float32 (default), bf16 or weight-only int8; after a fine-tuning run, "
                   "or for --model; --predict/--predict-file then use it (measured on a 2-core AVX512-BF16 CPU: "
                   "fp32 and int8 ~2.5x, bf16 ~5.3x the transformers pipeline; benchmarks/inference.py)")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    explicit = build_parser()  # the same parser without defaults: which flags the command line gave
    for action in explicit._actions:
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(explicit.parse_args(argv)))
    if "lr" not in args:  # adapters start at B = 0 and have few parameters: they want a larger step
        args.lr = LORA_LR if args.lora_rank else FULL_LR
    if args.buckets != "auto":
        try:
            args.buckets = int(args.buckets)
        except ValueError:
            ap.error(f"--buckets must be 'auto' or a number, got {args.buckets!r}")
    positive = ["epochs", "batch_size"] + ([] if args.buckets == "auto" else ["buckets"]) \
        + ([] if args.max_len is None else ["max_len"])
    for name in positive:
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_size", "test_size", "val_size", "eval_every", "save_every"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0 (0 = all), got {getattr(args, name)}")
    if args.lora_rank < 0:
        ap.error(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    if args.lora_rank == 0 and ({"lora_alpha", "lora_targets", "merge"} & args.explicit):
        ap.error("--lora-alpha, --lora-targets and --merge go with --lora-rank R")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        ap.error(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if args.export and args.lora_rank and not args.merge and args.model is None:
        ap.error("--export after a LoRA run exports the merged model: add --merge")
    if args.remat == "matmuls" and not args.no_compile:
        ap.error("--remat matmuls runs eagerly only: add --no-compile, or use --remat (policy 'nothing')")
    if args.keep_checkpoints < 1:
        ap.error(f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}")
    if args.resume is not None and args.out is not None:
        ap.error("--resume RUN_DIR continues that run in place; leave out --out")
    if not 0.0 <= args.warmup < 1.0:
        ap.error(f"--warmup must be in [0, 1), got {args.warmup}")
    if args.predict and args.predict_file is not None:
        ap.error("give either --predict TEXT... or --predict-file FILE, not both")
    if args.model is not None and not (args.predict or args.predict_file or args.export):
        ap.error("--model is for --predict, --predict-file or --export; to fine-tune a checkpoint pass it as --weights")
    if (args.predict or args.predict_file) and args.model is None:
        ap.error("--predict/--predict-file need --model DIR (a directory written by a fine-tuning run)")
    return args


# ----------------------------------------------------------------------------- inputs
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name}: not a device name (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_checkpoint(path: Path, *, max_len: int, head_key=None):
    """``(params, cfg, tokenizer)`` of a Hugging Face BERT directory, with one-line errors."""
    if path == DEFAULT_WEIGHTS and not (path / "config.json").is_file():
        print(f"fetching all-MiniLM-L6-v2 into {path} ...", flush=True)
        try:
            ensure_minilm(path)
        except RuntimeError as e:
            raise CliError(str(e)) from None
    if not path.is_dir():
        raise CliError(f"{path}: no such checkpoint directory")
    if not (path / "config.json").is_file():
        raise CliError(f"{path}: no config.json, so not a Hugging Face checkpoint directory")
    try:
        params, cfg = load_bert(path, head="classifier", num_labels=len(LABELS), head_key=head_key)
        tokenizer = load_tokenizer(path)
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        raise CliError(str(e)) from None
    if max_len > cfg.max_position_embeddings:
        raise CliError(f"--max-len {max_len} is longer than the model's position table "
                       f"(max_position_embeddings={cfg.max_position_embeddings} in {path / 'config.json'})")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CliError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but config.json says "
                       f"vocab_size={cfg.vocab_size}")
    return params, cfg, tokenizer


def load_model(path: Path, *, max_len: int):
    """``(params, cfg, tokenizer)`` of a fine-tuned model: a Hugging Face checkpoint, or a LoRA run's peft
    adapter directory (its base checkpoint, ``base_model_name_or_path``, with the adapters merged in)."""
    if not (path / ADAPTER_FILES[0]).is_file():
        return load_checkpoint(path, max_len=max_len)
    try:
        base = Path(json.loads((path / ADAPTER_FILES[0]).read_text()).get("base_model_name_or_path") or "")
    except (OSError, ValueError) as e:
        raise CliError(f"{path / ADAPTER_FILES[0]}: {e}") from None
    if not (base / "config.json").is_file():
        raise CliError(f"{path}: its base model {str(base) or '(none named)'} (base_model_name_or_path in "
                       f"{ADAPTER_FILES[0]}) is not a checkpoint directory here")
    params, cfg, tokenizer = load_checkpoint(base, max_len=max_len, head_key=random.key(0))
    try:
        adapters, lora_cfg, head = load_lora(path, params, cfg)
    except (CheckpointError, ValueError) as e:
        raise CliError(str(e)) from None
    if head is None:
        raise CliError(f"{path}: the adapter has no classifier (modules_to_save); it cannot classify")
    if (path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(path)
    cfg = dataclasses.replace(cfg, id2label=LABELS)
    return merge_lora(dict(params, classifier=head), adapters, lora_cfg), cfg, tokenizer


def lora_split(args, params, key):
    """``(LoraConfig, frozen, trainable)`` for ``--lora-rank``: adapters on ``--lora-targets`` and the
    classifier are trained, every other weight is frozen."""
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    try:
        lora_cfg = LoraConfig(rank=args.lora_rank, alpha=alpha, targets=targets)
        adapters = init_lora(key, params, lora_cfg)
    except ValueError as e:
        raise CliError(f"--lora-rank/--lora-targets: {e}") from None
    head, frozen = partition(params, "classifier.*")
    trainable = {"head": head, "lora": adapters}
    n, total = num_params(trainable), num_params(params)
    print(f"LoRA r={lora_cfg.rank} alpha={lora_cfg.alpha:g} on {len(lora_targets(params, lora_cfg))} linear maps "
          f"({', '.join(targets)}): training {n} of {total} parameters ({100 * n / total:.2f}%)", flush=True)
    return lora_cfg, frozen, trainable


def default_val_size(n_train: int) -> int:
    """A tenth of the training reviews, at most 1,000 (even, so both labels get the same share)."""
    return min(1000, 2 * round(n_train / 20))


def load_data(args) -> dict:
    """The subsets as ``{'train': IMDb, 'val': IMDb, 'test': IMDb}``; ``val`` is label-balanced, taken
    from the training split and disjoint from ``train`` (``--train-size 0``: the rest of the split)."""
    path = args.data if args.data is not None else download_imdb()
    splits = load_imdb_splits(path, ("train", "test"))
    pool = splits["train"]
    if args.test_size > len(splits["test"]):
        raise CliError(f"--test-size {args.test_size}: {path} has only {len(splits['test'])} test reviews")
    if args.train_size > len(pool):
        raise CliError(f"--train-size {args.train_size}: {path} has only {len(pool)} train reviews")
    n_val = args.val_size if args.val_size is not None else default_val_size(args.train_size or len(pool))
    # subset() of (index, label) pairs picks the very indices it picks from the IMDb split itself
    pairs = list(zip(range(len(pool)), pool.labels))
    train_idx = [i for i, _ in subset(pairs, args.train_size, seed=args.seed)] if args.train_size else []
    taken = set(train_idx)
    rest = [(i, lab) for i, lab in pairs if i not in taken]  # validation comes from the reviews not trained on
    try:
        val_idx = [i for i, _ in subset(rest, n_val, seed=args.seed + 1)]
    except ValueError:
        raise CliError(f"--val-size {n_val}: only {len(rest)} training reviews are left beside the "
                       f"--train-size {args.train_size} subset for a label-balanced validation slice") from None
    if not args.train_size:  # all the others
        chosen = set(val_idx)
        train_idx = [i for i in range(len(pool)) if i not in chosen]
    train, val = pool.select(train_idx), pool.select(val_idx)
    test = subset(splits["test"], args.test_size, seed=args.seed) if args.test_size else splits["test"]
    return {"train": train, "val": val, "test": test}


def encode(tokenizer, texts: list[str], max_len: int, truncation: str) -> list[list[int]]:
    return tokenizer.encode_ids([html_clean(t) for t in texts], max_len=max_len, truncation=truncation)


# ----------------------------------------------------------------------------- run directory
def run_paths(args) -> tuple[Path, Path]:
    """``(out, partial)``: the finished run directory and the unfinished run's ``.<name>.partial``."""
    if args.resume is not None:
        r = args.resume
        if r.name.startswith(".") and r.name.endswith(".partial"):
            return r.with_name(r.name[1:-len(".partial")]), r
        return r, r.with_name(f".{r.name}.partial")
    out = args.out or Path("runs") / time.strftime("imdb-%Y%m%d-%H%M%S")
    return out, out.with_name(f".{out.name}.partial")


def adopt_settings(args, partial: Path) -> None:
    """``--resume``: take the run's settings from its newest checkpoint; a setting given on this
    command line with another value is an error naming it."""
    if not partial.is_dir():
        out = partial.with_name(partial.name[1:-len(".partial")])
        if (out / "metrics.json").is_file():
            raise CliError(f"--resume {args.resume}: {out} is a finished run, there is nothing to resume")
        raise CliError(f"--resume {args.resume}: no unfinished run there (no {partial})")
    peeked = RunCheckpoints.peek(partial)
    if peeked is None:
        raise CliError(f"--resume {args.resume}: {partial} holds no checkpoint yet (the run stopped before its "
                       f"first); start it again with --overwrite")
    saved, extra = peeked
    for name in SETTINGS:
        flag = "--" + name.replace("_", "-")
        if flag not in saved:
            raise CliError(f"--resume {args.resume}: the checkpoint does not record {flag}; not a run of this script")
        now = setting_value(args, name)
        if name in args.explicit and now != saved[flag]:
            raise CliError(f"--resume {args.resume}: {flag} differs from the run's ({saved[flag]} in the run, "
                           f"{now} now); leave it out to use the run's, or start a new run")
        value = saved[flag]
        setattr(args, name, Path(value) if name in ("data", "weights") and value is not None else value)
    for name, value in extra.get("options", {}).items():
        if name in OPTIONS and name not in args.explicit:
            setattr(args, name, value)


def setting_value(args, name: str):
    """A setting as the checkpoints record it (paths absolute, the default max-len filled in)."""
    v = getattr(args, name)
    if name == "max_len":
        return v or DEFAULT_MAX_LEN
    if isinstance(v, Path):
        return str(v.resolve())
    return v


def resume_hint(args, out: Path) -> str:
    """The command that continues this run (its settings come from the checkpoint)."""
    extra = [f for f, on in (("--no-compile", args.no_compile), ("--deterministic", args.deterministic)) if on]
    if args.device != "auto":
        extra.append(f"--device {args.device}")
    return " ".join(["python", sys.argv[0], "--resume", str(out)] + extra)


# ----------------------------------------------------------------------------- evaluation
def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}


def eval_batches(ids: list[list[int]], labels: list[int], batch_size: int, buckets: list[int], pad_id: int):
    """Batches in length order (similar lengths together, so little padding), in the training buckets."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = make_batches([ids[i] for i in order], [labels[i] for i in order], batch_size, buckets,
                           shuffle=False, pad_id=pad_id)
    for b in batches:  # index: position in ``ids`` (make_batches numbers the reordered list)
        b["index"] = torch.tensor([order[i] if i >= 0 else -1 for i in b["index"].tolist()])
    return batches


def predict_probs(eval_step, params, batches: list[dict], n: int, device) -> torch.Tensor:
    """``[n, n_labels]`` softmax probabilities, row i for example i (the batches' ``index``)."""
    probs = None
    for b in batches:
        p = torch.softmax(eval_step(params, to_device(b, device)).float(), -1).cpu()
        probs = torch.zeros(n, p.shape[-1]) if probs is None else probs
        real = b["index"] >= 0
        probs[b["index"][real]] = p[real]
    return probs if probs is not None else torch.zeros(0, len(LABELS))


def loss_and_accuracy(probs: torch.Tensor, labels: list[int]) -> tuple[float, float]:
    y = torch.tensor(labels)
    nll = -torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12))
    return float(nll.mean()), float((probs.argmax(-1) == y).float().mean())


def classification_report(y_true: list[int], y_pred: list[int], n_labels: int) -> dict:
    """Confusion matrix (rows: true label, columns: predicted) and precision, recall, F1 per label."""
    cm = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    per_class = {}
    for k in range(n_labels):
        tp = cm[k][k]
        predicted, actual = sum(cm[j][k] for j in range(n_labels)), sum(cm[k])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[LABELS[k]] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {"confusion_matrix": cm, "per_class": per_class}


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score interval)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def write_errors(path: Path, probs: torch.Tensor, test, limit: int = 100, chars: int = 200) -> int:
    """``errors.tsv``: the wrongly classified test reviews, most confident first."""
    pred = probs.argmax(-1)
    wrong = [i for i in range(len(test.labels)) if int(pred[i]) != test.labels[i]]
    wrong.sort(key=lambda i: -float(probs[i, pred[i]]))
    lines = ["probability\tpredicted\tlabel\tid\ttext"]
    for i in wrong[:limit]:
        text = " ".join(html_clean(test.texts[i]).split())
        lines.append(f"{float(probs[i, pred[i]]):.4f}\t{LABELS[int(pred[i])]}\t{LABELS[test.labels[i]]}\t"
                     f"{test.ids[i]}\t{text[:chars]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(wrong)


# ----------------------------------------------------------------------------- training
def train(args) -> int:
    t_start = time.time()
    out, partial = run_paths(args)
    if args.resume is not None:
        adopt_settings(args, partial)
    device = pick_device(args.device)
    autocast = autocast_dtype(args.dtype, device)
    max_len = args.max_len or DEFAULT_MAX_LEN
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {out} already exists (pass --overwrite to replace it, or choose another --out)")
    if args.resume is None and partial.exists() and not args.overwrite:
        raise CliError(f"{partial} holds an unfinished run: continue it with --resume {out}, or pass --overwrite "
                       "to start again")

    k_head, k_train = random.split(random.key(args.seed))
    params, cfg, tokenizer = load_checkpoint(args.weights, max_len=max_len, head_key=k_head)
    cfg = dataclasses.replace(cfg, id2label=LABELS)
    data = load_data(args)
    t0 = time.time()
    ids = {s: encode(tokenizer, data[s].texts, max_len, args.truncation) for s in data}
    n_train, n_val, n_test = len(ids["train"]), len(ids["val"]), len(ids["test"])
    print(f"model {args.weights} ({num_params(params) / 1e6:.1f}M params), {n_train} train / {n_val} validation / "
          f"{n_test} test reviews tokenised in {time.time() - t0:.1f}s, device {device}"
          f"{', bf16 autocast' if autocast else ''}", flush=True)

    # What the run's results depend on: --resume must find the very same in the checkpoint.
    config = {"--" + n.replace("_", "-"): setting_value(args, n) for n in SETTINGS}
    config["--weights (contents)"] = digest(params)
    config["--data (contents)"] = digest({s: {"text": "\0".join(d.texts), "label": torch.tensor(d.labels)}
                                          for s, d in data.items()})
    ckpts = RunCheckpoints(partial, config, keep=args.keep_checkpoints)
    if args.resume is None and partial.exists():  # --overwrite: start again
        shutil.rmtree(partial)

    # Length buckets: every batch is padded to one of a few lengths, so each compiles once.
    if args.buckets == "auto":
        buckets = choose_buckets([len(x) for x in ids["train"]], max_len, args.batch_size, epochs=args.epochs)
    else:
        buckets = bucket_lengths(max_len, args.buckets)
    print(f"padded sequence lengths (one compiled step each): {buckets}", flush=True)
    val_batches = eval_batches(ids["val"], data["val"].labels, args.batch_size, buckets, tokenizer.pad_id)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    eval_every = args.eval_every if args.eval_every is not None else math.ceil(steps_per_epoch / 2)
    schedule = optim.linear_warmup_linear_decay(args.lr, round(args.warmup * total_steps), total_steps)
    optimizer = optim.chain(optim.clip_by_global_norm(args.clip),
                            optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=args.weight_decay))
    params = cast(params, device=device)
    n_model = num_params(params)
    lora_cfg, frozen = None, None
    if args.lora_rank:  # train {'head': classifier, 'lora': adapters}; the rest is frozen and closed over
        lora_cfg, frozen, params = lora_split(args, params, random.fold_in(k_head, 1))
    opt_state = optimizer.init(params)

    def model(p):
        """The classifier's params from the trained ones (LoRA: the adapters merged into the frozen base)."""
        return p if lora_cfg is None else merge_lora(combine(p["head"], frozen), p["lora"], lora_cfg)

    def loss_fn(p, batch, key):
        return classifier_loss(model(p), batch, cfg, key=key, train=True, remat=args.remat)

    def logits_fn(p, batch):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return bert_classifier(model(p), batch["input_ids"], cfg, attention_mask=batch["attention_mask"],
                                   token_type_ids=batch["token_type_ids"]).float()

    compile_ = not args.no_compile
    train_step = make_train_step(loss_fn, optimizer, compile=compile_, autocast_dtype=autocast,
                                 deterministic=args.deterministic)
    eval_step = make_eval_step(logits_fn, compile=compile_)

    # The run's state beyond (params, opt_state, step, key): where the data is, and what was logged.
    log = {"epoch": 1, "batch": 0, "history": [], "evals": [], "step_losses": [], "best": None,
           "options": {name: getattr(args, name) for name in OPTIONS},
           "epoch_so_far": {"losses": [], "n_done": 0, "train_s": 0.0, "val_s": 0.0, "first_call_s": 0.0,
                            "steady_s": 0.0, "steady_n": 0}}
    step, best_params, resumed_from = 0, None, None
    state = ckpts.restore(device=device) if args.resume is not None else None
    if state is not None:
        params, opt_state, step, log = state.params, state.opt_state, state.step, state.extra
        log["options"] = {name: getattr(args, name) for name in OPTIONS}
        best_params, resumed_from = state.best_params, state.path.name
        print(f"resumed from {state.path} (step {step} of {total_steps})", flush=True)
    elif args.resume is not None:  # checkpoints listed but removed meanwhile
        raise CliError(f"--resume {args.resume}: no checkpoint found in {partial}")

    def checkpoint():
        best = (log["best"]["step"], best_params) if log["best"] is not None else None
        ckpts.save(params, opt_state, step, k_train, log, best=best)

    def validate(epoch: int):
        nonlocal best_params
        t = time.time()
        val_loss, val_acc = loss_and_accuracy(predict_probs(eval_step, params, val_batches, n_val, device),
                                              data["val"].labels)
        entry = {"step": step, "epoch": epoch, "val_loss": val_loss, "val_accuracy": val_acc,
                 "seconds": time.time() - t}
        log["evals"].append(entry)
        b = log["best"]
        if b is None or (val_loss, -val_acc) < (b["val_loss"], -b["val_accuracy"]):  # as HF's default metric
            log["best"], best_params = dict(entry), params  # params are never mutated: a reference suffices
        return entry

    from tqdm.auto import tqdm

    stop = GracefulStop()
    with stop:
        while log["epoch"] <= args.epochs:
            epoch, e = log["epoch"], log["epoch_so_far"]
            batches = make_batches(ids["train"], data["train"].labels, args.batch_size, buckets, shuffle=True,
                                   seed=args.seed, epoch=epoch, pad_id=tokenizer.pad_id)
            # t_epoch: the epoch's start; its wall time minus e["val_s"] (mid-epoch validations) is training time
            seen_shapes, t_epoch = set(), time.time() - e["train_s"]
            e.setdefault("val_s", 0.0)  # (a checkpoint written before validations were timed apart)
            bar = tqdm(desc=f"epoch {epoch}/{args.epochs}", unit="batch", dynamic_ncols=True,
                       initial=log["batch"], total=len(batches))
            for i, b in enumerate(batches[log["batch"]:], start=log["batch"]):
                t = time.time()
                params, opt_state, m = train_step(params, opt_state, to_device(b, device),
                                                  random.fold_in(k_train, step))
                loss = float(m["loss"])  # waits for the step
                dt, n = time.time() - t, int(b["weight"].sum())
                if b["input_ids"].shape in seen_shapes:
                    e["steady_s"], e["steady_n"] = e["steady_s"] + dt, e["steady_n"] + n
                else:  # first batch of this shape: includes compiling the step for it
                    seen_shapes.add(b["input_ids"].shape)
                    e["first_call_s"] += dt
                step, e["n_done"], log["batch"] = step + 1, e["n_done"] + n, i + 1
                e["losses"].append(loss)
                log["step_losses"].append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(e['losses'][-20:]) / len(e['losses'][-20:]):.4f}",
                                lr=f"{float(m['lr']):.2e}",
                                ex_s=f"{e['n_done'] / (time.time() - t_epoch - e['val_s']):.1f}")
                last = i + 1 == len(batches)
                if not last and n_val and eval_every and step % eval_every == 0:
                    e["val_s"] += validate(epoch)["seconds"]
                if stop.requested or (not last and args.save_every and step % args.save_every == 0):
                    e["train_s"] = time.time() - t_epoch
                    checkpoint()
                if stop.requested:
                    bar.close()
                    print(f"stopped by {stop.requested} at step {step} of {total_steps}, checkpoint written; "
                          f"resume with: {resume_hint(args, out)}", file=sys.stderr, flush=True)
                    return 130
            bar.close()
            train_s = time.time() - t_epoch - e["val_s"]  # validations are not training time
            v = validate(epoch) if n_val else None
            eval_s = v["seconds"] + e["val_s"] if v else None
            log["history"].append({
                "epoch": epoch, "train_loss": sum(e["losses"]) / len(e["losses"]),
                "val_loss": v and v["val_loss"], "val_accuracy": v and v["val_accuracy"],
                "train_seconds": train_s, "eval_seconds": eval_s,
                "train_examples_per_s": e["n_done"] / train_s,
                "train_examples_per_s_after_compile": e["steady_n"] / e["steady_s"] if e["steady_s"] else None,
                "first_call_per_shape_seconds": e["first_call_s"],
            })
            h = log["history"][-1]
            print(f"epoch {epoch}: train loss {h['train_loss']:.4f}"
                  + (f", validation loss {v['val_loss']:.4f} accuracy {v['val_accuracy']:.4f} ({n_val} reviews)"
                     if v else "")
                  + f", train {train_s:.0f}s ({e['n_done'] / train_s:.1f} ex/s)"
                  + (f", validation {eval_s:.1f}s" if v else ""), flush=True)
            log["epoch"], log["batch"] = epoch + 1, 0
            log["epoch_so_far"] = {"losses": [], "n_done": 0, "train_s": 0.0, "val_s": 0.0, "first_call_s": 0.0,
                                   "steady_s": 0.0, "steady_n": 0}
            checkpoint()
            if stop.requested and log["epoch"] <= args.epochs:
                print(f"stopped by {stop.requested} at step {step} of {total_steps}, checkpoint written; "
                      f"resume with: {resume_hint(args, out)}", file=sys.stderr, flush=True)
                return 130

    # The test set, once, on the kept parameters.
    keep_best = args.keep == "best" and log["best"] is not None
    kept = best_params if keep_best else params
    kept_step = log["best"]["step"] if keep_best else step
    t_test = time.time()
    test_batches = eval_batches(ids["test"], data["test"].labels, args.batch_size, buckets, tokenizer.pad_id)
    probs = predict_probs(eval_step, kept, test_batches, n_test, device)
    test_s = time.time() - t_test
    y_pred = probs.argmax(-1).tolist()
    test_loss, test_acc = loss_and_accuracy(probs, data["test"].labels)
    correct = sum(int(p == t) for p, t in zip(y_pred, data["test"].labels))
    ci = wilson_interval(correct, n_test)

    metrics = {
        "epochs": log["history"],
        "evals": log["evals"],
        "kept": {"which": "best" if keep_best else "last", "step": kept_step,
                 "val_accuracy": log["best"]["val_accuracy"] if keep_best else None},
        "final_test_accuracy": test_acc,
        "test_accuracy_95ci": list(ci),
        "test_loss": test_loss,
        "test_seconds": test_s,
        **classification_report(data["test"].labels, y_pred, len(LABELS)),
        "train_loss_per_step": log["step_losses"],
        "checkpoint_seconds": ckpts.seconds,
        "resumed_from": resumed_from,
        "trainable_params": num_params(params), "model_params": n_model,
        "lora": None if lora_cfg is None else {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha,
                                               "targets": list(lora_cfg.targets)},
        "remat": args.remat,
        "wall_seconds": time.time() - t_start,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "explicit"}
        | {"max_len": max_len, "eval_every": eval_every},
        "train_size": n_train, "val_size": n_val, "test_size": n_test, "steps": step, "buckets": buckets,
        "model_config": bert_config_to_hf(cfg, "classifier"),
        "environment": {"device": str(device), "autocast": str(autocast), "compiled": compile_,
                        "torch": torch.__version__, "fnlm": fnlm.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
    }
    with atomic_dir(out) as tmp:
        # save_bert builds its directory atomically too: here it fills the (empty) temporary one
        if lora_cfg is None:
            save_bert(cast(kept, device="cpu"), cfg, tmp, head="classifier", tokenizer_dir=args.weights)
        else:  # a peft adapter directory (+ tokenizer); --merge: and RUN/merged, a plain checkpoint
            kept_cpu = cast(kept, device="cpu")
            save_lora(tmp, kept_cpu["lora"], lora_cfg, cfg, head=kept_cpu["head"]["classifier"],
                      base_model_name_or_path=str(args.weights.resolve()))
            for name in TOKENIZER_FILES:
                if (args.weights / name).is_file():
                    shutil.copyfile(args.weights / name, tmp / name)
            if args.merge:
                save_bert(cast(model(kept), device="cpu"), cfg, tmp / "merged", head="classifier",
                          tokenizer_dir=args.weights)
        write_json(metrics, tmp / "metrics.json")
        n_wrong = write_errors(tmp / "errors.tsv", probs, data["test"])
        plot(metrics, tmp / "training.png")
    shutil.rmtree(partial, ignore_errors=True)  # the checkpoints: the run is complete
    print(f"test accuracy {test_acc:.4f} (95% CI {ci[0]:.4f}-{ci[1]:.4f}, {n_test} reviews, {n_wrong} wrong) with the "
          f"{metrics['kept']['which']} parameters (step {kept_step}); wrote {out}/ in {metrics['wall_seconds']:.0f}s "
          f"({'adapter_config.json, adapter_model.safetensors' if lora_cfg else 'model.safetensors, config.json'}"
          f"{', merged/' if lora_cfg and args.merge else ''}, tokenizer, metrics.json, errors.tsv, training.png)")
    if args.export:
        export_model(out / "merged" if lora_cfg else out, args.export, max_len, args.truncation)
    return 0


def plot(metrics: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no training.png (pip install matplotlib)")
        return
    step_losses, evals = metrics["train_loss_per_step"], metrics["evals"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(range(1, len(step_losses) + 1), step_losses, lw=0.6, alpha=0.4, label="training, per step")
    w = max(1, len(step_losses) // 20)
    smooth = [sum(step_losses[max(0, i - w + 1): i + 1]) / len(step_losses[max(0, i - w + 1): i + 1])
              for i in range(len(step_losses))]
    ax1.plot(range(1, len(step_losses) + 1), smooth, lw=1.5, label=f"training, mean of {w}")
    if evals:
        ax1.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
    ax1.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax1.legend()
    if evals:
        ax2.plot([e["step"] for e in evals], [e["val_accuracy"] for e in evals], "o-", label="validation")
    kept = metrics["kept"]
    ax2.plot([kept["step"]], [metrics["final_test_accuracy"]], "*", ms=12,
             label=f"test, {kept['which']} parameters (step {kept['step']})")
    ax2.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0.4, 1.0))
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- prediction
def model_max_len(args) -> int:
    """--max-len, else the length the model was fine-tuned with (its metrics.json)."""
    if args.max_len is not None:
        return args.max_len
    try:
        return json.loads((args.model / "metrics.json").read_text())["args"]["max_len"]
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_MAX_LEN


def export_model(model: Path, kind: str, max_len: int, truncation: str) -> Path:
    """Write ``model/export``: the AOTInductor package of the classifier (``kind``: fp32, bf16, int8)."""
    params, cfg, tokenizer = load_checkpoint(model, max_len=max_len)
    if "classifier" not in params:
        raise CliError(f"{model}: no classification head; fine-tune it first (pass it as --weights)")
    print(f"exporting {model} ({kind}, up to {max_len} tokens) with torch.export + AOTInductor ...", flush=True)
    t0 = time.time()
    path = export_classifier(params, cfg, tokenizer, model / "export", max_len=max_len, truncation=truncation,
                             int8=kind == "int8", dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    print(f"wrote {path}/ in {time.time() - t0:.0f}s", flush=True)
    return path


def predict(args) -> int:
    """Classify --predict texts or --predict-file lines with the fastest form there is: the exported
    package MODEL/export when present (and compatible), else the pure forward, eagerly."""
    texts = args.predict
    if args.predict_file is not None:
        try:
            texts = [ln for ln in args.predict_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--predict-file {args.predict_file}: {e}") from None
        if not texts:
            raise CliError(f"--predict-file {args.predict_file}: no reviews (it has no non-empty line)")
    max_len = model_max_len(args)
    package = args.model / "export"
    clf = None
    if (package / "export.json").is_file() and pick_device(args.device).type == "cpu":
        meta = json.loads((package / "export.json").read_text())
        if (meta.get("max_len"), meta.get("truncation")) == (max_len, args.truncation):
            clf = load_classifier_package(package)
        else:
            print(f"note: {package} was exported for {meta.get('max_len')} tokens ({meta.get('truncation')}), "
                  f"not {max_len} ({args.truncation}); using the model directly", file=sys.stderr)
    if clf is None:
        device = pick_device(args.device)
        params, cfg, tokenizer = load_model(args.model, max_len=max_len)
        if "classifier" not in params:
            raise CliError(f"{args.model}: no classification head; fine-tune it first (pass it as --weights)")
        # eager: torch.compile(dynamic=True) measured slower here than eager (benchmarks/inference.py)
        clf = text_classifier(cast(params, device=device), cfg, tokenizer, max_len=max_len, truncation=args.truncation)
        if device.type != "cpu":
            run = clf.run
            clf.run = lambda ids, mask: run(ids.to(device), mask.to(device)).cpu()
    t0 = time.time()
    probs = clf.predict_proba([html_clean(t) for t in texts], batch_size=args.batch_size)
    print(f"{len(texts)} reviews classified in {time.time() - t0:.1f}s ({clf.meta.get('form')}"
          f"{', int8' if clf.meta.get('int8') else ''}{', ' + clf.meta['dtype'] if 'dtype' in clf.meta else ''})",
          file=sys.stderr)
    for text, p in zip(texts, probs):
        i = int(p.argmax())
        excerpt = " ".join(text.split())
        excerpt = excerpt if len(excerpt) <= 70 else excerpt[:67] + "..."
        print(f"{clf.labels[i]}\t{float(p[i]):.4f}\t{excerpt}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.model is not None and args.export:
            export_model(args.model, args.export, model_max_len(args), args.truncation)
            return predict(args) if args.predict or args.predict_file else 0
        return predict(args) if args.predict or args.predict_file else train(args)
    except (CliError, DatasetError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ResumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted at once; the finished run directory was not written (--resume continues from the "
              "last checkpoint, if one was written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
