"""Checks that exercise an accelerator: parity, the compiled bf16 step, one-process collectives.

They run on the device named by ``FNLM_TEST_DEVICE`` (``benchmarks/gpu_check.py`` sets it:
``cuda`` on a GPU machine, ``cpu`` in its smoke mode, with ``FNLM_TEST_COMPILE=aot_eager``); without
it, on ``cuda`` when available, and are skipped otherwise (the rest of the suite covers the CPU).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

import fnlm
from fnlm import optim, random
from fnlm.models import BertConfig, bert_classifier, classifier_loss, init_bert_classifier
from fnlm.train import make_train_step
from fnlm.tree import cast, tree_leaves

DEVICE = os.environ.get("FNLM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
#: ``aot_eager`` traces the same graph without generating code (gpu_check's CPU smoke mode).
COMPILE = {"inductor": True}.get(os.environ.get("FNLM_TEST_COMPILE", "inductor"), os.environ.get("FNLM_TEST_COMPILE"))
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no accelerator (set FNLM_TEST_DEVICE to run on one)")

CFG = BertConfig(
    vocab_size=120,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    num_labels=3,
)


def batch(device, seed=0, b=4, n=24):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([n, n - 5, 7, 1][:b])
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    ids = torch.randint(1, CFG.vocab_size, (b, n), generator=g) * mask
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": torch.randint(0, CFG.num_labels, (b,), generator=g).to(device),
    }


def test_bert_on_the_device_matches_float64_on_the_cpu():
    params = init_bert_classifier(random.key(0), CFG)
    b_cpu, b_dev = batch("cpu"), batch(DEVICE)
    ref = bert_classifier(cast(params, torch.float64), b_cpu["input_ids"], CFG, attention_mask=b_cpu["attention_mask"])
    got = bert_classifier(cast(params, device=DEVICE), b_dev["input_ids"], CFG, attention_mask=b_dev["attention_mask"])
    torch.testing.assert_close(got.cpu().double(), ref, atol=1e-4, rtol=1e-4)


def test_compiled_bf16_step_on_the_device_keeps_float32_weights_and_tracks_float32():
    params = cast(init_bert_classifier(random.key(0), CFG), device=DEVICE)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=0.01))

    def loss_fn(p, b, key):
        return classifier_loss(p, b, CFG, key=key, train=True)

    fp32 = make_train_step(loss_fn, opt, compile=False)
    bf16 = make_train_step(loss_fn, opt, autocast_dtype=torch.bfloat16, compile=COMPILE)
    p32, s32, p16, s16 = params, opt.init(params), params, opt.init(params)
    for i in range(3):
        b, k = batch(DEVICE, seed=i), random.fold_in(random.key(1), i)
        p32, s32, m32 = fp32(p32, s32, b, k)
        p16, s16, m16 = bf16(p16, s16, b, k)
        torch.testing.assert_close(m16["loss"], m32["loss"], atol=5e-2, rtol=5e-2)
    assert all(t.dtype == torch.float32 and t.device.type == torch.device(DEVICE).type for t in tree_leaves(p16))


def test_one_process_collectives_on_the_device():
    """NCCL (GPU) or gloo (CPU) with a world of one: all_reduce_mean and broadcast are the identity."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if torch.device(DEVICE).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        tree = {"w": torch.arange(6.0, device=DEVICE).reshape(2, 3), "b": torch.ones(3, device=DEVICE)}
        out = fnlm.distributed.all_reduce_mean(tree)
        back = fnlm.distributed.broadcast_params(tree)
        for a, b in ((out["w"], tree["w"]), (back["b"], tree["b"])):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()
