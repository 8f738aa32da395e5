"""Sentence-embedding throughput: fnlm vs sentence-transformers, same model, same reviews, same length.

all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm) of N IMDb training reviews, at most
``--max-len`` word pieces (head truncation, as sentence-transformers), batch size ``--batch-size``:

* sentence-transformers: ``SentenceTransformer.encode(texts, normalize_embeddings=True)`` (it sorts
  by length and pads each batch to its longest text);
* fnlm: ``tokenizer.encode_ids`` -> ``predict_in_order`` (length-sorted batches) over the buckets of
  ``choose_buckets`` -> ``examples/extract_features.py``'s embedder
  (``make_eval_step(sentence_embedding)``) compiled (one graph per bucket; compilation is timed
  separately, on one batch per bucket, before the timed pass) and eager; and
  compiled under bf16 autocast (``examples/extract_features.py --dtype bf16``), with the smallest
  cosine similarity of its embeddings to sentence-transformers' (both are unit vectors).

Both include tokenization. The passes are interleaved (ST, fnlm compiled, fnlm eager, then ST and fnlm
compiled again) and the ratio is taken within the run. The embeddings are compared too.

    python benchmarks/embed_throughput.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --n 2000
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import fnlm
from fnlm.data import choose_buckets, html_clean, load_imdb, load_tokenizer, predict_in_order, subset
from fnlm.io import ensure_minilm
from fnlm.models import load_bert, make_embedder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "aclImdb_v1_labelled.tar.gz")
    ap.add_argument("--weights", type=Path, default=ROOT / "weights" / "all-MiniLM-L6-v2")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="extra interleaved ST / fnlm-compiled passes")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager fnlm pass")
    args = ap.parse_args()
    ensure_minilm(args.weights)
    texts = [html_clean(t) for t in subset(load_imdb(args.data, "train"), args.n, seed=0).texts]

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tr = Transformer(str(args.weights), max_seq_length=args.max_len)
    st = SentenceTransformer(modules=[tr, Pooling(tr.auto_model.config.hidden_size, "mean"), Normalize()], device="cpu")
    params, cfg = load_bert(args.weights, pooler=False)
    tok = load_tokenizer(args.weights)

    def embedder(dtype: str, compile: bool):  # what examples/extract_features.py --dtype fp32 / bf16 runs
        return make_embedder(params, cfg, dtype=torch.bfloat16 if dtype == "bf16" else None, compile=compile)

    compiled, eager, compiled_bf16 = embedder("fp32", True), embedder("fp32", False), embedder("bf16", True)

    def fnlm_encode(step, xs):
        ids = tok.encode_ids(xs, max_len=args.max_len, truncation="head")
        buckets = choose_buckets([len(x) for x in ids], args.max_len, args.batch_size)
        out = predict_in_order(step, ids, batch_size=args.batch_size, buckets=buckets, pad_id=tok.pad_id)
        return out, buckets

    def st_encode(xs):
        return st.encode(xs, batch_size=args.batch_size, normalize_embeddings=True, convert_to_tensor=True)

    # compile: one batch per bucket the timed pass will use
    ids = tok.encode_ids(texts, max_len=args.max_len, truncation="head")
    buckets = choose_buckets([len(x) for x in ids], args.max_len, args.batch_size)
    t = time.perf_counter()
    for lo_hi in zip([0] + buckets[:-1], buckets):
        pick = [texts[i] for i in range(len(texts)) if lo_hi[0] < len(ids[i]) <= lo_hi[1]][: args.batch_size]
        if pick:
            fnlm_encode(compiled, pick)
            fnlm_encode(compiled_bf16, pick)
    compile_s = time.perf_counter() - t

    rows = []
    for r in range(1 + args.repeats):
        runs = [
            ("sentence-transformers encode", lambda: st_encode(texts)),
            ("fnlm compiled", lambda: fnlm_encode(compiled, texts)[0]),
            ("fnlm compiled, bf16 autocast", lambda: fnlm_encode(compiled_bf16, texts)[0]),
        ]
        if r == 0 and not args.no_eager:
            runs.append(("fnlm eager", lambda: fnlm_encode(eager, texts)[0]))
        for name, fn in runs:
            t = time.perf_counter()
            e = fn()
            rows.append((name, time.perf_counter() - t, e))
            print(f"  pass {r}: {name}: {rows[-1][1]:.1f}s", flush=True)

    ref = [e for n, _, e in rows if n.startswith("sentence")][0]
    best = {}
    for n, s, e in rows:
        best[n] = min(best.get(n, float("inf")), s)
    print(
        f"\nall-MiniLM-L6-v2 sentence embeddings of {args.n} IMDb train reviews, max_len {args.max_len}, batch "
        f"{args.batch_size}, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, fnlm {fnlm.__version__}; buckets {buckets}; compile {compile_s:.0f}s (not in the pass)"
    )
    print(f"| {'implementation':30s} | seconds | reviews/s | vs sentence-transformers | max abs diff | min cosine |")
    print(f"|{'-' * 32}|---------|-----------|--------------------------|--------------|------------|")
    for n in best:
        e = [x for m, _, x in rows if m == n][0]
        print(
            f"| {n:30s} | {best[n]:7.1f} | {args.n / best[n]:9.1f} | {best['sentence-transformers encode'] / best[n]:23.2f}x "
            f"| {float((e - ref).abs().max()):.1e} | {float((e * ref).sum(-1).min()):.6f} |"
        )


if __name__ == "__main__":
    main()
