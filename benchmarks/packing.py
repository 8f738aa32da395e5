"""Packed sequences vs length buckets: real tokens/s of a BERT classifier on IMDb reviews.

    python benchmarks/packing.py                       # MiniLM, 2,000 training reviews, --max-len 512
    python benchmarks/packing.py --steps 6 --mode forward

The same reviews (label-balanced, tokenized to at most ``--max-len`` word pieces) are batched two ways:

* ``bucketed``: what examples/finetune_imdb.py does (:func:`fnlm.data.make_batches`, ``--batch``
  reviews per batch padded to the smallest of :func:`fnlm.data.choose_buckets`' lengths);
* ``packed``: :func:`fnlm.data.pack_sequences` rows of ``--max-len`` tokens (first-fit decreasing),
  ``--rows`` rows per batch, run by :func:`fnlm.models.bert_classifier_packed` (block-diagonal
  attention mask, per-sequence positions).

Printed: the padding fraction of each over *all* the reviews, then real (non-padding) tokens/s over
``--steps`` batches of each, spread evenly over the epoch, the two variants alternating batch by
batch (so machine load hits both alike), for ``forward`` (inference, no grad) and/or ``train``
(loss + gradients; ``torch.func.grad``). Both run eagerly: the bucketed step compiles to a few
shapes, while packed batches vary in their number of sequences, so a fair compiled comparison
needs dynamic shapes (not measured here).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from fnlm import random
from fnlm.data import (
    choose_buckets,
    html_clean,
    load_imdb_splits,
    load_tokenizer,
    make_batches,
    pack_rows,
    pack_sequences,
    padding_efficiency,
    subset,
)
from fnlm.io import ensure_minilm
from fnlm.models import classifier_loss, load_bert, packed_classifier_loss

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT.parent / "shared" / "data" / "aclImdb_v1_labelled.tar.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=IMDB)
    ap.add_argument("--reviews", type=int, default=2000, help="label-balanced training reviews")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="reviews per bucketed batch")
    ap.add_argument(
        "--rows",
        type=int,
        default=None,
        help="packed rows per batch (default: the bucketed batches' mean real tokens / max-len)",
    )
    ap.add_argument("--steps", type=int, default=8, help="timed batches per variant and mode")
    ap.add_argument("--mode", default="forward,train", help="forward, train or both")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = ensure_minilm(ROOT / "weights" / "all-MiniLM-L6-v2")
    params, cfg = load_bert(model_dir, head="classifier", num_labels=2, head_key=random.key(0))
    tok = load_tokenizer(model_dir)
    train = subset(load_imdb_splits(args.data, splits=("train",))["train"], args.reviews, seed=0)
    ids = tok.encode_ids([html_clean(t) for t in train.texts], max_len=args.max_len)
    lengths = [len(s) for s in ids]

    buckets = choose_buckets(lengths, args.max_len, args.batch)
    bucketed = make_batches(ids, train.labels, args.batch, buckets, seed=0, pad_id=tok.pad_id)
    real_per_batch = sum(lengths) / len(bucketed)
    rows_per_batch = args.rows or max(1, round(real_per_batch / args.max_len))
    rows = pack_rows(lengths, args.max_len)
    g = torch.Generator().manual_seed(0)
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    packed = []
    for s in range(0, len(rows), rows_per_batch):
        members = rows[s : s + rows_per_batch]
        order = [i for r in members for i in r]
        local = {i: j for j, i in enumerate(order)}
        packed.append(
            pack_sequences(
                [ids[i] for i in order],
                [train.labels[i] for i in order],
                row_len=args.max_len,
                pad_id=tok.pad_id,
                rows=[[local[i] for i in r] for r in members],
            )
        )
    print(
        f"{len(ids)} IMDb training reviews, up to {args.max_len} tokens (mean {sum(lengths) / len(ids):.0f}), "
        f"MiniLM, {torch.get_num_threads()} threads, torch {torch.__version__}; other jobs may share this machine"
    )
    print(
        f"bucketed: {len(bucketed)} batches of {args.batch} reviews, lengths {buckets}, "
        f"padding {1 - padding_efficiency(bucketed):.1%}"
    )
    print(
        f"packed:   {len(packed)} batches of {rows_per_batch} rows x {args.max_len}, {len(rows)} rows, "
        f"padding {1 - padding_efficiency(packed):.1%}\n"
    )

    def pick(batches):  # --steps batches spread over the epoch
        n = min(args.steps, len(batches))
        return [batches[round(i * (len(batches) - 1) / max(1, n - 1))] for i in range(n)]

    def run_bucketed(b, mode):
        batch = {k: v for k, v in b.items() if k != "index"}
        if mode == "forward":
            with torch.no_grad():
                return classifier_loss(params, batch, cfg)
        return torch.func.grad(lambda p: classifier_loss(p, batch, cfg)[0])(params)

    def run_packed(b, mode):
        if mode == "forward":
            with torch.no_grad():
                return packed_classifier_loss(params, b, cfg)
        return torch.func.grad(lambda p: packed_classifier_loss(p, b, cfg)[0])(params)

    variants = {"bucketed": (pick(bucketed), run_bucketed), "packed": (pick(packed), run_packed)}
    print(f"{'mode':<8} {'variant':<9} {'real tok/s':>10} {'slots/s':>9} {'padding':>8} {'batches':>8}")
    for mode in args.mode.split(","):
        for batches, fn in variants.values():  # warm-up (first-call costs) outside the timing
            fn(batches[0], mode)
        seconds = {k: 0.0 for k in variants}
        for i in range(args.steps):
            for name, (batches, fn) in variants.items():
                if i < len(batches):
                    t0 = time.perf_counter()
                    fn(batches[i], mode)
                    seconds[name] += time.perf_counter() - t0
        rates = {}
        for name, (batches, _) in variants.items():
            slots = sum(b["attention_mask"].numel() for b in batches)
            real = padding_efficiency(batches) * slots
            rates[name] = real / seconds[name]
            print(
                f"{mode:<8} {name:<9} {rates[name]:>10.0f} {slots / seconds[name]:>9.0f} "
                f"{1 - real / slots:>8.1%} {len(batches):>8}"
            )
        print(f"{mode:<8} packed / bucketed real tokens/s: {rates['packed'] / rates['bucketed']:.2f}x")


if __name__ == "__main__":
    main()
