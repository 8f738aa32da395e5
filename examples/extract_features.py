"""Sentence embeddings (features) from a pretrained BERT, and two uses of them.

Texts come from the command line, a text file (one per line) or the IMDb archive; they are
tokenized, cut into length-bucketed batches and run through a compiled, gradient-free forward
pass (``fnlm.make_eval_step``); the vectors and their ids are written to one safetensors file
(atomically: a failed run leaves no file that looks complete).

    # all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm, as sentence-transformers)
    python examples/extract_features.py --texts "A wonderful film." "Two hours I will never get back."
    python examples/extract_features.py --file sentences.txt --out sentences.safetensors

    # embed IMDb (2,000 train + 2,000 test reviews; --size 0 = all 25k + 25k), then a linear probe:
    # logistic regression on the frozen embeddings, trained with fnlm.optim, test accuracy
    python examples/extract_features.py --imdb --data ../shared/data/aclImdb_v1_labelled.tar.gz --probe

    # the reviews closest to a text (cosine similarity), from the embeddings written above
    python examples/extract_features.py --imdb --data ../shared/data/aclImdb_v1_labelled.tar.gz \\
        --similar "a heartwarming story about friendship"

Other features: ``--pooling cls|mean|max``, ``--layers=-4,-3,-2,-1 --combine concat|mean`` (the
hidden states of chosen layers), ``--no-normalize``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fnlm
from fnlm.data import (
    DatasetError,
    DownloadError,
    bucket_lengths,
    choose_buckets,
    download_imdb,
    html_clean,
    load_imdb_splits,
    predict_in_order,
    subset,
)
from fnlm.io import CheckpointError, ensure_minilm, read_safetensors, write_safetensors
from fnlm.models import COMBINES, POOLINGS, fit_linear_probe, linear_probe_logits, load_pretrained, make_embedder
from fnlm.nn import accuracy
from fnlm.train import autocast_dtype

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "weights" / "all-MiniLM-L6-v2"
SPLITS = ("train", "test")


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", nargs="+", metavar="TEXT", help="embed these texts")
    src.add_argument("--file", type=Path, help="embed the lines of this UTF-8 text file (blank lines skipped)")
    src.add_argument("--imdb", action="store_true", help="embed IMDb reviews (train and test)")
    g = ap.add_argument_group("data and model")
    g.add_argument("--data", type=Path, help="IMDb archive or folder (default: download into ~/.cache/fnlm)")
    g.add_argument("--size", type=int, default=2000, help="label-balanced IMDb reviews per split; 0 = all 25,000")
    g.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="a Hugging Face BERT checkpoint directory")
    g.add_argument("--max-len", type=int, default=256, help="word pieces per text ([CLS], [SEP] included; head kept)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--pooling", choices=POOLINGS, default="mean")
    g.add_argument(
        "--layers",
        default=None,
        help="hidden states to pool, e.g. --layers=-4,-3,-2,-1 (default: the last layer; 0 = the embeddings)",
    )
    g.add_argument("--combine", choices=COMBINES, default="concat", help="how --layers are combined")
    g.add_argument("--no-normalize", action="store_true", help="skip the L2 normalisation")
    g.add_argument("--no-compile", action="store_true", help="run the forward pass eagerly")
    g.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="fp32: the embeddings sentence-transformers computes (to 1e-5); bf16: matrix products under "
        "bf16 autocast, faster on CPUs with AVX512-BF16/AMX, embeddings close to fp32's (docs/benchmarks.md); "
        "auto: bf16 where the CPU multiplies bf16 natively",
    )
    g.add_argument(
        "--out",
        type=Path,
        help="safetensors file (default: embeddings.safetensors, or runs/imdb-embeddings.safetensors with --imdb)",
    )
    g = ap.add_argument_group("uses (with --imdb)")
    g.add_argument(
        "--probe",
        action="store_true",
        help="train a logistic-regression probe on the train embeddings "
        "and report test accuracy (reuses --out if it holds IMDb embeddings)",
    )
    g.add_argument("--probe-steps", type=int, default=300)
    g.add_argument("--probe-lr", type=float, default=0.05)
    g.add_argument("--similar", metavar="TEXT", help="list the reviews of --out most similar to TEXT (cosine)")
    g.add_argument("--top-k", type=int, default=5)
    g.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("max_len", "batch_size", "probe_steps", "top_k"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 0:
        ap.error(f"--size must be >= 0 (0 = all), got {args.size}")
    if (args.probe or args.similar) and not args.imdb:
        ap.error("--probe and --similar work on IMDb embeddings: add --imdb")
    if args.layers is not None:
        try:
            args.layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            ap.error(f"--layers must be comma-separated integers such as -4,-3,-2,-1, got {args.layers!r}")
    if args.out is None:
        args.out = Path("runs/imdb-embeddings.safetensors") if args.imdb else Path("embeddings.safetensors")
    return args


# ----------------------------------------------------------------------------- inputs
def read_lines(path: Path) -> tuple[list[str], list[int]]:
    """``(texts, line numbers)`` of the non-blank lines of a UTF-8 file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CliError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(
            f"{path}: not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    rows = [(t.strip(), i + 1) for i, t in enumerate(text.splitlines()) if t.strip()]
    if not rows:
        raise CliError(f"{path}: no text in the file (it is empty or only blank lines)")
    return [t for t, _ in rows], [i for _, i in rows]


def load_model(path: Path):
    if path == DEFAULT_WEIGHTS and not (path / "config.json").is_file():
        ensure_minilm(path)
    try:
        params, cfg, tokenizer, _ = load_pretrained(path, pooler=False)
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        raise CliError(str(e).splitlines()[0]) from None
    return params, cfg, tokenizer


def imdb_rows(args) -> dict[str, list[int]]:
    """The chosen review indices of each split (label-balanced subsets when --size > 0)."""
    splits = load_imdb_splits(args.data if args.data is not None else download_imdb(), SPLITS)
    chosen = {}
    for s in SPLITS:
        pairs = list(zip(range(len(splits[s])), splits[s].labels))
        if args.size > len(pairs):
            raise CliError(f"--size {args.size}: the {s} split has only {len(pairs)} reviews")
        chosen[s] = [i for i, _ in subset(pairs, args.size, seed=args.seed)] if args.size else list(range(len(pairs)))
    return splits, chosen


# ----------------------------------------------------------------------------- embedding
def embedder_of(params, cfg, args):
    """The compiled ``(input_ids, attention_mask) -> [B, D]`` embedder the flags ask for."""
    dtype = autocast_dtype(args.dtype, "cpu")
    try:
        return make_embedder(
            params,
            cfg,
            pooling=args.pooling,
            layers=args.layers,
            combine=args.combine,
            normalize=not args.no_normalize,
            dtype=dtype,
            compile=not args.no_compile,
        )
    except ValueError as e:
        raise CliError(str(e)) from None


def embed_texts(embedder, tokenizer, texts: list[str], args, desc: str = "embedding") -> torch.Tensor:
    """``[N, D]`` float32 embeddings of ``texts``, in order, through length-bucketed batches."""
    from tqdm.auto import tqdm

    ids = tokenizer.encode_ids(texts, max_len=args.max_len, truncation="head")
    batch_size = min(args.batch_size, len(ids)) or 1
    # eager: every bucket is free; compiled: only those that pay for their compilation
    buckets = (
        bucket_lengths(args.max_len)
        if args.no_compile
        else choose_buckets([len(x) for x in ids], args.max_len, batch_size)
    )

    with tqdm(total=len(ids), desc=desc, unit="text", dynamic_ncols=True, disable=None) as bar:
        out = predict_in_order(
            embedder, ids, batch_size=batch_size, buckets=buckets, pad_id=tokenizer.pad_id, on_batch=bar.update
        )
    return out


def embedding_settings(args) -> dict[str, str]:
    """What the vectors depend on, as the file's metadata records it."""
    return {
        "model": str(args.weights),
        "pooling": args.pooling,
        "max_len": str(args.max_len),
        "layers": ",".join(map(str, args.layers)) if args.layers else "last",
        "combine": args.combine,
        "normalized": str(not args.no_normalize),
        "size": str(args.size),
        "dtype": args.dtype,
    }


def write_embeddings(path: Path, tensors: dict[str, torch.Tensor], args) -> None:
    write_safetensors(tensors, path, metadata={**embedding_settings(args), "fnlm": fnlm.__version__})


# ----------------------------------------------------------------------------- probe and search
def imdb_embeddings(args, splits=None, chosen=None) -> dict[str, torch.Tensor]:
    """Embed the chosen IMDb reviews (or reuse ``--out`` when it holds them) and write ``--out``."""
    if args.out.is_file():
        tensors, meta = read_safetensors(args.out)
        same = all(meta.get(k, "fp32" if k == "dtype" else None) == v for k, v in embedding_settings(args).items())
        if same and {"train", "test"} <= set(map(_split_of, tensors)):
            print(f"using the embeddings in {args.out}", flush=True)
            return tensors
    if splits is None:
        splits, chosen = imdb_rows(args)
    params, cfg, tokenizer = load_model(args.weights)
    embedder = embedder_of(params, cfg, args)
    tensors = {}
    t0 = time.time()
    n = 0
    for s in SPLITS:
        texts = [html_clean(splits[s].texts[i]) for i in chosen[s]]
        tensors[f"{s}.embeddings"] = embed_texts(embedder, tokenizer, texts, args, desc=f"embedding {s}")
        tensors[f"{s}.index"] = torch.tensor(chosen[s], dtype=torch.int64)
        tensors[f"{s}.labels"] = torch.tensor([splits[s].labels[i] for i in chosen[s]], dtype=torch.int64)
        n += len(texts)
    dt = time.time() - t0
    write_embeddings(args.out, tensors, args)
    print(f"embedded {n} reviews in {dt:.1f}s ({n / dt:.1f} reviews/s); wrote {args.out}", flush=True)
    return tensors


def _split_of(name: str) -> str:
    return name.split(".")[0]


def probe(args) -> float:
    t = imdb_embeddings(args)
    y_train, y_test = t["train.labels"], t["test.labels"]
    p = fit_linear_probe(t["train.embeddings"], y_train, steps=args.probe_steps, lr=args.probe_lr, seed=args.seed)
    train_acc = float(accuracy(linear_probe_logits(p, t["train.embeddings"]), y_train))
    test_acc = float(accuracy(linear_probe_logits(p, t["test.embeddings"]), y_test))
    print(
        f"linear probe: train accuracy {train_acc:.4f} ({len(y_train)} reviews), "
        f"test accuracy {test_acc:.4f} ({len(y_test)} reviews)"
    )
    return test_acc


def similar(args) -> None:
    if not args.out.is_file():
        raise CliError(f"--similar: no embeddings file {args.out} yet; first run with --imdb (and the same --out)")
    tensors, meta = read_safetensors(args.out)
    if "train.embeddings" not in tensors:
        raise CliError(f"--similar: {args.out} holds no IMDb embeddings; write them with --imdb --out {args.out}")
    args.weights, args.pooling, args.max_len = Path(meta["model"]), meta["pooling"], int(meta["max_len"])
    args.layers = None if meta["layers"] == "last" else [int(i) for i in meta["layers"].split(",")]
    args.combine, args.no_normalize = meta["combine"], meta["normalized"] != "True"
    args.dtype = meta.get("dtype", "fp32")  # the query is embedded as the reviews were
    params, cfg, tokenizer = load_model(args.weights)
    args.no_compile = True  # one query: compiling would cost more than it saves
    q = embed_texts(embedder_of(params, cfg, args), tokenizer, [args.similar], args, desc="query")[0]
    rows = [(s, i) for s in SPLITS for i in tensors[f"{s}.index"].tolist()]
    e = torch.cat([tensors[f"{s}.embeddings"] for s in SPLITS])
    cos = torch.nn.functional.normalize(e, dim=-1) @ torch.nn.functional.normalize(q, dim=0)
    top = cos.topk(min(args.top_k, len(rows)))
    splits = load_imdb_splits(args.data if args.data is not None else download_imdb(), SPLITS)
    for score, r in zip(top.values.tolist(), top.indices.tolist()):
        s, i = rows[r]
        text = " ".join(html_clean(splits[s].texts[i]).split())
        label = ("neg", "pos")[splits[s].labels[i]]
        print(f"{score:.4f}\t{s}/{label}/{splits[s].ids[i]}\t{text if len(text) <= 90 else text[:87] + '...'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.similar:
            similar(args)
        elif args.probe:
            probe(args)
        elif args.imdb:
            imdb_embeddings(args)
        else:
            texts, ids = (args.texts, list(range(len(args.texts)))) if args.texts else read_lines(args.file)
            params, cfg, tokenizer = load_model(args.weights)
            t0 = time.time()
            e = embed_texts(embedder_of(params, cfg, args), tokenizer, texts, args)
            write_embeddings(args.out, {"embeddings": e, "ids": torch.tensor(ids, dtype=torch.int64)}, args)
            print(f"embedded {len(texts)} texts ({e.shape[1]} features) in {time.time() - t0:.1f}s; wrote {args.out}")
        return 0
    except (CliError, DatasetError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no embeddings file was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
