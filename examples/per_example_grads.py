"""Per-example gradients with one ``vmap``, and what they are good for.

    python examples/per_example_grads.py            # seconds on a CPU
    python examples/per_example_grads.py --compile  # compile the DP-SGD step (adds compile time)

1. ``per_example_grads(loss_fn, params, batch)`` = ``vmap(grad(loss_fn), in_dims=(None, 0))``: the
   gradient of every example in one batched pass. Checked against a Python loop and timed.
2. Gradient norms find mislabelled data: after a little training, the examples whose labels were
   flipped have the largest per-example gradient norms.
3. DP-SGD (Abadi et al. 2016): clip every example's gradient to norm C, sum, add N(0, sigma^2 C^2)
   noise from an explicit key, average -- and the model still learns.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import fnlm
from fnlm import optim, random
from fnlm.train import make_dp_sgd_step, make_train_step, per_example_grad_norms, per_example_grads

CFG = fnlm.TransformerConfig(d_model=32, n_heads=4, d_ff=64, n_layers=1, src_vocab_size=20, max_len=16, dropout=0.0)
N, LEN = 256, 10


def init(key):
    k = random.split(key, 3)
    return {
        "embed": fnlm.init_embedding(k[0], 20, 32),
        "encoder": fnlm.init_encoder(k[1], CFG),
        "head": fnlm.init_linear(k[2], 32, 2),
    }


def logits_fn(params, ids):
    h = fnlm.encoder(params["encoder"], fnlm.embedding(params["embed"], ids), CFG)
    return fnlm.linear(params["head"], h.mean(-2))


def loss_fn(params, batch):
    """Mean cross-entropy over the batch (per_example_grads gives it batches of one)."""
    return fnlm.cross_entropy(logits_fn(params, batch["ids"]), batch["y"])


def make_data(key, n_flipped):
    """Task: does the sequence contain more tokens < 10 than >= 10? A few labels are flipped."""
    ids = random.bits(key, (N, LEN)) % 20
    y = ((ids < 10).sum(-1) > LEN // 2).long()
    flipped = torch.arange(n_flipped) * (N // n_flipped)
    y[flipped] = 1 - y[flipped]
    return {"ids": ids, "y": y}, flipped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="compile the DP-SGD step")
    args = ap.parse_args()
    # vmap runs torch's fused CPU attention kernel through a (correct, slower) per-example fallback
    warnings.filterwarnings("ignore", message="There is a performance drop")
    data, flipped = make_data(random.key(0), n_flipped=8)
    params = init(random.key(1))

    # 1. vmap vs a loop ------------------------------------------------------------------------
    small = {k: v[:32] for k, v in data.items()}
    t0 = time.perf_counter()
    pe = per_example_grads(loss_fn, params, small)
    t1 = time.perf_counter()
    loop = [torch.func.grad(loss_fn)(params, {k: v[i : i + 1] for k, v in small.items()}) for i in range(32)]
    t2 = time.perf_counter()
    diff = max(
        (a - torch.stack(list(b))).abs().max().item()
        for a, b in zip(fnlm.tree.tree_leaves(pe), zip(*[fnlm.tree.tree_leaves(g) for g in loop]))
    )
    print(
        f"1. per-example grads of 32 examples: vmap {1e3 * (t1 - t0):.0f} ms, python loop "
        f"{1e3 * (t2 - t1):.0f} ms, max |difference| = {diff:.1e}"
    )

    # 2. train a little, then rank the examples by gradient norm -----------------------------
    opt = optim.adam(3e-3)
    step = make_train_step(lambda p, b, k: (loss_fn(p, b), {}), opt, compile=False)
    state = opt.init(params)
    for i in range(60):
        idx = (torch.arange(64) + 64 * i) % N
        params, state, m = step(params, state, {k: v[idx] for k, v in data.items()}, random.key(i))
    norms = per_example_grad_norms(per_example_grads(loss_fn, params, data))
    top = norms.argsort(descending=True)[: len(flipped)]
    hits = len(set(top.tolist()) & set(flipped.tolist()))
    print(
        f"2. after 60 Adam steps (loss {m['loss']:.3f}): the {len(flipped)} largest per-example gradient "
        f"norms include {hits} of the {len(flipped)} flipped labels "
        f"(median norm {norms.median():.3f}, flipped {norms[flipped].median():.3f})"
    )

    # 3. DP-SGD from scratch ------------------------------------------------------------------
    params = init(random.key(1))
    opt = optim.sgd(0.5, momentum=0.9)
    dp_step = make_dp_sgd_step(
        loss_fn, opt, clip_norm=1.0, noise_multiplier=0.5, compile=True if args.compile else False
    )
    state, key = opt.init(params), random.key(2)
    first = None
    for i in range(60):
        idx = (torch.arange(64) + 64 * i) % N
        key, sub = random.split(key)
        params, state, m = dp_step(params, state, {k: v[idx] for k, v in data.items()}, sub)
        first = float(m["loss"]) if first is None else first
    acc = fnlm.accuracy(logits_fn(params, data["ids"]), data["y"])
    print(
        f"3. DP-SGD (C=1.0, sigma=0.5, batch 64), 60 steps: loss {first:.3f} -> {float(m['loss']):.3f}, "
        f"clipped fraction {float(m['clipped_fraction']):.2f}, train accuracy {float(acc):.2f}"
    )


if __name__ == "__main__":
    main()
