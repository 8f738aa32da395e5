"""fnlm.vmap_tricks against Python loops: per-example gradients, DP-SGD, ensembles."""

from __future__ import annotations

import pytest
import torch

import fnlm
from fnlm import optim, random
from fnlm.train import (
    dp_aggregate,
    make_dp_sgd_step,
    make_ensemble_step,
    make_train_step,
    per_example_grad_norms,
    per_example_grads,
)
from fnlm.tree import flatten_names, tree_leaves, tree_map, tree_stack, tree_unstack

ENC = fnlm.TransformerConfig(d_model=16, n_heads=2, d_ff=24, n_layers=1, src_vocab_size=17, max_len=12, dropout=0.0)


def init_classifier(seed):
    k = random.split(random.key(seed), 3)
    return {
        "embed": fnlm.init_embedding(k[0], 17, 16),
        "encoder": fnlm.init_encoder(k[1], ENC),
        "head": fnlm.init_linear(k[2], 16, 3),
    }


def classifier_loss(params, batch):
    """Mean cross-entropy of a 1-layer encoder classifier (mean-pooled), over the batch axis."""
    x = fnlm.embedding(params["embed"], batch["ids"])
    h = fnlm.encoder(params["encoder"], x, ENC, key_padding_mask=batch["mask"])
    m = batch["mask"].unsqueeze(-1).float()
    logits = fnlm.linear(params["head"], (h * m).sum(-2) / m.sum(-2))
    return fnlm.cross_entropy(logits, batch["y"])


def make_batch(seed, b=5, n=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, n + 1, (b,), generator=g)
    return {
        "ids": torch.randint(0, 17, (b, n), generator=g),
        "mask": torch.arange(n)[None] < lengths[:, None],
        "y": torch.randint(0, 3, (b,), generator=g),
    }


def loop_grads(params, batch):
    """Reference: torch.autograd on each example separately (a batch of one)."""
    out = []
    for i in range(batch["y"].shape[0]):
        flat = {n: t.clone().requires_grad_() for n, t in flatten_names(params).items()}
        loss = classifier_loss(fnlm.tree.unflatten_names(flat), tree_map(lambda x: x[i : i + 1], batch))
        grads = torch.autograd.grad(loss, list(flat.values()), allow_unused=True)
        out.append({n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(flat.items(), grads)})
    return out


def test_per_example_grads_equal_a_loop_of_single_example_grads():
    params, batch = init_classifier(0), make_batch(1)
    pe = flatten_names(per_example_grads(classifier_loss, params, batch))
    ref = loop_grads(params, batch)
    for name, g in pe.items():
        assert g.shape == (5, *flatten_names(params)[name].shape)
        torch.testing.assert_close(g, torch.stack([r[name] for r in ref]), atol=1e-6, rtol=1e-5)
    norms = per_example_grad_norms(per_example_grads(classifier_loss, params, batch))
    ref_norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in r.values())) for r in ref])
    torch.testing.assert_close(norms, ref_norms, atol=1e-6, rtol=1e-5)
    # and their mean is the ordinary batch gradient (a mean loss over equal-weight examples)
    full = torch.func.grad(classifier_loss)(params, batch)
    for name, g in flatten_names(full).items():
        torch.testing.assert_close(pe[name].mean(0), g, atol=1e-6, rtol=1e-5)


def test_dp_aggregate_clips_each_example_and_adds_calibrated_noise():
    params, batch = init_classifier(0), make_batch(2, b=8)
    grads = per_example_grads(classifier_loss, params, batch)
    ref = loop_grads(params, batch)
    C = 0.5 * float(per_example_grad_norms(grads).median())  # about half the examples get clipped
    clipped = dp_aggregate(grads, random.key(0), clip_norm=C, noise_multiplier=0.0)
    for name, g in flatten_names(clipped).items():
        expected = (
            sum(r[name] / max(1.0, float(torch.sqrt(sum((x**2).sum() for x in r.values()))) / C) for r in ref) / 8
        )
        torch.testing.assert_close(g, expected, atol=1e-7, rtol=1e-5)
    # noise: N(0, sigma^2 C^2) on the sum, so (noisy - clean) * B has std sigma * C
    sigma = 2.0
    noisy = dp_aggregate(grads, random.key(1), clip_norm=C, noise_multiplier=sigma)
    diff = torch.cat([(a - b).flatten() for a, b in zip(tree_leaves(noisy), tree_leaves(clipped))]) * 8
    assert diff.numel() > 2000
    assert abs(diff.std().item() / (sigma * C) - 1) < 0.1 and abs(diff.mean().item()) < 0.1 * sigma * C
    again = dp_aggregate(grads, random.key(1), clip_norm=C, noise_multiplier=sigma)
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(noisy), tree_leaves(again)))  # pure in the key


