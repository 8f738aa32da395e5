"""bf16 autocast: native-bf16 detection for --dtype auto, and the compiled MiniLM step in bf16 on a
real batch (float32 master weights, loss close to float32's, no recompiles)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fnlm import optim, random
from fnlm.train import autocast_dtype, make_train_step, native_bf16


def test_native_bf16_is_read_from_the_cpu_flags():
    assert native_bf16("cpu", cpu_flags={"sse2", "avx512f", "avx512_bf16"})
    assert native_bf16("cpu", cpu_flags={"amx_bf16", "amx_tile"})
    assert not native_bf16("cpu", cpu_flags={"sse2", "avx2", "avx512f"})  # AVX-512 alone is not bf16
    assert not native_bf16("cpu", cpu_flags=set())


def test_autocast_dtype_choices():
    assert autocast_dtype("fp32", "cpu", cpu_flags={"avx512_bf16"}) is None
    assert autocast_dtype("bf16", "cpu", cpu_flags=set()) is torch.bfloat16
    assert autocast_dtype("auto", "cpu", cpu_flags={"avx512_bf16"}) is torch.bfloat16
    assert autocast_dtype("auto", "cpu", cpu_flags={"avx2"}) is None
    with pytest.raises(ValueError, match="dtype must be one of"):
        autocast_dtype("fp16", "cpu")


@pytest.mark.slow
def test_compiled_minilm_bf16_step_matches_float32_on_real_reviews(minilm_dir, imdb_archive):
    from fnlm.data import load_imdb, load_tokenizer, subset
    from fnlm.models import classifier_loss, load_bert

    params, cfg = load_bert(minilm_dir, head="classifier", num_labels=2, head_key=random.key(0))
    tok = load_tokenizer(minilm_dir)
    train = subset(load_imdb(imdb_archive, "train"), 16, seed=0)
    enc = tok.encode(train.texts, max_len=128, padding="max_length")
    batch = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc["token_type_ids"],
        "labels": torch.tensor(train.labels),
    }
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-4, weight_decay=0.01))

    def loss_fn(p, b, key):
        return classifier_loss(p, b, cfg, key=key, train=True)

    fp32 = make_train_step(loss_fn, opt, compile=False)
    bf16 = make_train_step(loss_fn, opt, autocast_dtype=torch.bfloat16)
    key = random.key(1)
    p32, s32 = params, opt.init(params)
    p16, s16 = params, opt.init(params)
    losses32, losses16 = [], []
    for i in range(3):
        k = random.fold_in(key, i)
        if i == 1:
            graphs = counters["stats"]["unique_graphs"]
        p32, s32, m32 = fp32(p32, s32, batch, k)
        p16, s16, m16 = bf16(p16, s16, batch, k)
        losses32.append(float(m32["loss"]))
        losses16.append(float(m16["loss"]))
    assert counters["stats"]["unique_graphs"] == graphs  # steps 2 and 3 reuse the one compiled graph
    assert all(
        t.dtype == torch.float32 for t in (p16["classifier"]["weight"], p16["bert"]["embeddings"]["word"]["weight"])
    )
    assert m16["loss"].dtype == torch.float32
    torch.testing.assert_close(torch.tensor(losses16), torch.tensor(losses32), atol=2e-2, rtol=2e-2)
    assert losses16 != losses32  # the matrix products really ran in bf16
