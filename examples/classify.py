"""Classify, evaluate or export with a model that examples/finetune_imdb.py fine-tuned.

    # classify reviews given on the command line, or every non-empty line of a file
    python examples/classify.py --model runs/imdb-20250101-120000 --predict "A wonderful, moving film."
    python examples/classify.py --model runs/imdb-20250101-120000 --predict-file reviews.txt

    # accuracy (95% interval), per-class report and the most confident errors on IMDb's test reviews,
    # or on a labelled CSV / JSON Lines file
    python examples/classify.py --model runs/imdb-20250101-120000 --evaluate \\
        --data ../shared/data/aclImdb_v1_labelled.tar.gz --errors errors.tsv
    python examples/classify.py --model runs/my-run --evaluate --test-file test.csv

    # compile the classifier ahead of time into MODEL/export (torch.export + AOTInductor), then use it
    python examples/classify.py --model runs/imdb-20250101-120000 --export bf16
    python examples/classify.py --model runs/imdb-20250101-120000 --predict-file reviews.txt --trust-package

An exported package holds native code and a program: it is loaded only with ``--trust-package``, and
then only if its files match the checksums written when it was exported (SECURITY.md). Without it
the safetensors weights are used, run by the pure forward (eagerly).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fnlm.config import ConfigError, check, cli_main, option, parse_config
from fnlm.data import download_imdb, html_clean, load_imdb, read_labelled_file, subset
from fnlm.metrics import classification_report, wilson_interval
from fnlm.models import export_classifier, load_classifier_package, load_pretrained, package_status, text_classifier
from fnlm.train import pick_device, write_errors
from fnlm.tree import cast


@dataclass(frozen=True)
class ClassifyConfig:
    model: Path | None = option(None, "a fine-tuned run directory (or a Hugging Face checkpoint with a classifier)")
    predict: tuple[str, ...] = option((), "classify these texts", metavar="TEXT")
    predict_file: Path | None = option(None, "classify every non-empty line of this UTF-8 file", metavar="FILE")
    evaluate: bool = option(False, "report accuracy, per-class scores and errors on IMDb's test reviews or --test-file")
    test_file: Path | None = option(None, "with --evaluate: a labelled CSV or JSON Lines file instead of IMDb")
    text_column: str = option("text", "with --test-file: the column holding the texts")
    label_column: str = option("label", "with --test-file: the column holding the labels")
    data: Path | None = option(None, "with --evaluate: aclImdb_v1.tar.gz or a folder holding aclImdb/")
    test_size: int = option(1000, "with --evaluate: label-balanced test reviews; 0 = all 25,000")
    seed: int = option(0, "with --evaluate: which test subset (the fine-tuning run's --seed gives its test set)")
    errors: Path | None = option(None, "with --evaluate: write the wrongly classified reviews here (TSV)")
    export: str | None = option(
        None,
        "write MODEL/export, the classifier compiled ahead of time, in this dtype",
        choices=("fp32", "bf16", "int8"),
        const="fp32",
    )
    trust_package: bool = option(False, "load MODEL/export (native code) if its checksums match")
    max_len: int | None = option(None, "word pieces per text; default: the model's fine-tuning value")
    truncation: str | None = option(
        None, "head or head+tail; default: the model's fine-tuning value", choices=("head", "head+tail")
    )
    batch_size: int = option(32, "texts per forward pass")
    device: str = option("auto", "auto (cuda if available), cpu, cuda, ...")

    def __post_init__(self):
        check(self.model is not None, "--model RUN_DIR is required (a directory written by finetune_imdb.py)")
        tasks = [bool(self.predict), self.predict_file is not None, self.evaluate]
        check(sum(tasks) <= 1, "give one of --predict, --predict-file and --evaluate")
        check(sum(tasks) == 1 or self.export, "nothing to do: give --predict, --predict-file, --evaluate or --export")
        check(self.batch_size >= 1, "--batch-size must be >= 1, got {}", self.batch_size)
        check(self.test_size >= 0, "--test-size must be >= 0, got {}", self.test_size)
        check(self.max_len is None or self.max_len >= 2, "--max-len must be >= 2, got {}", self.max_len)


def training_settings(model: Path) -> dict:
    """The fine-tuning run's settings (its ``run_config.json``), or {} for a plain checkpoint."""
    try:
        return json.loads((model / "run_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{model / 'run_config.json'}: unreadable ({e})") from None


def run_label_names(model: Path) -> tuple[str, ...] | None:
    """The label names a fine-tuning run recorded (its ``metrics.json``), or None."""
    try:
        names = json.loads((model / "metrics.json").read_text(encoding="utf-8")).get("label_names")
    except (OSError, ValueError, AttributeError):
        return None
    return tuple(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(ClassifyConfig, argv, description=__doc__.split("\n\n")[0])
    if not cfg.model.is_dir():
        raise ConfigError(f"--model {cfg.model}: no such checkpoint directory")
    trained = training_settings(cfg.model)
    max_len = cfg.max_len or trained.get("max_len", 256)
    truncation = cfg.truncation or trained.get("truncation", "head+tail")
    device = pick_device(cfg.device)
    package = cfg.model / "export"

    if cfg.export:
        model = load_pretrained(cfg.model, head="classifier", max_len=max_len)
        print(f"exporting {cfg.model} ({cfg.export}, up to {max_len} tokens) ...", file=sys.stderr, flush=True)
        export_classifier(
            model.params,
            model.cfg,
            model.tokenizer,
            package,
            max_len=max_len,
            truncation=truncation,
            int8=cfg.export == "int8",
            dtype=torch.bfloat16 if cfg.export == "bf16" else torch.float32,
        )
        print(f"wrote {package}/", file=sys.stderr, flush=True)
        if not (cfg.predict or cfg.predict_file or cfg.evaluate):
            return 0

    texts, labels, ids = list(cfg.predict), None, None
    if cfg.predict_file is not None:
        try:
            texts = [ln for ln in cfg.predict_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--predict-file {cfg.predict_file}: {e}") from None
        check(bool(texts), "--predict-file {}: no texts (it has no non-empty line)", cfg.predict_file)
    if cfg.evaluate and cfg.test_file is not None:  # labels by name: the model's names give the ids
        texts, names = read_labelled_file(cfg.test_file, text_column=cfg.text_column, label_column=cfg.label_column)
        model_labels = (
            run_label_names(cfg.model) or load_pretrained(cfg.model, head="classifier", max_len=max_len).cfg.labels
        )
        unknown = sorted(set(names) - set(model_labels))
        check(
            not unknown,
            "--test-file {}: label {!r} is not one of the model's ({})",
            cfg.test_file,
            unknown[:1] and unknown[0],
            ", ".join(model_labels),
        )
        labels, ids = [model_labels.index(n) for n in names], list(range(1, len(texts) + 1))
    elif cfg.evaluate:
        test = load_imdb(cfg.data or download_imdb(), "test")
        test = subset(test, cfg.test_size, seed=cfg.seed) if cfg.test_size else test
        texts, labels, ids = test.texts, test.labels, test.ids

    # The fastest form there is: the exported package (with consent), else the pure forward, eagerly.
    clf = None
    if (package / "export.json").is_file() and device.type == "cpu":
        why = package_status(package, trust_package=cfg.trust_package)
        meta = json.loads((package / "export.json").read_text()) if why is None else {}
        if why is None and (meta.get("max_len"), meta.get("truncation")) != (max_len, truncation):
            why = f"it was exported for {meta.get('max_len')} tokens ({meta.get('truncation')})"
        if why is None:
            clf = load_classifier_package(package, trust_package=True)
        else:
            print(f"note: skipped {package} ({why}); using the safetensors weights", file=sys.stderr)
    if clf is None:
        model = load_pretrained(cfg.model, head="classifier", max_len=max_len)
        names = run_label_names(cfg.model)  # a LoRA run's adapter directory has no config.json with them
        bert_cfg = dataclasses.replace(model.cfg, id2label=names) if names else model.cfg
        # eager: on the CPUs measured, compiling the buckets cost more than it saved on 1,000 texts
        params = cast(model.params, device=device)
        clf = text_classifier(params, bert_cfg, model.tokenizer, max_len=max_len, truncation=truncation)
        if device.type != "cpu":
            run = clf.run
            clf.run = lambda x, m: run(x.to(device), m.to(device)).cpu()

    t0 = time.time()
    probs = clf.predict_proba([html_clean(t) for t in texts], batch_size=cfg.batch_size)
    print(f"{len(texts)} texts classified in {time.time() - t0:.1f}s ({clf.last_form})", file=sys.stderr)
    if labels is None:
        for text, p in zip(texts, probs):
            i = int(p.argmax())
            excerpt = " ".join(text.split())
            print(f"{clf.labels[i]}\t{float(p[i]):.4f}\t{excerpt if len(excerpt) <= 70 else excerpt[:67] + '...'}")
        return 0
    y_pred = probs.argmax(-1).tolist()
    correct = sum(int(p == y) for p, y in zip(y_pred, labels))
    lo, hi = wilson_interval(correct, len(labels))
    report = classification_report(labels, y_pred, clf.labels)
    print(
        f"accuracy {correct / len(labels):.4f} (95% CI {lo:.4f}-{hi:.4f}, {len(labels)} reviews), "
        f"macro-F1 {report['macro_f1']:.4f}"
    )
    for name, r in report["per_class"].items():
        print(
            f"  {name}: precision {r['precision']:.4f} recall {r['recall']:.4f} f1 {r['f1']:.4f} support {r['support']}"
        )
    if cfg.errors is not None:
        n = write_errors(cfg.errors, probs, labels, [html_clean(t) for t in texts], ids, clf.labels)
        print(f"wrote {n} errors to {cfg.errors}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
