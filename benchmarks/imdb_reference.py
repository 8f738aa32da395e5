"""IMDb fine-tuning: fnlm's example vs a Hugging Face ``transformers`` reference, and a TF-IDF baseline.

Same checkpoint, same data subset, same tokenised and bucketed batches, same hyper-parameters:

* **fnlm**: ``examples/finetune_imdb.py`` run as a user runs it (a subprocess; compiled steps), once
  per ``--fnlm-dtypes`` entry (default float32 and bf16 autocast), each first with an empty Inductor
  cache (``TORCHINDUCTOR_CACHE_DIR`` a fresh directory: a user's first run, "cold") and then again
  with the cache that run left ("warm"); or an existing run directory of it (``--fnlm-run DIR``,
  its settings must match);
* **HF reference**: ``BertForSequenceClassification`` + ``torch.optim.AdamW`` (no decay on biases
  and LayerNorm, as fnlm) + ``get_linear_schedule_with_warmup`` + ``clip_grad_norm_``, eager, on
  the very batches fnlm's script builds (padding rows get weight 0 in the loss, as in fnlm);
* **TF-IDF + logistic regression** (scikit-learn) on the same training and test reviews.

Prints test accuracy and training wall time of each (compile time included for fnlm: it is part
of what a user waits for; eval excluded for both), each fnlm run's training time as a fraction of
the HF reference's and its accuracy minus the reference's, and with ``--json`` writes them to a file.

    python benchmarks/imdb_reference.py --data ../shared/data/aclImdb_v1_labelled.tar.gz
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "weights" / "all-MiniLM-L6-v2"  # the example's defaults
DEFAULT_MAX_LEN = 256

from fnlm.data import (  # noqa: E402
    bucket_lengths,
    choose_buckets,
    classification_splits,
    html_clean,
    load_tokenizer,
    make_batches,
    predict_in_order,
)

SHARED = [
    "train_size",
    "test_size",
    "max_len",
    "truncation",
    "buckets",
    "epochs",
    "batch_size",
    "lr",
    "warmup",
    "weight_decay",
    "clip",
    "seed",
]


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN)
    ap.add_argument("--truncation", default="head+tail")
    ap.add_argument("--buckets", default="auto", help="as the example's --buckets")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--fnlm-dtypes",
        nargs="+",
        default=["fp32", "bf16"],
        choices=("fp32", "bf16", "auto"),
        help="run the example once per precision (its --dtype), each cold and then warm",
    )
    ap.add_argument("--no-warm", action="store_true", help="only the cold run of each precision")
    ap.add_argument("--fnlm-run", type=Path, help="reuse this finished run directory of the example instead")
    ap.add_argument("--skip", nargs="*", default=[], choices=("fnlm", "hf", "tfidf"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap.parse_args()


def script_flags(args) -> list[str]:
    flags = ["--data", str(args.data), "--weights", str(args.weights)]
    for name in SHARED:
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def run_fnlm(args, dtype: str | None, cache_dir: Path | None) -> dict:
    """One run of the example (or ``--fnlm-run``'s results); ``cache_dir``: its Inductor cache."""
    if args.fnlm_run is None:
        out = Path(tempfile.mkdtemp(prefix="fnlm-bench-")) / "run"
        cmd = [
            sys.executable,
            str(ROOT / "examples" / "finetune_imdb.py"),
            *script_flags(args),
            "--dtype",
            dtype,
            "--out",
            str(out),
        ]
        print(f"$ TORCHINDUCTOR_CACHE_DIR={cache_dir}", " ".join(cmd), flush=True)
        t = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)})
        wall = time.time() - t
    else:
        out, wall = args.fnlm_run, None
    m = json.loads((out / "metrics.json").read_text())
    for name in SHARED:
        if m["args"][name] != getattr(args, name):
            sys.exit(f"{out}: was run with {name}={m['args'][name]!r}, the benchmark uses {getattr(args, name)!r}")
    first, steady = compile_timing(out / "metrics.jsonl", args.batch_size)
    return {
        "dtype": m["args"]["dtype"],
        "accuracy": m["final_test_accuracy"],
        "train_seconds": sum(e["train_seconds"] for e in m["epochs"]),
        "compile_and_first_steps_seconds": first,
        "examples_per_s_after_compile": steady,
        "eval_seconds": sum(e["eval_seconds"] for e in m["epochs"]),
        "script_wall_seconds": wall or m["wall_seconds"],
        "run_dir": str(out),
    }


def compile_timing(log: Path, batch_size: int) -> tuple[float, float | None]:
    """From the run's ``metrics.jsonl`` (one line per training step with its padded ``length`` and
    ``seconds``): the time of each length's first step (which compiles it), and the examples/s of
    all the other steps."""
    first = steady_s = 0.0
    steady_n, seen = 0, set()
    for line in log.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "train":
            continue
        if r["length"] in seen:
            steady_s, steady_n = steady_s + r["seconds"], steady_n + batch_size
        else:
            seen.add(r["length"])
            first += r["seconds"]
    return first, (steady_n / steady_s if steady_s else None)


