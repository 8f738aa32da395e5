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

Without ``--data`` the official archive is downloaded once into ``~/.cache/fnlm``. The run
directory (``--out``, default ``runs/imdb-<timestamp>``) is built under a temporary name and
renamed into place when complete; it holds the model in Hugging Face layout (``config.json``,
``model.safetensors``, tokenizer files), ``metrics.json`` and ``training.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import fnlm
from fnlm import optim, random
from fnlm.data import (DatasetError, DownloadError, bucket_lengths, choose_buckets, download_imdb, html_clean,
                       load_imdb_splits, load_tokenizer, make_batches, subset)
from fnlm.io import CheckpointError, atomic_dir, ensure_minilm, write_json
from fnlm.models import bert_classifier, bert_config_to_hf, classifier_loss, load_bert, save_bert
from fnlm.train import make_eval_step, make_train_step
from fnlm.tree import cast, num_params

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "weights" / "all-MiniLM-L6-v2"
LABELS = ("neg", "pos")  # label 0 = negative review (rating <= 4), 1 = positive (rating >= 7)
DEFAULT_MAX_LEN = 256


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("data and model")
    g.add_argument("--data", type=Path, help="aclImdb_v1.tar.gz or a folder containing aclImdb/ "
                   "(default: download the official archive into ~/.cache/fnlm)")
    g.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                   help="a Hugging Face BERT checkpoint directory (config.json, model.safetensors, vocab)")
    g.add_argument("--train-size", type=int, default=2000, help="label-balanced training subset; 0 = all 25,000")
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
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    g.add_argument("--warmup", type=float, default=0.1, help="linear warm-up, as a fraction of all steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="clip gradients to this global L2 norm")
    g.add_argument("--seed", type=int, default=0, help="head init, data order and dropout all derive from it")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 = autocast with fp32 master weights; auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--no-compile", action="store_true", help="run the steps eagerly (no torch.compile)")
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible compiled steps (torch deterministic algorithms): the same --seed "
                   "gives the very same run; steps 0-15%% slower on CPU, and every run compiles (no compile cache). Without it "
                   "runs agree to float rounding (Inductor sums repeated ids' embedding gradients atomically)")
    g.add_argument("--out", type=Path, help="run directory (default runs/imdb-<timestamp>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    g = ap.add_argument_group("prediction")
    g.add_argument("--predict", nargs="+", metavar="TEXT", help="classify these reviews and exit")
    g.add_argument("--model", type=Path, help="a fine-tuned run directory (for --predict)")
    args = ap.parse_args(argv)
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
    for name in ("train_size", "test_size"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0 (0 = all), got {getattr(args, name)}")
    if not 0.0 <= args.warmup < 1.0:
        ap.error(f"--warmup must be in [0, 1), got {args.warmup}")
    if args.model is not None and not args.predict:
        ap.error("--model is for --predict; to fine-tune a checkpoint pass it as --weights")
    if args.predict and args.model is None:
        ap.error("--predict needs --model DIR (a directory written by a fine-tuning run)")
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


def load_data(args) -> dict:
    """The train and test subsets as ``{'train': IMDb, 'test': IMDb}``."""
    path = args.data if args.data is not None else download_imdb()
    splits = load_imdb_splits(path, ("train", "test"))
    for split, n in (("train", args.train_size), ("test", args.test_size)):
        if n > len(splits[split]):
            raise CliError(f"--{split}-size {n}: {path} has only {len(splits[split])} {split} reviews")
        if n:
            splits[split] = subset(splits[split], n, seed=args.seed)
    return splits


def encode(tokenizer, texts: list[str], max_len: int, truncation: str) -> list[list[int]]:
    return tokenizer.encode_ids([html_clean(t) for t in texts], max_len=max_len, truncation=truncation)


# ----------------------------------------------------------------------------- training
def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}


def evaluate(eval_step, params, batches: list[dict], device) -> float:
    """Accuracy over the real (weight 1) rows of ``batches``."""
    correct = total = 0.0
    for b in batches:
        logits = eval_step(params, to_device(b, device))
        hit = (logits.argmax(-1).cpu() == b["labels"]).float()
        correct += float((hit * b["weight"]).sum())
        total += float(b["weight"].sum())
    return correct / max(total, 1.0)


def train(args) -> int:
    t_start = time.time()
    device = pick_device(args.device)
    autocast = torch.bfloat16 if (args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")) else None
    max_len = args.max_len or DEFAULT_MAX_LEN
    out = args.out or Path("runs") / time.strftime("imdb-%Y%m%d-%H%M%S")
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {out} already exists (pass --overwrite to replace it, or choose another --out)")

    k_head, k_train = random.split(random.key(args.seed))
    params, cfg, tokenizer = load_checkpoint(args.weights, max_len=max_len, head_key=k_head)
    cfg = dataclasses.replace(cfg, id2label=LABELS)
    data = load_data(args)
    t0 = time.time()
    ids = {s: encode(tokenizer, data[s].texts, max_len, args.truncation) for s in data}
    n_train, n_test = len(ids["train"]), len(ids["test"])
    print(f"model {args.weights} ({num_params(params) / 1e6:.1f}M params), {n_train} train / {n_test} test "
          f"reviews tokenised in {time.time() - t0:.1f}s, device {device}"
          f"{', bf16 autocast' if autocast else ''}", flush=True)

    # Length buckets: every batch is padded to one of a few lengths, so each compiles once.
    if args.buckets == "auto":
        buckets = choose_buckets([len(x) for x in ids["train"]], max_len, args.batch_size, epochs=args.epochs)
    else:
        buckets = bucket_lengths(max_len, args.buckets)
    print(f"padded sequence lengths (one compiled step each): {buckets}", flush=True)
    order = sorted(range(n_test), key=lambda i: len(ids["test"][i]))  # similar lengths together
    test_batches = make_batches([ids["test"][i] for i in order], [data["test"].labels[i] for i in order],
                                args.batch_size, buckets, shuffle=False, pad_id=tokenizer.pad_id)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    schedule = optim.linear_warmup_linear_decay(args.lr, round(args.warmup * total_steps), total_steps)
    optimizer = optim.chain(optim.clip_by_global_norm(args.clip),
                            optim.adamw(schedule, weight_decay=args.weight_decay))
    params = cast(params, device=device)
    opt_state = optimizer.init(params)

    def loss_fn(p, batch, key):
        return classifier_loss(p, batch, cfg, key=key, train=True)

    def logits_fn(p, batch):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return bert_classifier(p, batch["input_ids"], cfg, attention_mask=batch["attention_mask"],
                                   token_type_ids=batch["token_type_ids"]).float()

    compile_ = not args.no_compile
    train_step = make_train_step(loss_fn, optimizer, compile=compile_, autocast_dtype=autocast, lr_schedule=schedule,
                                 deterministic=args.deterministic)
    eval_step = make_eval_step(logits_fn, compile=compile_)

    from tqdm.auto import tqdm

    history, step_losses, step = [], [], 0
    for epoch in range(1, args.epochs + 1):
        batches = make_batches(ids["train"], data["train"].labels, args.batch_size, buckets, shuffle=True,
                               seed=args.seed, epoch=epoch, pad_id=tokenizer.pad_id)
        seen_shapes, first_call_s, steady_s, steady_n = set(), 0.0, 0.0, 0
        t_epoch, n_done, losses = time.time(), 0, []
        bar = tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch", dynamic_ncols=True)
        for b in bar:
            t = time.time()
            params, opt_state, m = train_step(params, opt_state, to_device(b, device), random.fold_in(k_train, step))
            loss = float(m["loss"])  # waits for the step
            dt, n = time.time() - t, int(b["weight"].sum())
            if b["input_ids"].shape in seen_shapes:
                steady_s, steady_n = steady_s + dt, steady_n + n
            else:  # first batch of this shape: includes compiling the step for it
                seen_shapes.add(b["input_ids"].shape)
                first_call_s += dt
            step, n_done = step + 1, n_done + n
            losses.append(loss)
            step_losses.append(loss)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", lr=f"{float(m['lr']):.2e}",
                            ex_s=f"{n_done / (time.time() - t_epoch):.1f}")
        bar.close()
        train_s = time.time() - t_epoch
        t_eval = time.time()
        acc = evaluate(eval_step, params, test_batches, device)
        eval_s = time.time() - t_eval
        history.append({
            "epoch": epoch, "train_loss": sum(losses) / len(losses), "test_accuracy": acc,
            "train_seconds": train_s, "eval_seconds": eval_s,
            "train_examples_per_s": n_done / train_s,
            "train_examples_per_s_after_compile": steady_n / steady_s if steady_s else None,
            "first_call_per_shape_seconds": first_call_s,
        })
        print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, test accuracy {acc:.4f} "
              f"({n_test} reviews), train {train_s:.0f}s ({n_done / train_s:.1f} ex/s), eval {eval_s:.0f}s",
              flush=True)

    metrics = {
        "epochs": history,
        "final_test_accuracy": history[-1]["test_accuracy"],
        "train_loss_per_step": step_losses,
        "wall_seconds": time.time() - t_start,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"max_len": max_len},
        "train_size": n_train, "test_size": n_test, "steps": step, "buckets": buckets,
        "model_config": bert_config_to_hf(cfg, "classifier"),
        "environment": {"device": str(device), "autocast": str(autocast), "compiled": compile_,
                        "torch": torch.__version__, "fnlm": fnlm.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
    }
    with atomic_dir(out) as tmp:
        # save_bert builds its directory atomically too: here it fills the (empty) temporary one
        save_bert(cast(params, device="cpu"), cfg, tmp, head="classifier", tokenizer_dir=args.weights)
        write_json(metrics, tmp / "metrics.json")
        plot(history, step_losses, tmp / "training.png")
    print(f"test accuracy {metrics['final_test_accuracy']:.4f}; wrote {out}/ in {metrics['wall_seconds']:.0f}s "
          f"(model.safetensors, config.json, tokenizer, metrics.json, training.png)")
    return 0


