"""Inference throughput: reviews/s of a BERT classifier on IMDb test reviews, five ways.

    python benchmarks/inference.py                              # MiniLM, 1,000 reviews, 256 tokens
    python benchmarks/inference.py --model runs/imdb-...        # a fine-tuned run directory
    python benchmarks/inference.py --only eager,exported,hf --reviews 200

Variants (all on the same weights, the same reviews, the same truncation to ``--max-len`` tokens):

* ``hf``: ``transformers.pipeline("text-classification")`` with the same weights (its default
  ``batch_size=1``: no padding at all), ``truncation=True, max_length=--max-len``;
* ``eager``: fnlm's pure ``bert_classifier``, not compiled;
* ``compiled``: the same compiled, one static graph per length bucket (``text_classifier(compile=True)``,
  with every bucket compiled during the warm-up);
* ``exported``: the AOTInductor package of :func:`fnlm.models.export_classifier` (float32);
* ``int8``: the same package with weight-only int8 linear maps (:func:`fnlm.nn.quantize_int8`);
* ``bf16``: the same package with bfloat16 weights and activations (float32 logits).

The fnlm variants share one batching rule (``TextClassifier.predict_proba``: reviews sorted
by length, batches of ``--batch`` padded to their longest), and tokenization is timed in every
variant, as the pipeline's. Compilation (``torch.compile`` warm-up, export + AOTInductor) is
timed separately and not counted in reviews/s. The reviews are cut into ``--chunks`` slices and
the variants take turns slice by slice, so a change in machine load hits all of them alike; the
table prints reviews/s, the ratio to the pipeline, and the accuracy (and agreement with eager
float32), all from this one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from fnlm import random
from fnlm.data import html_clean, load_imdb_splits, load_tokenizer, subset
from fnlm.io import ensure_minilm
from fnlm.models import export_classifier, load_bert, load_classifier_package, save_bert, text_classifier

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT.parent / "shared" / "data" / "aclImdb_v1_labelled.tar.gz"
VARIANTS = ("hf", "eager", "compiled", "exported", "int8", "bf16")
PACKAGES = {
    "exported": dict(int8=False, dtype=torch.float32),
    "int8": dict(int8=True, dtype=torch.float32),
    "bf16": dict(int8=False, dtype=torch.bfloat16),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a fine-tuned classifier directory (default: MiniLM, random head)")
    ap.add_argument("--data", type=Path, default=IMDB, help="the IMDb archive")
    ap.add_argument("--reviews", type=int, default=1000, help="label-balanced test reviews")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="fnlm batch size (the pipeline keeps its default, 1)")
    ap.add_argument("--chunks", type=int, default=4, help="slices the variants take turns on")
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument(
        "--packages", type=Path, help="where to write (or reuse) the exported packages (default: a temp dir)"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    only = args.only.split(",")
    if bad := [v for v in only if v not in VARIANTS]:
        raise SystemExit(f"--only: unknown variant(s) {bad}; choose from {VARIANTS}")
    torch.set_num_threads(args.threads)

    model_dir = args.model or ensure_minilm(ROOT / "weights" / "all-MiniLM-L6-v2")
    params, cfg = load_bert(model_dir, head="classifier", num_labels=2, head_key=random.key(0))
    tokenizer = load_tokenizer(model_dir)
    test = subset(load_imdb_splits(args.data, splits=("test",))["test"], args.reviews, seed=0)
    texts, labels = [html_clean(t) for t in test.texts], torch.tensor(test.labels)
    print(
        f"model {model_dir}{'' if args.model else ' (random head: accuracy is chance)'}; {len(texts)} IMDb test "
        f"reviews, {args.max_len} tokens, {torch.get_num_threads()} threads, torch {torch.__version__}",
        flush=True,
    )

    classify, setup_s = {}, {}
    if "eager" in only:
        classify["eager"] = text_classifier(params, cfg, tokenizer, max_len=args.max_len).predict_proba
    if "compiled" in only:
        t0 = time.perf_counter()
        clf = text_classifier(params, cfg, tokenizer, max_len=args.max_len, compile=True, compile_cost=0)
        clf.predict_proba(texts, batch_size=args.batch)  # compiles every bucket these reviews use
        setup_s["compiled"] = time.perf_counter() - t0
        classify["compiled"] = clf.predict_proba
    pkg_root = args.packages or Path(tempfile.mkdtemp(prefix="fnlm-inference-"))
    for name, kw in PACKAGES.items():
        if name not in only:
            continue
        path = pkg_root / f"{model_dir.name}-{name}-{args.max_len}"
        t0 = time.perf_counter()
        if not (path / "export.json").is_file():
            export_classifier(params, cfg, tokenizer, path, max_len=args.max_len, truncation="head", form="aoti", **kw)
        clf = load_classifier_package(path, trust_package=True)  # exported just above by this script
        clf.predict_proba(texts[: args.batch], batch_size=args.batch)
        setup_s[name] = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"  {name}: package {path} ({size:.0f} MiB), export + compile + load {setup_s[name]:.0f} s", flush=True)
        classify[name] = clf.predict_proba
    if "hf" in only:
        from transformers import AutoTokenizer, BertForSequenceClassification, pipeline

        with tempfile.TemporaryDirectory() as d:  # the very same weights, through HF's own loader
            save_bert(params, cfg, d)
            hf_model = BertForSequenceClassification.from_pretrained(d).eval()
        pipe = pipeline(
            "text-classification",
            model=hf_model,
            tokenizer=AutoTokenizer.from_pretrained(model_dir),
            device=-1,
            top_k=None,
        )

        def hf_proba(chunk, batch_size=None):
            out = pipe(chunk, truncation=True, max_length=args.max_len)
            return torch.tensor(
                [[{d["label"]: d["score"] for d in o}[lab] for lab in hf_model.config.id2label.values()] for o in out]
            )

        hf_proba(texts[:4])
        classify["hf"] = hf_proba
    for name in only:  # the table's order
        classify[name] = classify.pop(name)

    n = len(texts)
    bounds = [round(i * n / args.chunks) for i in range(args.chunks + 1)]
    seconds = {k: 0.0 for k in classify}
    probs = {k: [] for k in classify}
    for c in range(args.chunks):
        chunk = texts[bounds[c] : bounds[c + 1]]
        for name, fn in classify.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                p = fn(chunk, batch_size=args.batch)
            seconds[name] += time.perf_counter() - t0
            probs[name].append(p)
        print(f"  slice {c + 1}/{args.chunks} done", flush=True)

    ref = torch.cat(probs["eager"]).argmax(-1) if "eager" in probs else None
    hf_rate = n / seconds["hf"] if "hf" in seconds else None
    print(f"\n{'variant':<10} {'reviews/s':>10} {'x HF pipeline':>14} {'accuracy':>9} {'= eager':>8} {'setup s':>8}")
    for name in classify:
        pred = torch.cat(probs[name]).argmax(-1)
        rate = n / seconds[name]
        ratio = f"{rate / hf_rate:.2f}" if hf_rate else "-"
        agree = f"{float((pred == ref).float().mean()):.3f}" if ref is not None else "-"
        setup = f"{setup_s[name]:.0f}" if name in setup_s else "-"
        print(
            f"{name:<10} {rate:>10.1f} {ratio:>14} {float((pred == labels).float().mean()):>9.3f} {agree:>8} {setup:>8}"
        )


if __name__ == "__main__":
    main()