def run_fnlm_variants(args) -> dict:
    """``{"fp32 cold": ..., "fp32 warm": ..., "bf16 cold": ...}``: each precision with a fresh cache, then again."""
    if args.fnlm_run is not None:
        return {"given run": run_fnlm(args, None, None)}
    results = {}
    for dtype in args.fnlm_dtypes:
        with tempfile.TemporaryDirectory(prefix="fnlm-inductor-") as cache:
            for state in ("cold",) if args.no_warm else ("cold", "warm"):
                results[f"{dtype} {state}"] = r = run_fnlm(args, dtype, Path(cache))
                print(f"fnlm {dtype} {state}:", r, flush=True)
    return results


def run_hf(args, data, ids, tok) -> dict:
    from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights are newly initialized" is expected here
    torch.manual_seed(args.seed)
    model = BertForSequenceClassification.from_pretrained(args.weights, num_labels=2)
    if args.buckets == "auto":  # the example's rule, on the same tokenised reviews: the same batches
        buckets = choose_buckets([len(x) for x in ids["train"]], args.max_len, args.batch_size, epochs=args.epochs)
    else:
        buckets = bucket_lengths(args.max_len, int(args.buckets))
    steps_per_epoch = math.ceil(len(ids["train"]) / args.batch_size)
    total = args.epochs * steps_per_epoch
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    sched = get_linear_schedule_with_warmup(opt, round(args.warmup * total), total)

    def forward(b):
        return model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
        ).logits

    train_s = 0.0
    for epoch in range(1, args.epochs + 1):
        batches = make_batches(
            ids["train"],
            data["train"].labels,
            args.batch_size,
            buckets,
            shuffle=True,
            seed=args.seed,
            epoch=epoch,
            pad_id=tok.pad_id,
        )
        model.train()
        t = time.time()
        for i, b in enumerate(batches):
            logits = forward(b)
            nll = torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none")
            loss = (nll * b["weight"]).sum() / b["weight"].sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if i % 10 == 0:
                print(
                    f"  HF epoch {epoch} step {i}/{len(batches)} loss {loss.item():.4f} ({time.time() - t:.0f}s)",
                    flush=True,
                )
        train_s += time.time() - t
    model.eval()
    t = time.time()
    with torch.no_grad():
        pred = predict_in_order(
            lambda i, m: forward({"input_ids": i, "attention_mask": m, "token_type_ids": torch.zeros_like(i)}).argmax(
                -1
            ),
            ids["test"],
            batch_size=args.batch_size,
            buckets=buckets,
            pad_id=tok.pad_id,
        )
    correct, n = float((pred == torch.tensor(data["test"].labels)).sum()), len(data["test"].labels)
    return {"accuracy": correct / n, "train_seconds": train_s, "eval_seconds": time.time() - t}


def split(args) -> dict:
    """The example's default split (examples/finetune_imdb.py, step 1): ``fnlm.data.classification_splits``."""
    return classification_splits(data=args.data, train_size=args.train_size, test_size=args.test_size, seed=args.seed)[
        0
    ]


def run_tfidf(data) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000)
    x_train = vec.fit_transform([html_clean(s) for s in data["train"].texts])
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x_train, data["train"].labels)
    train_s = time.time() - t
    pred = clf.predict(vec.transform([html_clean(s) for s in data["test"].texts]))
    acc = float((pred == data["test"].labels).mean())
    return {"accuracy": acc, "train_seconds": train_s}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict = {
        "settings": {k: getattr(args, k) for k in SHARED},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    data = split(args)
    if "tfidf" not in args.skip:
        results["tfidf_logreg"] = run_tfidf(data)
        print("TF-IDF + logistic regression:", results["tfidf_logreg"], flush=True)
    if "fnlm" not in args.skip:
        results["fnlm"] = run_fnlm_variants(args)
    if "hf" not in args.skip:
        tok = load_tokenizer(args.weights)
        ids = {
            s: tok.encode_ids([html_clean(t) for t in data[s].texts], max_len=args.max_len, truncation=args.truncation)
            for s in data
        }
        results["hf_reference"] = run_hf(args, data, ids, tok)
        print("HF reference:", results["hf_reference"], flush=True)

    print(
        f"\n{len(data['train'])} train / {len(data['test'])} test reviews, max_len {args.max_len}, "
        f"{args.epochs} epoch(s), batch {args.batch_size}, lr {args.lr}, {torch.get_num_threads()} threads"
    )
    hf = results.get("hf_reference")
    rows = [
        (f"fnlm {name} (compile {r['compile_and_first_steps_seconds']:.0f} s)", r)
        for name, r in results.get("fnlm", {}).items()
    ]
    rows += [("HF transformers, eager float32", hf), ("TF-IDF + logistic regression", results.get("tfidf_logreg"))]
    print(f"{'':40s} {'accuracy':>9s} {'train s':>9s} {'x HF time':>10s} {'acc - HF':>9s}")
    for name, r in rows:
        if r is None:
            continue
        vs = (
            f"{r['train_seconds'] / hf['train_seconds']:10.2f} {100 * (r['accuracy'] - hf['accuracy']):+8.1f}pt"
            if hf and r is not hf and name.startswith("fnlm")
            else ""
        )
        print(f"{name:40s} {r['accuracy']:9.4f} {r['train_seconds']:9.1f} {vs}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
