"""Train many models at once: ``vmap`` over stacked params, inside ONE compiled step.

    python examples/ensemble.py            # most of its time on a CPU is compilation
    python examples/ensemble.py --no-compile

Two uses of the same machinery (:func:`fnlm.train.make_ensemble_step`):

1. a deep ensemble: 8 MLPs from 8 seeds, each with its own dropout keys, trained together; the
   averaged prediction beats the typical member;
2. a learning-rate sweep: 6 copies of one model, each with its own Adam learning rate (a tensor
   in ``hparams``), trained together in one step.

Params and optimizer states are stacked with ``fnlm.tree.tree_stack`` (leading axis = member);
the compiled function is ``torch.compile(vmap(train_step))``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import fnlm
from fnlm import optim, random
from fnlm.train import make_ensemble_step, make_train_step
from fnlm.tree import tree_stack, tree_unstack


def spirals(key, n):
    """Two interleaved noisy spirals in 2-D: a small task that MLPs find hard enough."""
    k1, k2 = random.split(key)
    t = random.uniform(k1, (n,), low=0.3, high=2.5 * math.pi)
    y = (torch.arange(n) % 2).long()
    r = t / (2.5 * math.pi)
    angle = t + math.pi * y
    x = 3 * torch.stack([r * torch.cos(angle), r * torch.sin(angle)], -1) + 0.3 * random.normal(k2, (n, 2))
    return {"x": x, "y": y}


def init(key, width=64):
    k = random.split(key, 3)
    return {
        "l1": fnlm.init_linear(k[0], 2, width),
        "l2": fnlm.init_linear(k[1], width, width),
        "out": fnlm.init_linear(k[2], width, 2),
    }


def logits_fn(params, x, key=None):
    h = torch.tanh(fnlm.linear(params["l1"], x))
    h = torch.tanh(fnlm.linear(params["l2"], h))
    h = fnlm.dropout(h, 0.1, key=key, train=key is not None)
    return fnlm.linear(params["out"], h)


def loss_fn(params, batch, key):
    logits = logits_fn(params, batch["x"], key)
    return fnlm.cross_entropy(logits, batch["y"]), {"accuracy": fnlm.accuracy(logits, batch["y"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    compile = not args.no_compile
    train, test = spirals(random.key(0), 512), spirals(random.key(1), 2000)

    def batch_at(step):
        idx = random.bits(random.fold_in(random.key(2), step), (128,)) % 512
        return {"x": train["x"][idx], "y": train["y"][idx]}

    # 1. a deep ensemble -----------------------------------------------------------------------
    n = 8
    opt = optim.adamw(optim.cosine(3e-2, args.steps), weight_decay=1e-4)
    members = [init(random.key(100 + i)) for i in range(n)]
    params, state = tree_stack(members), tree_stack([opt.init(m) for m in members])
    step = make_ensemble_step(loss_fn, opt, compile=compile)
    key = random.key(3)
    t0 = time.perf_counter()
    for s in range(args.steps):
        if s == 1:
            t1 = time.perf_counter()  # step 0 includes compilation
        key, sub = random.split(key)
        params, state, m = step(params, state, batch_at(s), random.split(sub, n))
    t2 = time.perf_counter()
    per_step = (t2 - t1) / (args.steps - 1)
    logits = torch.stack([logits_fn(p, test["x"]) for p in tree_unstack(params)])  # [n, N, 2]
    accs = (logits.argmax(-1) == test["y"]).float().mean(-1)
    ens_acc = (logits.softmax(-1).mean(0).argmax(-1) == test["y"]).float().mean()
    print(
        f"1. {n} MLPs x {args.steps} steps in one {'compiled' if compile else 'eager'} vmap step "
        f"({t1 - t0:.1f} s first step, then {1e3 * per_step:.1f} ms/step for all {n})"
    )
    print(f"   test accuracy per member: {' '.join(f'{a:.3f}' for a in accs.tolist())}")
    print(f"   mean member {accs.mean():.3f}, best member {accs.max():.3f}, averaged ensemble {ens_acc:.3f}")

    # one member alone for comparison (same maths; the ensemble is not n times slower)
    single = make_train_step(loss_fn, opt, compile=compile)
    p, s0 = members[0], opt.init(members[0])
    for s in range(3):
        p, s0, _ = single(p, s0, batch_at(s), random.key(s))
    t3 = time.perf_counter()
    for s in range(3, 23):
        p, s0, _ = single(p, s0, batch_at(s), random.key(s))
    print(f"   one model alone: {1e3 * (time.perf_counter() - t3) / 20:.1f} ms/step")

    # 2. a learning-rate sweep in one step ------------------------------------------------------
    lrs = torch.tensor([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], dtype=torch.float64)
    base = init(random.key(7))
    sweep = make_ensemble_step(loss_fn, lambda hp: optim.adam(lambda count: hp["lr"]), compile=compile)
    params = tree_stack([base] * len(lrs))
    state = tree_stack([optim.adam(1.0).init(base)] * len(lrs))
    for s in range(args.steps):
        params, state, m = sweep(params, state, batch_at(s), random.split(random.key(s), len(lrs)), {"lr": lrs})
    test_loss = torch.stack([fnlm.cross_entropy(logits_fn(p, test["x"]), test["y"]) for p in tree_unstack(params)])
    print(f"2. learning-rate sweep, {len(lrs)} runs in one step, test loss after {args.steps} steps:")
    for lr, loss in zip(lrs.tolist(), test_loss.tolist()):
        print(f"   lr {lr:.0e}: {loss:.3f}{'   <- best' if loss == test_loss.min() else ''}")


if __name__ == "__main__":
    main()
