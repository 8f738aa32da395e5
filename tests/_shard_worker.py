"""One worker of tests/test_shard.py: ``python tests/_shard_worker.py MODE OUT_DIR`` with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment (the test starts two)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from fnlm import optim, random
from fnlm.io import write_safetensors
from fnlm.models import GPT2Config, init_gpt2, lm_loss, save_gpt2
from fnlm.train import (
    Sharding,
    load_sharded,
    make_sharded_train_step,
    resident_bytes,
    save_sharded,
    worker_guard,
)
from fnlm.train.distributed import destroy_distributed, init_distributed
from fnlm.tree import flatten_names

# n_embd 9: group sizes are odd, so two workers need padding
CFG = GPT2Config(
    vocab_size=31, n_positions=12, n_embd=9, n_layer=2, n_head=3, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1
)
BATCH, LEN, STEPS, MAX_NORM = 4, 9, 3, 0.5


def loss_fn(params, batch, key):
    return lm_loss(params, batch["ids"], CFG, key=key, train=True), {}


def global_batch(step):
    return {"ids": random.bits(random.fold_in(random.key(7), step), (BATCH, LEN)) % CFG.vocab_size}


def make_opt():
    return optim.adamw(optim.linear_warmup_linear_decay(1e-2, 1, 10), weight_decay=0.1)


def train(sh, held, state, steps, start=0, compile=False):
    step = make_sharded_train_step(loss_fn, make_opt(), sh, max_grad_norm=MAX_NORM, compile=compile)
    for s in range(start, start + steps):
        held, state, m = step(held, state, sh.split_batch(global_batch(s)), random.key(100 + s))
    return held, state, m


def equiv(out: Path, rank: int, world: int) -> None:
    params = init_gpt2(random.key(0), CFG)
    report = {}
    for level in (0, 1, 2, 3):
        sh = Sharding(params, level)
        held = sh.shard(params)
        state = sh.init(make_opt(), held)
        report[f"bytes{level}"] = resident_bytes(held, state)
        report[f"params_bytes{level}"] = resident_bytes(held)
        held, state, m = train(sh, held, state, STEPS)
        report[f"bytes_after{level}"] = resident_bytes(held, state)
        report[f"loss{level}"] = float(m["loss"])
        write_safetensors(flatten_names(sh.unshard(held)), out / f"rank{rank}_level{level}.safetensors")
    report["padded"] = sum(sh.padded_size(g) for g in sh.labels)
    report["n"] = sum(sh.sizes.values())
    report["groups"] = len(sh.labels)
    # level 3 compiled: forward, backward, the collectives and AdamW in one graph
    from torch._dynamo.utils import counters

    sh = Sharding(params, 3)
    held = sh.shard(params)
    held, state, _ = train(sh, held, sh.init(make_opt(), held), 2, compile="aot_eager")
    report["unique_graphs"] = int(counters["stats"]["unique_graphs"])
    write_safetensors(flatten_names(sh.unshard(held)), out / f"rank{rank}_compiled.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def ckpt_save(out: Path, rank: int, world: int) -> None:
    """2 workers, level 3: train 2 steps, save sharded, write the HF directory from the gathered tree."""
    params = init_gpt2(random.key(0), CFG)
    sh = Sharding(params, 3)
    held = sh.shard(params)
    held, state, _ = train(sh, held, sh.init(make_opt(), held), 2)
    save_sharded(out / "ckpt2", sh, held, state, 2, random.key(9), {"note": "two"})
    full = sh.unshard(held)
    if rank == 0:
        save_gpt2(full, CFG, out / "hf_from_2")


def ckpt_resume(out: Path, rank: int, world: int) -> None:
    """2 workers, level 2: load a checkpoint written by ONE process, train 1 more step."""
    params = init_gpt2(random.key(0), CFG)
    sh = Sharding(params, 2)
    held, state, step, key, extra = load_sharded(out / "ckpt1", sh)
    held, state, _ = train(sh, held, state, 1, start=step)
    if rank == 0:
        write_safetensors(flatten_names(sh.unshard(held)), out / "resumed_on_2.safetensors")


def dead(out: Path, rank: int, world: int) -> None:
    """Worker 1 dies after one step; worker 0 must stop with one line, not hang."""
    params = init_gpt2(random.key(0), CFG)
    sh = Sharding(params, 3)
    held = sh.shard(params)
    state = sh.init(make_opt(), held)
    step = make_sharded_train_step(loss_fn, make_opt(), sh, compile=False)
    with worker_guard(timeout=float(os.environ["FNLM_TEST_TIMEOUT"])):
        for s in range(50):
            if rank == 1 and s == 1:
                if os.environ.get("FNLM_TEST_STUCK"):
                    import time

                    time.sleep(600)  # alive but silent: worker 0 must give up after the timeout
                os._exit(3)
            held, state, _ = step(held, state, sh.split_batch(global_batch(s)), random.key(s))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    timeout = float(os.environ.get("FNLM_TEST_TIMEOUT", 60))
    rank, world, _ = init_distributed("gloo", timeout=timeout)
    {"equiv": equiv, "ckpt_save": ckpt_save, "ckpt_resume": ckpt_resume, "dead": dead}[mode](out, rank, world)
    destroy_distributed()
    print(f"worker {rank}: done", flush=True)


if __name__ == "__main__":
    main()