def test_dp_sgd_step_compiles_and_matches_manual_algorithm():
    params, batch = init_classifier(3), make_batch(4, b=6)
    opt = optim.sgd(0.1)
    step = make_dp_sgd_step(classifier_loss, opt, clip_norm=0.1, noise_multiplier=1.0, compile="aot_eager")
    new, state, m = step(params, opt.init(params), batch, random.key(5))
    g = dp_aggregate(
        per_example_grads(classifier_loss, params, batch), random.key(5), clip_norm=0.1, noise_multiplier=1.0
    )
    for (name, p), gp, np_ in zip(flatten_names(params).items(), tree_leaves(g), tree_leaves(new)):
        torch.testing.assert_close(np_, p - 0.1 * gp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m["loss"], classifier_loss(params, batch), atol=1e-6, rtol=1e-5)
    assert 0.0 <= float(m["clipped_fraction"]) <= 1.0


# ----------------------------------------------------------------------------- ensembles
def mlp_init(seed):
    k = random.split(random.key(seed), 2)
    return {"l1": fnlm.init_linear(k[0], 6, 16), "l2": fnlm.init_linear(k[1], 16, 3)}


def mlp_loss(params, batch, key):
    h = fnlm.dropout(torch.relu(fnlm.linear(params["l1"], batch["x"])), 0.25, key=key, train=True)
    logits = fnlm.linear(params["l2"], h)
    return fnlm.cross_entropy(logits, batch["y"]), {"accuracy": fnlm.accuracy(logits, batch["y"])}


def mlp_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(10, 6, generator=g), "y": torch.randint(0, 3, (10,), generator=g)}


def test_ensemble_of_n_models_equals_n_separate_runs():
    """Inductor-compiled vmap over 3 stacked models == 3 eager runs, step for step."""
    n, steps = 3, 3
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.01))
    members = [mlp_init(s) for s in range(n)]
    keys = [random.split(random.key(10 + s), steps) for s in range(n)]
    ens = make_ensemble_step(mlp_loss, opt)
    params = tree_stack(members)
    state = tree_stack([opt.init(m) for m in members])
    single = make_train_step(mlp_loss, opt, compile=False)
    refs = [(m, opt.init(m)) for m in members]
    for t in range(steps):
        batch = mlp_batch(t)
        params, state, metrics = ens(params, state, batch, torch.stack([k[t] for k in keys]))
        assert metrics["loss"].shape == (n,)
        for i in range(n):
            p, s, m = single(refs[i][0], refs[i][1], batch, keys[i][t])
            refs[i] = (p, s)
            torch.testing.assert_close(metrics["loss"][i], m["loss"], atol=1e-6, rtol=1e-5)
    for i, member in enumerate(tree_unstack(params)):
        for a, b in zip(tree_leaves(member), tree_leaves(refs[i][0])):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert [int(c) for c in state[1].count] == [steps] * n


def test_ensemble_of_learning_rates_equals_separate_runs():
    lrs = [1e-3, 1e-2, 1e-1]
    params0 = mlp_init(0)

    def make_opt(hp):  # each member's lr comes in as a tensor: a schedule that returns it
        return optim.adam(lambda count: hp["lr"])

    ens = make_ensemble_step(mlp_loss, make_opt, compile="aot_eager")
    params = tree_stack([params0] * 3)
    state = tree_stack([optim.adam(1.0).init(params0)] * 3)
    hp = {"lr": torch.tensor(lrs, dtype=torch.float64)}
    key = random.key(0)
    refs = [
        (params0, optim.adam(lr).init(params0), make_train_step(mlp_loss, optim.adam(lr), compile=False)) for lr in lrs
    ]
    for t in range(3):
        params, state, _ = ens(params, state, mlp_batch(t), torch.stack([key] * 3), hp)
        refs = [(*step(p, s, mlp_batch(t), key)[:2], step) for p, s, step in refs]
    for member, (p, _, _) in zip(tree_unstack(params), refs):
        for a, b in zip(tree_leaves(member), tree_leaves(p)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_ensemble_skip_is_per_member():
    opt = optim.sgd(0.1)
    ens = make_ensemble_step(
        lambda p, b, k: (mlp_loss(p, b, k)[0] * b["scale"], {}),
        opt,
        nonfinite="skip",
        shared_batch=False,
        compile="aot_eager",
    )
    members = [mlp_init(s) for s in range(2)]
    batch = tree_stack(
        [{**mlp_batch(0), "scale": torch.tensor(1.0)}, {**mlp_batch(0), "scale": torch.tensor(float("inf"))}]
    )
    params = tree_stack(members)
    with pytest.warns(RuntimeWarning, match="member 1"):
        new, state, m = ens(params, tree_stack([opt.init(x) for x in members]), batch, random.split(random.key(0), 2))
    assert m["finite"].tolist() == [True, False]
    a, b = tree_unstack(new)
    assert not torch.equal(a["l1"]["weight"], members[0]["l1"]["weight"])
    assert all(torch.equal(x, y) for x, y in zip(tree_leaves(b), tree_leaves(members[1])))