def plot(history: list[dict], step_losses: list[float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no training.png (pip install matplotlib)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(range(1, len(step_losses) + 1), step_losses, lw=0.6, alpha=0.4, label="per step")
    w = max(1, len(step_losses) // 20)
    smooth = [sum(step_losses[max(0, i - w + 1): i + 1]) / len(step_losses[max(0, i - w + 1): i + 1])
              for i in range(len(step_losses))]
    ax1.plot(range(1, len(step_losses) + 1), smooth, lw=1.5, label=f"mean of {w}")
    ax1.set(xlabel="step", ylabel="cross-entropy", title="training loss")
    ax1.legend()
    epochs = [h["epoch"] for h in history]
    ax2.plot(epochs, [h["test_accuracy"] for h in history], "o-")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="test accuracy", ylim=(0.5, 1.0), xticks=epochs)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- prediction
def predict(args) -> int:
    device = pick_device(args.device)
    max_len = args.max_len
    if max_len is None:  # the length the model was fine-tuned with
        try:
            max_len = json.loads((args.model / "metrics.json").read_text())["args"]["max_len"]
        except (OSError, ValueError, KeyError, TypeError):
            max_len = DEFAULT_MAX_LEN
    params, cfg, tokenizer = load_checkpoint(args.model, max_len=max_len)
    if "classifier" not in params:
        raise CliError(f"{args.model}: no classification head; fine-tune it first (pass it as --weights)")
    batch = tokenizer.encode([html_clean(t) for t in args.predict], max_len=max_len, truncation=args.truncation)
    with torch.no_grad():
        logits = bert_classifier(cast(params, device=device), batch["input_ids"].to(device), cfg,
                                 attention_mask=batch["attention_mask"].to(device),
                                 token_type_ids=batch["token_type_ids"].to(device))
    probs = torch.softmax(logits.float(), -1).cpu()
    for text, p in zip(args.predict, probs):
        i = int(p.argmax())
        excerpt = " ".join(text.split())
        excerpt = excerpt if len(excerpt) <= 70 else excerpt[:67] + "..."
        print(f"{cfg.labels[i]}\t{float(p[i]):.4f}\t{excerpt}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return predict(args) if args.predict else train(args)
    except (CliError, DatasetError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no run directory was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
