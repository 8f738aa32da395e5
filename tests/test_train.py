"""fnlm.train: the compiled step against torch.autograd + torch.optim, recompiles, accumulation,
non-finite detection, autocast, eval steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import fnlm
from fnlm import optim, random
from fnlm.train import make_eval_step, make_train_step, param_group
from fnlm.tree import flatten_names, tree_leaves, tree_map, unflatten_names

CFG = fnlm.TransformerConfig(
    d_model=16,
    n_heads=2,
    d_ff=32,
    n_layers=1,
    src_vocab_size=23,
    tgt_vocab_size=19,
    max_len=16,
    dropout=0.1,
    attention_dropout=0.1,
)
LR, WD, CLIP, TOTAL, EPS = 3e-3, 0.01, 1.0, 20, 1e-6  # eps 1e-6 as BERT: tames Adam on ~0 grads


def transformer_loss(params, batch, key):
    train = key is not None
    logits = fnlm.transformer(params, batch["src"], batch["tgt_in"], CFG, key=key, train=train)
    return fnlm.cross_entropy(logits, batch["tgt_out"]), {"accuracy": fnlm.accuracy(logits, batch["tgt_out"])}


def transformer_batch(seed, b=4, ls=7, lt=6):
    g = torch.Generator().manual_seed(seed)
    return {
        "src": torch.randint(0, 23, (b, ls), generator=g),
        "tgt_in": torch.randint(0, 19, (b, lt), generator=g),
        "tgt_out": torch.randint(0, 19, (b, lt), generator=g),
    }


def make_opt():
    """The schedule is given once, to the optimizer; the step reports the lr from its state."""
    schedule = optim.linear_warmup_linear_decay(LR, 0, TOTAL)
    return optim.chain(
        optim.clip_by_global_norm(CLIP), optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=WD, eps=EPS)
    )


def torch_reference(loss_fn, params, batches, keys):
    """The same training with torch.autograd, clip_grad_norm_ and torch.optim.AdamW + LambdaLR."""
    flat = {n: t.detach().clone().requires_grad_() for n, t in flatten_names(params).items()}
    decay = [t for n, t in flat.items() if n.endswith(".weight")]
    other = [t for n, t in flat.items() if not n.endswith(".weight")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": other, "weight_decay": 0.0}], lr=LR, eps=EPS, foreach=False
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (TOTAL - s) / TOTAL))
    losses, norms = [], []
    for batch, key in zip(batches, keys):
        opt.zero_grad()
        loss, _ = loss_fn(unflatten_names(flat), batch, key)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(list(flat.values()), CLIP))
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return {n: t.detach() for n, t in flat.items()}, torch.stack(losses), torch.stack(norms)


def assert_tree_close(a, b, atol=5e-5, rtol=1e-4):
    fa, fb = flatten_names(a), flatten_names(b)
    assert list(fa) == list(fb)
    for n in fa:
        if n.endswith("attn.k.bias"):
            # softmax is shift-invariant, so the true gradient of the key bias is exactly 0: what the
            # step sees is rounding noise, which Adam normalises to steps of size ~lr. Only bounded.
            assert (fa[n] - fb[n]).abs().max() <= 2 * LR * TOTAL
            continue
        torch.testing.assert_close(fa[n], fb[n], atol=atol, rtol=rtol, msg=lambda m: f"{n}: {m}")


def run(step, params, opt_state, batches, keys):
    losses, norms, lrs = [], [], []
    for batch, key in zip(batches, keys):
        params, opt_state, m = step(params, opt_state, batch, key)
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
        lrs.append(m.get("lr", torch.tensor(0.0)))
    return params, opt_state, torch.stack(losses), torch.stack(norms), torch.stack(lrs)


def check_compiled_step(loss_fn, params, batches, keys):
    """Compiled (Inductor, fullgraph) == eager == torch.optim reference; one graph, no recompiles."""
    opt = make_opt()
    ref_params, ref_losses, ref_norms = torch_reference(loss_fn, params, batches, keys)
    eager = make_train_step(loss_fn, opt, compile=False)
    e_params, e_state, e_losses, e_norms, e_lrs = run(eager, params, opt.init(params), batches, keys)

    compiled = make_train_step(loss_fn, opt)
    before = counters["stats"]["unique_graphs"]
    p, s, m = compiled(params, opt.init(params), batches[0], keys[0])
    assert counters["stats"]["unique_graphs"] == before + 1  # one graph for the whole step
    c_params, c_state, c_losses, c_norms, c_lrs = run(compiled, p, s, batches[1:], keys[1:])
    assert counters["stats"]["unique_graphs"] == before + 1  # same shapes: no recompilation
    c_losses = torch.cat([m["loss"][None], c_losses])
    c_norms = torch.cat([m["grad_norm"][None], c_norms])

    assert_tree_close(c_params, e_params)
    assert_tree_close(flatten_names(c_params), ref_params)
    torch.testing.assert_close(c_losses, ref_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_losses, ref_losses, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c_norms, ref_norms, atol=1e-5, rtol=1e-4)
    expected_lr = torch.tensor([LR * (TOTAL - s) / TOTAL for s in range(len(batches))], dtype=torch.float64)
    torch.testing.assert_close(e_lrs, expected_lr)  # the lr each update used, read from the optimizer state
    torch.testing.assert_close(torch.cat([m["lr"][None], c_lrs]), expected_lr)
    assert int(c_state[1].count) == len(batches) and c_state[1].count.dtype == torch.int64
    assert set(m) >= {"loss", "grad_norm", "lr", "finite", "grads_finite", "accuracy"}
    return compiled


def test_compiled_transformer_step_matches_torch_optim_and_does_not_recompile():
    params = fnlm.init_transformer(random.key(0), CFG)
    batches = [transformer_batch(i) for i in range(4)]
    keys = list(random.split(random.key(1), 4))
    check_compiled_step(transformer_loss, params, batches, keys)


def test_compiled_bert_classifier_step_matches_torch_optim_and_does_not_recompile():
    bert = fnlm.models
    cfg = bert.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    params = bert.init_bert_classifier(random.key(2), cfg, 3)

    def loss_fn(p, batch, key):
        return bert.classifier_loss(p, batch, cfg, key=key, train=True)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        mask = (torch.arange(8)[None] < torch.tensor([[8], [5], [3]])).long()
        return {
            "input_ids": torch.randint(1, 40, (3, 8), generator=g) * mask,
            "attention_mask": mask,
            "labels": torch.randint(0, 3, (3,), generator=g),
        }

    check_compiled_step(loss_fn, params, [batch(i) for i in range(3)], list(random.split(random.key(3), 3)))


# ----------------------------------------------------------------------------- a small MLP for the rest
def mlp_params(seed=0, d=6, h=8, c=3):
    k = random.split(random.key(seed), 2)
    return {
        "layers": [
            {"weight": random.normal(k[0], (d, h), std=0.5), "bias": torch.zeros(h)},
            {"weight": random.normal(k[1], (h, c), std=0.5), "bias": torch.zeros(c)},
        ]
    }


def mlp_loss(params, batch, key):
    h = torch.tanh(batch["x"] @ params["layers"][0]["weight"] + params["layers"][0]["bias"])
    if key is not None:
        h = fnlm.dropout(h, 0.2, key=key, train=True)
    logits = h @ params["layers"][1]["weight"] + params["layers"][1]["bias"]
    loss = fnlm.cross_entropy(logits, batch["y"])
    if "scale" in batch:  # a term whose gradient is `scale`, only for layers.1.bias (inf injects a bad grad)
        loss = loss + (batch["scale"] * params["layers"][1]["bias"]).sum()
    return loss, {"accuracy": fnlm.accuracy(logits, batch["y"])}


def mlp_batch(seed, b=8):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, 6, generator=g), "y": torch.randint(0, 3, (b,), generator=g)}


def test_same_shapes_one_graph_buckets_one_graph_each():
    cc = CompileCounter()
    opt = optim.sgd(0.1)
    step = make_train_step(mlp_loss, opt, compile=cc)
    p, s = mlp_params(), opt.init(mlp_params())
    for i in range(3):
        p, s, _ = step(p, s, mlp_batch(i, b=8), random.key(i))
    assert cc.frame_count == 1
    for i in range(3):  # a second bucket compiles once; alternating buckets never recompiles
        p, s, _ = step(p, s, mlp_batch(i, b=16), random.key(i))
        p, s, _ = step(p, s, mlp_batch(i, b=8), random.key(i))
    assert cc.frame_count == 2
    other = make_train_step(mlp_loss, opt, compile=cc)  # a second step has its own cache
    other(p, s, mlp_batch(0), random.key(0))
    assert cc.frame_count == 3


def test_dynamic_shapes_compile_one_graph_for_all_lengths():
    cc = CompileCounter()
    opt = optim.sgd(0.1)
    step = make_train_step(mlp_loss, opt, compile=cc, dynamic=True)
    ref = make_train_step(mlp_loss, opt, compile=False)
    p = mlp_params()
    # Batch sizes differ from every param dim (6, 8, 3): dynamo's "duck sizing" would tie a batch
    # of 8 to the hidden width 8 and specialise on it (see make_train_step's ``dynamic``).
    for b in (10, 12, 16, 5):
        new, _, m = step(p, opt.init(p), mlp_batch(b, b=b), random.key(b))
        new_ref, _, m_ref = ref(p, opt.init(p), mlp_batch(b, b=b), random.key(b))
        torch.testing.assert_close(m["loss"], m_ref["loss"])
        assert_tree_close(new, new_ref, atol=1e-6, rtol=1e-5)
    assert cc.frame_count == 1


def test_gradient_accumulation_equals_one_big_batch():
    opt = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1))
    params = mlp_params(1)
    big = [mlp_batch(i, b=12) for i in range(3)]
    micro = [tree_map(lambda x: x.reshape(3, 4, *x.shape[1:]), b) for b in big]  # [k=3, b=4, ...]
    ref = make_train_step(lambda p, b, k: mlp_loss(p, b, None), opt, compile=False)
    acc = make_train_step(lambda p, b, k: mlp_loss(p, b, None), opt, accum_steps=3, compile="aot_eager")
    pr, sr, pa, sa = params, opt.init(params), params, opt.init(params)
    for bb, mb in zip(big, micro):
        pr, sr, mr = ref(pr, sr, bb, random.key(0))
        pa, sa, ma = acc(pa, sa, mb, random.key(0))
        torch.testing.assert_close(ma["loss"], mr["loss"])
        torch.testing.assert_close(ma["accuracy"], mr["accuracy"])
        torch.testing.assert_close(ma["grad_norm"], mr["grad_norm"])
    assert_tree_close(pa, pr, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="micro-batch axis of size 3"):
        acc(pa, sa, big[0], random.key(0))


def test_accumulation_folds_the_key_per_micro_batch():
    params, key = mlp_params(2), random.key(7)
    batch = tree_map(lambda x: x.reshape(2, 4, *x.shape[1:]), mlp_batch(5))
    step = make_train_step(mlp_loss, optim.sgd(1.0), accum_steps=2, compile=False)
    new, _, m = step(params, optim.sgd(1.0).init(params), batch, key)
    # reference: torch.autograd on each micro-batch with dropout key fold_in(key, i), grads averaged
    flat = {n: t.clone().requires_grad_() for n, t in flatten_names(params).items()}
    total = (
        sum(
            mlp_loss(unflatten_names(flat), tree_map(lambda x: x[i], batch), random.fold_in(key, i))[0]
            for i in range(2)
        )
        / 2
    )
    total.backward()
    expected = {n: t.detach() - t.grad for n, t in flat.items()}
    assert_tree_close(flatten_names(new), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m["loss"], total.detach())


def test_nonfinite_grads_raise_naming_the_step_and_the_parameter_group():
    opt = optim.adam(1e-2)
    for compile in (False, "aot_eager"):
        step = make_train_step(mlp_loss, opt, compile=compile)
        p, s = mlp_params(), opt.init(mlp_params())
        for i in range(3):
            p, s, m = step(p, s, {**mlp_batch(i), "scale": torch.tensor(0.0)}, random.key(i))
            assert bool(m["finite"])
        with pytest.raises(FloatingPointError) as err:
            step(p, s, {**mlp_batch(3), "scale": torch.tensor(float("inf"))}, random.key(3))
        msg = str(err.value)
        assert "step 3" in msg and "layers.1" in msg and "bias" in msg and "layers.0" not in msg, msg


def test_nonfinite_loss_is_reported():
    step = make_train_step(
        lambda p, b, k: (mlp_loss(p, b, k)[0] * b["x"].sum() / 0.0, {}), optim.sgd(0.1), compile=False
    )
    p = mlp_params()
    with pytest.raises(FloatingPointError, match="step 0"):
        step(p, optim.sgd(0.1).init(p), mlp_batch(0), random.key(0))


def test_nonfinite_skip_leaves_params_and_state_unchanged():
    opt = optim.adam(1e-2)
    step = make_train_step(mlp_loss, opt, nonfinite="skip", compile="aot_eager")
    p, s = mlp_params(), opt.init(mlp_params())
    p, s, _ = step(p, s, {**mlp_batch(0), "scale": torch.tensor(0.0)}, random.key(0))
    with pytest.warns(RuntimeWarning, match=r"step 1.*layers\.1.*skipped"):
        p2, s2, m = step(p, s, {**mlp_batch(1), "scale": torch.tensor(float("nan"))}, random.key(1))
    assert not bool(m["finite"])
    for a, b in zip(tree_leaves((p, s)), tree_leaves((p2, s2))):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p3, s3, m = step(p2, s2, {**mlp_batch(2), "scale": torch.tensor(0.0)}, random.key(2))
    assert int(s3.count) == 2 and not torch.equal(p3["layers"][0]["weight"], p2["layers"][0]["weight"])


def test_param_group_names():
    assert param_group("encoder.layers.3.attn.q.weight") == "encoder.layers.3"
    assert param_group("classifier.weight") == "classifier"
    assert param_group("bert.embeddings.word.weight") == "bert.embeddings.word"
    assert param_group("w") == "w"


def test_autocast_bf16_forward_keeps_float32_master_weights():
    opt = optim.sgd(0.1)
    p = mlp_params()
    f32 = make_train_step(lambda p, b, k: mlp_loss(p, b, None), opt, compile=False)
    bf16 = make_train_step(
        lambda p, b, k: mlp_loss(p, b, None), opt, compile="aot_eager", autocast_dtype=torch.bfloat16
    )
    pa, _, ma = f32(p, opt.init(p), mlp_batch(0), random.key(0))
    pb, _, mb = bf16(p, opt.init(p), mlp_batch(0), random.key(0))
    assert all(x.dtype == torch.float32 for x in tree_leaves(pb)) and mb["loss"].dtype == torch.float32
    assert not torch.equal(mb["loss"], ma["loss"])  # the matmuls really ran in bf16 ...
    torch.testing.assert_close(mb["loss"], ma["loss"], atol=3e-2, rtol=3e-2)  # ... to bf16 accuracy
    assert_tree_close(pb, pa, atol=1e-2, rtol=5e-2)


def test_eval_step_compiles_once_and_matches_eager():
    cc = CompileCounter()
    p = mlp_params()
    ev = make_eval_step(lambda p, b: mlp_loss(p, b, None)[1], compile=cc)
    for i in range(3):
        out = ev(p, mlp_batch(i))
        torch.testing.assert_close(out["accuracy"], mlp_loss(p, mlp_batch(i), None)[1]["accuracy"])
    assert cc.frame_count == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="nonfinite"):
        make_train_step(mlp_loss, optim.sgd(0.1), nonfinite="maybe")
    with pytest.raises(ValueError, match="accum_steps"):
        make_train_step(mlp_loss, optim.sgd(0.1), accum_steps=0)
    with pytest.raises(TypeError, match="GradientTransformation"):
        make_train_step(mlp_loss, torch.optim.SGD)
    step = make_train_step(mlp_loss, optim.sgd(0.1), compile=False)
    with pytest.raises(TypeError, match="random key"):
        step(mlp_params(), optim.sgd(0.1).init(mlp_params()), mlp_batch(0), 0)


def test_deterministic_compiled_step_is_bitwise_reproducible():
    """deterministic=True: the same inputs give bitwise the same params, call after call, although
    the batch repeats token ids (whose embedding-gradient rows Inductor would otherwise sum with
    parallel atomic adds), and the caller's deterministic-algorithms setting is left as it was."""
    vocab, d = 1000, 64

    def loss_fn(p, batch, key):
        h = torch.tanh(fnlm.embedding(p["embed"], batch["ids"]).mean(-2))
        return fnlm.cross_entropy(h @ p["out"], batch["y"]), {}

    p0 = {"embed": fnlm.init_embedding(random.key(0), vocab, d), "out": random.normal(random.key(1), (d, 3))}
    g = torch.Generator().manual_seed(0)
    batch = {"ids": torch.randint(0, 20, (16, 64), generator=g), "y": torch.randint(0, 3, (16,), generator=g)}
    opt = optim.adam(1e-2)
    step = make_train_step(loss_fn, opt, deterministic=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        runs = []
        for _ in range(3):
            p, s = p0, opt.init(p0)
            for i in range(3):
                p, s, _ = step(p, s, batch, random.key(i))
            runs.append(p)
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(tree_leaves(runs[0]), tree_leaves(other)))
    assert not torch.are_deterministic_algorithms_enabled()
    eager = make_train_step(loss_fn, opt, compile=False)
    p, s = p0, opt.init(p0)
    for i in range(3):
        p, s, _ = eager(p, s, batch, random.key(i))
    assert_tree_close(runs[0], p, atol=1e-5, rtol=1e-4)


