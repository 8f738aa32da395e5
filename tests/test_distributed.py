"""fnlm.distributed: two gloo processes on CPU, each with half the batch, end where one process
with the whole batch ends; the all-reduce sits inside the single compiled graph."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fnlm
from fnlm import optim, random
from fnlm.train import make_train_step
from fnlm.tree import flatten_names, tree_map

CFG = fnlm.TransformerConfig(d_model=16, n_heads=2, d_ff=32, n_layers=1, src_vocab_size=13, max_len=10, dropout=0.0)
STEPS, BATCH = 3, 8


def init(seed):
    k = random.split(random.key(seed), 3)
    return {
        "embed": fnlm.init_embedding(k[0], 13, 16),
        "encoder": fnlm.init_encoder(k[1], CFG),
        "head": fnlm.init_linear(k[2], 16, 13),
    }


def loss_fn(params, batch, key):
    h = fnlm.encoder(params["encoder"], fnlm.embedding(params["embed"], batch["ids"]), CFG)
    logits = fnlm.linear(params["head"], h)
    return fnlm.cross_entropy(logits, batch["labels"]), {"accuracy": fnlm.accuracy(logits, batch["labels"])}


def batch_at(step):
    k1, k2 = random.split(random.fold_in(random.key(5), step))
    return {"ids": random.bits(k1, (BATCH, 6)) % 13, "labels": random.bits(k2, (BATCH, 6)) % 13}


def make_opt():
    # SGD, not Adam: Adam would blow the rounding noise in the (truly zero) key-bias gradient up to ~lr
    return optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1, momentum=0.9, weight_decay=0.01))


def worker(rank, world, port, out_dir, compile):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from torch._dynamo.utils import counters

    from fnlm.io import write_safetensors
    from fnlm.train.distributed import all_reduce_mean, broadcast_params, destroy_distributed, init_distributed

    r, w, _ = init_distributed()
    assert (r, w) == (rank, world)
    params = broadcast_params(init(seed=rank))  # different inits: rank 0's must win
    opt = make_opt()
    opt_state = opt.init(params)
    step = make_train_step(loss_fn, opt, grad_sync=all_reduce_mean, compile=compile)
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    losses = []
    for s in range(STEPS):
        params, opt_state, m = step(params, opt_state, tree_map(lambda x: x[shard], batch_at(s)), random.key(s))
        losses.append(m["loss"])
    flat = flatten_names(params)
    flat["losses"] = torch.stack(losses)
    flat["unique_graphs"] = torch.tensor(counters["stats"]["unique_graphs"])
    write_safetensors(flat, Path(out_dir) / f"rank{rank}.safetensors")
    destroy_distributed()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_reference():
    params, opt = init(seed=0), make_opt()
    opt_state, losses = opt.init(params), []
    step = make_train_step(loss_fn, opt, compile=False)
    for s in range(STEPS):
        params, opt_state, m = step(params, opt_state, batch_at(s), random.key(s))
        losses.append(m["loss"])
    return flatten_names(params), torch.stack(losses)


@pytest.mark.parametrize("compile", ["aot_eager", pytest.param(True, marks=pytest.mark.slow)])
def test_two_gloo_processes_with_half_batches_match_one_process(tmp_path, compile):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from fnlm.io import read_safetensors

    mp.start_processes(worker, args=(2, free_port(), str(tmp_path), compile), nprocs=2, start_method="spawn")
    ref, ref_losses = single_process_reference()
    r0, _ = read_safetensors(tmp_path / "rank0.safetensors")
    r1, _ = read_safetensors(tmp_path / "rank1.safetensors")
    assert int(r0["unique_graphs"]) == 1 and int(r1["unique_graphs"]) == 1  # all-reduce inside the one graph
    for name in ref:
        assert torch.equal(r0[name], r1[name]), name  # the processes stay bitwise in sync
        torch.testing.assert_close(r0[name], ref[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(r0["losses"], ref_losses, atol=1e-6, rtol=1e-5)  # averaged loss metric too


def test_single_process_helpers_are_no_ops():
    from fnlm.train.distributed import all_equal, all_reduce_mean, broadcast_params, init_distributed

    if "WORLD_SIZE" in os.environ:
        pytest.skip("running under torchrun")
    assert init_distributed()[:2] == (0, 1)
    tree = {"a": torch.ones(2), "b": [torch.zeros(3)]}
    assert all_reduce_mean(tree) is tree and broadcast_params(tree) is tree and all_equal(tree)
