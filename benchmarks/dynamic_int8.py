"""Dynamic int8 vs float32: reviews/s and accuracy of a BERT classifier on IMDb test reviews, one run.

    python benchmarks/dynamic_int8.py --model runs/imdb-...     # a fine-tuned run directory
    python benchmarks/dynamic_int8.py --only fp32,dyn_int8,ao_int8 --reviews 200

Variants (same weights, same reviews, same tokenization and batching: ``TextClassifier.predict_proba``
sorts by length and pads each batch of ``--batch`` to its longest, ``--max-len`` tokens, head kept):

* ``fp32``: fnlm's pure ``bert_classifier``, eager, float32;
* ``dyn_int8``: the same pure forward on ``quantize_int8(params)``: every linear map and attention
  projection multiplies int8 x int8 with activation scales computed per call
  (:mod:`fnlm.nn._dynamic_int8`), eager, so fbgemm's dynamic linear (backend ``'auto'``);
* ``dyn_int8_compiled``: that under ``torch.compile(dynamic=True)``, which traces the
  ``torch._int_mm`` formula (per-row scales);
* ``dyn_int8_package``: ``export_classifier(int8='dynamic')``, AOTInductor (``torch._int_mm`` too);
* ``bf16_package``: ``export_classifier(dtype=bfloat16)``, AOTInductor;
* ``hf_fp32``: ``transformers``' ``BertForSequenceClassification`` with the same weights, eager;
* ``ao_int8``: that model after ``torch.ao.quantization.quantize_dynamic({nn.Linear}, qint8)``
  (fbgemm's dynamic linear on prepacked weights, one activation scale per tensor).

Compilation and export are timed separately and not counted in reviews/s. The reviews are cut into
``--chunks`` slices and the variants take turns slice by slice, so a change in machine load hits all
of them alike. Measure on an otherwise idle machine.
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
from fnlm.models import (
    TextClassifier,
    export_classifier,
    load_bert,
    load_classifier_package,
    save_bert,
    text_classifier,
)
from fnlm.nn import quantize_int8

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT.parent / "shared" / "data" / "aclImdb_v1_labelled.tar.gz"
VARIANTS = ("fp32", "dyn_int8", "dyn_int8_compiled", "dyn_int8_package", "bf16_package", "hf_fp32", "ao_int8")
PACKAGES = {
    "dyn_int8_package": dict(int8="dynamic", dtype=torch.float32),
    "bf16_package": dict(int8=False, dtype=torch.bfloat16),
}


def hf_classifier(run, tokenizer, cfg, max_len: int) -> TextClassifier:
    """A :class:`TextClassifier` over a ``transformers`` model call, so it batches and tokenizes as fnlm's."""
    return TextClassifier(
        run=run,
        tokenizer=tokenizer,
        labels=cfg.labels,
        max_len=max_len,
        truncation="head",
        head_tokens=None,
        meta={"form": "hf"},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a fine-tuned classifier directory (default: MiniLM, random head)")
    ap.add_argument("--data", type=Path, default=IMDB, help="the IMDb archive")
    ap.add_argument("--reviews", type=int, default=1000, help="label-balanced test reviews")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
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
        f"reviews, {args.max_len} tokens, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        flush=True,
    )

    classify, setup_s = {}, {}
    qparams = quantize_int8(params)
    if "fp32" in only:
        classify["fp32"] = text_classifier(params, cfg, tokenizer, max_len=args.max_len).predict_proba
    if "dyn_int8" in only:
        classify["dyn_int8"] = text_classifier(qparams, cfg, tokenizer, max_len=args.max_len).predict_proba
    if "dyn_int8_compiled" in only:
        t0 = time.perf_counter()
        clf = text_classifier(qparams, cfg, tokenizer, max_len=args.max_len, compile=True)
        clf.predict_proba(texts[: 2 * args.batch], batch_size=args.batch)
        setup_s["dyn_int8_compiled"] = time.perf_counter() - t0
        classify["dyn_int8_compiled"] = clf.predict_proba
    pkg_root = args.packages or Path(tempfile.mkdtemp(prefix="fnlm-dynamic-int8-"))
    for name, kw in PACKAGES.items():
        if name not in only:
            continue
        path = pkg_root / f"{model_dir.name}-{name}-{args.max_len}"
        t0 = time.perf_counter()
        if not (path / "export.json").is_file():
            export_classifier(params, cfg, tokenizer, path, max_len=args.max_len, truncation="head", form="aoti", **kw)
        clf = load_classifier_package(path)
        clf.predict_proba(texts[: args.batch], batch_size=args.batch)
        setup_s[name] = time.perf_counter() - t0
        classify[name] = clf.predict_proba
    if "hf_fp32" in only or "ao_int8" in only:
        from transformers import BertForSequenceClassification

        with tempfile.TemporaryDirectory() as d:  # the very same weights, through HF's own loader
            save_bert(params, cfg, d)
            hf_model = BertForSequenceClassification.from_pretrained(d, attn_implementation="sdpa").eval()
        if "hf_fp32" in only:
            classify["hf_fp32"] = hf_classifier(
                lambda i, m: hf_model(input_ids=i, attention_mask=m).logits, tokenizer, cfg, args.max_len
            ).predict_proba
        if "ao_int8" in only:
            t0 = time.perf_counter()
            import copy

            ao_model = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(hf_model), {torch.nn.Linear}, dtype=torch.qint8
            )
            setup_s["ao_int8"] = time.perf_counter() - t0
            classify["ao_int8"] = hf_classifier(
                lambda i, m: ao_model(input_ids=i, attention_mask=m).logits, tokenizer, cfg, args.max_len
            ).predict_proba
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

    ref = torch.cat(probs["fp32"]) if "fp32" in probs else None
    base = n / seconds["fp32"] if "fp32" in seconds else None
    print(
        f"\n{'variant':<18} {'reviews/s':>10} {'x fp32':>7} {'accuracy':>9} {'= fp32':>7} {'max |dp|':>9} {'setup s':>8}"
    )
    for name in classify:
        p = torch.cat(probs[name])
        rate = n / seconds[name]
        ratio = f"{rate / base:.2f}" if base else "-"
        agree = f"{float((p.argmax(-1) == ref.argmax(-1)).float().mean()):.3f}" if ref is not None else "-"
        dp = f"{float((p - ref).abs().max()):.4f}" if ref is not None else "-"
        setup = f"{setup_s[name]:.0f}" if name in setup_s else "-"
        acc = float((p.argmax(-1) == labels).float().mean())
        print(f"{name:<18} {rate:>10.1f} {ratio:>7} {acc:>9.3f} {agree:>7} {dp:>9} {setup:>8}")


if __name__ == "__main__":
    main()