def test_every_step_maker_returns_the_same_kind_of_step():
    """make_train_step, make_eval_step, make_ensemble_step and make_dp_sgd_step all return a
    fnlm.train.Step whose .pure is the uncompiled function and which gives the same results."""
    from fnlm.train import Step, make_dp_sgd_step, make_ensemble_step
    from fnlm.tree import tree_stack

    params = {"w": torch.zeros(3, 2)}
    batch = {"x": torch.eye(3), "y": torch.tensor([0, 1, 0])}

    def loss_fn(p, b, key):
        return fnlm.cross_entropy(b["x"] @ p["w"], b["y"]), {}

    opt = optim.sgd(0.1)
    steps = {
        "train": make_train_step(loss_fn, opt, compile=False),
        "eval": make_eval_step(lambda p, b: {"loss": loss_fn(p, b, None)[0]}, compile=False),
        "ensemble": make_ensemble_step(loss_fn, opt, compile=False),
        "dp_sgd": make_dp_sgd_step(
            lambda p, b: loss_fn(p, b, None)[0], opt, clip_norm=1.0, noise_multiplier=0.0, compile=False
        ),
    }
    assert all(isinstance(s, Step) and callable(s.pure) for s in steps.values())
    key = random.key(0)
    p1, _, m1 = steps["train"](params, opt.init(params), batch, key)
    p2, _, m2 = steps["train"].pure(params, opt.init(params), batch, key)
    assert torch.equal(p1["w"], p2["w"]) and torch.equal(m1["loss"], m2["loss"])
    assert torch.equal(steps["eval"](params, batch)["loss"], m1["loss"])
    stacked = tree_stack([params, params])
    pe, _, me = steps["ensemble"](stacked, tree_stack([opt.init(params)] * 2), batch, random.split(key, 2))
    assert torch.equal(pe["w"][0], p1["w"]) and me["loss"].shape == (2,)
    pd, _, md = steps["dp_sgd"](params, opt.init(params), batch, key)
    assert set(md) >= {"loss", "clipped_fraction", "finite", "grads_finite"}


