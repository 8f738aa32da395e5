"""Data-parallel training with torch.distributed: the all-reduce inside the compiled step.

    torchrun --nproc_per_node=2 examples/ddp_train.py              # 2 CPU processes (gloo)
    torchrun --nproc_per_node=8 examples/ddp_train.py --steps 200  # 8 GPUs (NCCL), one per process
    python examples/ddp_train.py                                   # also runs as a single process

Every process builds the same tiny Transformer encoder, takes rank 0's parameters
(``broadcast_params``), and trains on its own slice of each global batch. The step is
``make_train_step(loss_fn, opt, grad_sync=all_reduce_mean)``: forward, backward, one all-reduce of
the flattened gradients (plus loss and accuracy), clipping and AdamW are one compiled graph. At
the end the processes check that they hold bitwise the same parameters.
"""

from __future__ import annotations

import argparse
import time

import torch

import fnlm
from fnlm import optim, random
from fnlm.train import make_train_step
from fnlm.train.distributed import all_equal, all_reduce_mean, broadcast_params, destroy_distributed, init_distributed
from fnlm.tree import tree_map

CFG = fnlm.TransformerConfig(
    d_model=32, n_heads=4, d_ff=64, n_layers=2, src_vocab_size=16, max_len=16, dropout=0.1, positional="learned"
)


def init(key):
    k = random.split(key, 4)
    return {
        "embed": fnlm.init_embedding(k[0], 16, 32),
        "pos": fnlm.init_learned_positional(k[1], 16, 32),
        "encoder": fnlm.init_encoder(k[2], CFG),
        "head": fnlm.init_linear(k[3], 32, 16),
    }


def loss_fn(params, batch, key):
    """Task: output, at every position, the running maximum of the tokens so far (bidirectional
    encoder, so it must learn to look left only)."""
    k_drop, k_enc = random.split(key)
    x = fnlm.learned_positional(params["pos"], fnlm.embedding(params["embed"], batch["ids"]))
    x = fnlm.dropout(x, CFG.dropout, key=k_drop, train=True)
    logits = fnlm.linear(params["head"], fnlm.encoder(params["encoder"], x, CFG, key=k_enc, train=True))
    return fnlm.cross_entropy(logits, batch["labels"]), {"accuracy": fnlm.accuracy(logits, batch["labels"])}


def global_batch(step, size):
    ids = random.bits(random.fold_in(random.key(1234), step), (size, 12)) % 16
    return {"ids": ids, "labels": torch.cummax(ids, dim=-1).values}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="global batch, split across processes")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    rank, world, device = init_distributed()
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes {world}")
    params = broadcast_params(tree_map(lambda x: x.to(device), init(random.key(0))))
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.linear_warmup_linear_decay(1e-2, 10, args.steps), weight_decay=0.01),
    )
    opt_state = opt.init(params)
    step = make_train_step(loss_fn, opt, grad_sync=all_reduce_mean, compile=not args.no_compile)
    shard = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    key = random.key(1)
    t0 = time.perf_counter()
    for s in range(args.steps):
        if s == 1:
            t1 = time.perf_counter()
        key, sub = random.split(key)
        batch = tree_map(lambda x: x[shard].to(device), global_batch(s, args.batch))
        # each rank drops different units: fold the rank into the step's dropout key
        params, opt_state, m = step(params, opt_state, batch, random.fold_in(sub, rank))
        if rank == 0 and (s % 25 == 0 or s == args.steps - 1):
            print(
                f"step {s:3d}  loss {float(m['loss']):.3f}  accuracy {float(m['accuracy']):.3f}  "
                f"(averaged over {world} process{'es' if world > 1 else ''})",
                flush=True,
            )
    elapsed = (time.perf_counter() - t1) / max(1, args.steps - 1)
    same = all_equal(params)
    if rank == 0:
        print(
            f"{world} process(es), {args.batch // world} examples each: first step (compile) {t1 - t0:.1f} s, "
            f"then {1e3 * elapsed:.0f} ms/step; parameters identical on all processes: {same}"
        )
    destroy_distributed()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
