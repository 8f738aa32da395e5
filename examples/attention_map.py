"""Attention you can look at: every head's attention map of one sentence, as one PNG.

The maps are the probabilities ``P = softmax(Q K^T / sqrt(d_k))`` (eq. 1 of "Attention Is All You
Need", padding masked) that multiplied ``V`` in each layer and head, as ``bert(...,
output_attentions=True)`` returns them: row ``i`` is where token ``i`` looks, so each row sums to
1. The picture has one row of panels per layer and one column per head, tokens on both axes
(queries down, keys across); the printed summary says where [CLS], whose vector the classifier
reads, attends in the last layer (averaged over heads).

    python examples/attention_map.py "the cat sat on the mat because it was tired"
    python examples/attention_map.py "a wonderful , moving film" --layers=-1 --out runs/cls.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fnlm.data import load_tokenizer
from fnlm.io import CheckpointError, ensure_minilm
from fnlm.models import attention_maps, cls_summary, load_bert

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "weights" / "all-MiniLM-L6-v2"


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("text", help="the sentence to look at")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="a Hugging Face BERT checkpoint directory")
    ap.add_argument("--layers", default=None, help="layers to draw, e.g. --layers=-1 or --layers=0,5 (default: all)")
    ap.add_argument("--max-len", type=int, default=64, help="word pieces ([CLS], [SEP] included; longer text is cut)")
    ap.add_argument("--out", type=Path, default=Path("attention.png"), help="the PNG to write")
    ap.add_argument("--top", type=int, default=5, help="tokens listed in the [CLS] summary")
    args = ap.parse_args(argv)
    if args.max_len < 2 or args.top < 1:
        ap.error("--max-len must be >= 2 and --top >= 1")
    return args


def parse_layers(spec: str | None, n: int) -> list[int]:
    if spec is None:
        return list(range(n))
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--layers must be comma-separated layer numbers, got {spec!r}") from None
    bad = [i for i in out if not -n <= i < n]
    if bad or not out:
        raise CliError(f"--layers {spec!r}: the model has layers 0..{n - 1} (negative numbers count from the end)")
    return [i % n for i in out]


def draw(tokens: list[str], probs: torch.Tensor, layers: list[int], out: Path) -> Path:
    """One panel per (layer, head): ``probs[l, h]`` as an image, queries down, keys across, tokens
    on both axes; written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_heads, n = probs.shape[1], len(tokens)
    cell = max(1.6, 0.18 * n)
    fig, axes = plt.subplots(len(layers), n_heads, figsize=(cell * n_heads, cell * len(layers)), squeeze=False)
    font = max(3.0, min(7.0, 120.0 / n))
    for r, layer in enumerate(layers):
        for h in range(n_heads):
            ax = axes[r, h]
            ax.imshow(probs[layer, h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks(range(n), tokens, rotation=90, fontsize=font)
            ax.set_yticks(range(n), tokens, fontsize=font)
            ax.set_title(f"layer {layer} head {h}", fontsize=font + 1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out


def load(path: Path):
    if path == DEFAULT_WEIGHTS and not (path / "config.json").is_file():
        ensure_minilm(path)
    if not (path / "config.json").is_file():
        raise CliError(f"{path}: no config.json, so not a Hugging Face checkpoint directory")
    try:
        params, cfg = load_bert(path, pooler=False, strict=False)
        return params, cfg, load_tokenizer(path)
    except (CheckpointError, ValueError, OSError) as e:
        raise CliError(str(e).splitlines()[0]) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.out.suffix.lower() != ".png":
            raise CliError(f"--out {args.out}: expected a .png file name")
        params, cfg, tokenizer = load(args.weights)
        tokens, probs = attention_maps(params, cfg, tokenizer, args.text, args.max_len)
        layers = parse_layers(args.layers, probs.shape[0])
        draw(tokens, probs, layers, args.out)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(tokens)} tokens: {' '.join(tokens)}")
    print(f"wrote {args.out}: {len(layers)} layer(s) x {probs.shape[1]} heads")
    print(f"where [CLS] attends in the last layer (layer {probs.shape[0] - 1}, mean over heads):")
    for j, tok, w in cls_summary(tokens, probs)[: args.top]:
        print(f"  {w:.3f}  {tok}  (position {j})  {'#' * round(40 * w)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