def test_non_finite_checks_are_shared_by_train_ensemble_and_dp_sgd_steps():
    """One check and one message: every training step names the step number and the parameter group."""
    from fnlm.train import make_dp_sgd_step, make_ensemble_step
    from fnlm.tree import tree_stack

    params = {"layers": [{"weight": torch.ones(2, 2)}]}
    batch = {"x": torch.tensor([[float("nan"), 1.0]])}

    def loss_fn(p, b, key=None):
        return (b["x"] @ p["layers"][0]["weight"]).sum(), {}

    opt = optim.sgd(0.1)
    state = opt.init(params)
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite gradients at step 0 \(loss = nan\): in 1 parameter group\(s\): layers.0 \(weight\)",
    ):
        make_train_step(loss_fn, opt, compile=False)(params, state, batch, random.key(0))
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite gradients at step 0 \(loss = nan\): in 1 parameter group\(s\): layers.0 \(weight\)",
    ):
        make_dp_sgd_step(lambda p, b: loss_fn(p, b)[0], opt, clip_norm=1.0, noise_multiplier=0.0, compile=False)(
            params, state, batch, random.key(0)
        )
    ens = make_ensemble_step(loss_fn, opt, compile=False)
    with pytest.raises(
        FloatingPointError, match=r"ensemble: member 0: non-finite gradients at step 0 .*; member 1: non-finite"
    ):
        ens(tree_stack([params, params]), tree_stack([state, state]), batch, random.split(random.key(0), 2))
    with pytest.warns(RuntimeWarning, match="skipped"):
        p, s, _ = make_dp_sgd_step(
            lambda p, b: loss_fn(p, b)[0], opt, clip_norm=1.0, noise_multiplier=0.0, compile=False, nonfinite="skip"
        )(params, state, batch, random.key(0))
    assert torch.equal(p["layers"][0]["weight"], params["layers"][0]["weight"]) and int(s.count) == 0


def test_seed_global_rng_makes_fused_attention_dropout_a_function_of_the_key():
    """fused_attention_dropout=True: the fused kernel's masks come from torch's global generator,
    which the step seeds from the key (and restores): same key, same step; another key, another
    step; the caller's global RNG stream is untouched. Eager and traced agree, in float32 and
    under bf16 autocast."""
    cfg = fnlm.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.3,
        fused_attention_dropout=True,
    )
    params = fnlm.init_bert_classifier(random.key(0), cfg)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1, 50, (4, 10), generator=g),
        "attention_mask": torch.ones(4, 10, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    opt = optim.sgd(0.1)

    def loss_fn(p, b, key):
        return fnlm.classifier_loss(p, b, cfg, key=key, train=True)

    losses = {}
    for compile, dtype in ((False, None), ("aot_eager", None), (False, torch.bfloat16), ("aot_eager", torch.bfloat16)):
        step = fnlm.make_train_step(loss_fn, opt, compile=compile, seed_global_rng=True, autocast_dtype=dtype)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        runs = [step(params, opt.init(params), batch, random.key(i))[2]["loss"] for i in (1, 1, 2)]
        assert torch.equal(torch.get_rng_state(), before)  # forked and restored
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
        losses[compile, dtype] = runs[0]
    torch.testing.assert_close(losses[False, None], losses["aot_eager", None])
    torch.testing.assert_close(losses[False, torch.bfloat16], losses["aot_eager", torch.bfloat16])
    torch.testing.assert_close(losses[False, torch.bfloat16], losses[False, None], rtol=0.02, atol=0.02)
    # a training switch: not written to config.json
    assert fnlm.models.bert_config_to_hf(cfg).get("fused_attention_dropout") is None
    assert random.seed_of(random.key(1)) == random.seed_of(random.key(1)) != random.seed_of(random.key(2))
