"""fnlm.optim against independent references: torch.optim, clip_grad_norm_, HF schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fnlm import optim, random
from fnlm.tree import (
    flatten_names,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_stack,
    tree_unstack,
    unflatten_names,
)

transformers = pytest.importorskip("transformers")

V, D, H, T, B = 29, 16, 24, 9, 4
STEPS = 50


# ---------------------------------------------------------------------------------------------
# A small Transformer-like model written as plain functional torch over an fnlm param tree
# ---------------------------------------------------------------------------------------------


def init_model(seed: int) -> dict:
    k = random.split(random.key(seed), 9)
    return {
        "embed": {"weight": random.normal(k[0], (V, D), std=0.5)},
        "ln": {"gamma": 1.0 + random.normal(k[1], (D,), std=0.1), "beta": random.normal(k[2], (D,), std=0.1)},
        "mlp": {
            "fc1": {"weight": random.normal(k[3], (D, H), std=D**-0.5), "bias": random.normal(k[4], (H,), std=0.1)},
            "fc2": {"weight": random.normal(k[5], (H, D), std=H**-0.5), "bias": random.normal(k[6], (D,), std=0.1)},
        },
        "head": {"weight": random.normal(k[7], (D, V), std=D**-0.5), "bias": random.normal(k[8], (V,), std=0.1)},
    }


def loss_fn(params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of embed -> pre-LN residual MLP -> head (y = x W + b layout)."""
    x = params["embed"]["weight"][tokens[:, :-1]]
    h = F.layer_norm(x, (D,), params["ln"]["gamma"], params["ln"]["beta"])
    mlp = params["mlp"]
    h = F.gelu(h @ mlp["fc1"]["weight"] + mlp["fc1"]["bias"]) @ mlp["fc2"]["weight"] + mlp["fc2"]["bias"]
    x = x + h
    logits = x @ params["head"]["weight"] + params["head"]["bias"]
    return F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, T), generator=g) for _ in range(n)]


BATCHES = batches(STEPS)
grad_fn = torch.func.grad(loss_fn)


def run_fnlm(opt: optim.GradientTransformation, params: dict, data=BATCHES) -> dict:
    state = opt.init(params)
    for tokens in data:
        grads = grad_fn(params, tokens)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return params


def run_torch(make_opt, params: dict, data=BATCHES, *, groups=None, make_sched=None, clip=None) -> dict:
    """The same training loop with nn.Parameters, loss.backward() and a torch.optim optimizer."""
    tp = {n: nn.Parameter(t.detach().clone()) for n, t in flatten_names(params).items()}
    if groups is None:
        param_groups = [{"params": list(tp.values())}]
    else:
        param_groups = [{"params": [tp[n] for n in names], **kw} for names, kw in groups(list(tp))]
    opt = make_opt(param_groups)
    sched = make_sched(opt) if make_sched else None
    for tokens in data:
        opt.zero_grad(set_to_none=True)
        loss_fn(unflatten_names(tp), tokens).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
        opt.step()
        if sched is not None:
            sched.step()
    return unflatten_names({n: p.detach() for n, p in tp.items()})


def max_rel_err(actual: dict, expected: dict) -> float:
    a, e = flatten_names(actual), flatten_names(expected)
    assert a.keys() == e.keys()
    return max(((a[n] - e[n]).abs().max() / e[n].abs().max()).item() for n in a)


def assert_matches(actual: dict, expected: dict, start: dict, rtol: float = 1e-6) -> None:
    err = max_rel_err(actual, expected)
    assert err <= rtol, f"max relative error {err:.3g} > {rtol}"
    # the comparison is meaningful only if training actually moved every parameter
    moved = min(((x - s).abs().max()).item() for x, s in zip(tree_flatten(expected)[0], tree_flatten(start)[0]))
    assert moved > 1e-3, f"some parameter barely moved ({moved:.3g}); the test would not detect much"


def decay_groups(wd: float):
    """torch param groups mirroring default_decay_mask: names ending in `weight` are decayed."""

    def groups(names):
        decay = [n for n in names if n.split(".")[-1] == "weight"]
        rest = [n for n in names if n.split(".")[-1] != "weight"]
        assert decay and rest
        return [(decay, {"weight_decay": wd}), (rest, {"weight_decay": 0.0})]

    return groups


# ---------------------------------------------------------------------------------------------
# Optimizers vs torch.optim over 50 steps
# ---------------------------------------------------------------------------------------------

SGD_CASES = {
    "plain": dict(lr=0.3),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, momentum=0.9, weight_decay=0.01),
    "weight_decay_no_momentum": dict(lr=0.3, weight_decay=0.05),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_torch(case):
    kw = SGD_CASES[case]
    p0 = init_model(0)
    ours = run_fnlm(optim.sgd(**kw), p0)
    ref = run_torch(lambda g: torch.optim.SGD(g, foreach=False, **kw), p0)
    assert_matches(ours, ref, p0)


def test_adam_matches_torch():
    p0 = init_model(1)
    ours = run_fnlm(optim.adam(1e-2, b1=0.85, b2=0.995, eps=1e-7), p0)
    ref = run_torch(lambda g: torch.optim.Adam(g, lr=1e-2, betas=(0.85, 0.995), eps=1e-7, foreach=False), p0)
    assert_matches(ours, ref, p0)


def test_adamw_masked_decay_matches_torch_param_groups():
    p0 = init_model(2)
    ours = run_fnlm(optim.adamw(1e-2, weight_decay=0.5), p0)
    ref = run_torch(lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=False), p0, groups=decay_groups(0.5))
    assert_matches(ours, ref, p0)
    # and the mask matters: decaying everything gives a different (torch: single group) result
    ref_all = run_torch(lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.5, foreach=False), p0)
    assert_matches(run_fnlm(optim.adamw(1e-2, weight_decay=0.5, mask=None), p0), ref_all, p0)
    assert max_rel_err(ref, ref_all) > 1e-4


def test_adamw_with_linear_warmup_schedule_matches_lambdalr():
    p0 = init_model(3)
    sched = optim.linear_warmup_linear_decay(2e-2, warmup_steps=10, total_steps=60)
    ours = run_fnlm(optim.adamw(sched, weight_decay=0.1), p0)
    ref = run_torch(
        lambda g: torch.optim.AdamW(g, lr=2e-2, foreach=False),
        p0,
        groups=decay_groups(0.1),
        make_sched=lambda o: transformers.get_linear_schedule_with_warmup(o, 10, 60),
    )
    assert_matches(ours, ref, p0)


def test_sgd_with_cosine_schedule_matches_lambdalr():
    p0 = init_model(4)
    ours = run_fnlm(optim.sgd(optim.cosine(0.2, total_steps=STEPS, warmup_steps=5), momentum=0.9), p0)
    ref = run_torch(
        lambda g: torch.optim.SGD(g, lr=0.2, momentum=0.9, foreach=False),
        p0,
        make_sched=lambda o: transformers.get_cosine_schedule_with_warmup(o, 5, STEPS),
    )
    assert_matches(ours, ref, p0)


def test_clip_by_global_norm_then_adamw_matches_clip_grad_norm_():
    p0 = init_model(5)
    # max_norm = the smallest initial gradient norm: most steps clip, by factors that vary from step to
    # step (Adam is blind to a constant gradient scale), and steps whose norm has fallen below it don't
    norms = [torch.nn.utils.get_total_norm(tree_leaves(grad_fn(p0, t))).item() for t in BATCHES[:10]]
    max_norm = min(norms)
    opt = optim.chain(optim.clip_by_global_norm(max_norm), optim.adamw(1e-2, weight_decay=0.1))
    ours = run_fnlm(opt, p0)
    ref = run_torch(lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=False), p0, groups=decay_groups(0.1), clip=max_norm)
    assert_matches(ours, ref, p0)
    unclipped = run_fnlm(optim.adamw(1e-2, weight_decay=0.1), p0)
    assert max_rel_err(unclipped, ref) > 1e-4  # clipping was active


def test_clip_by_global_norm_single_step_equals_clip_grad_norm_():
    p0 = init_model(6)
    grads = grad_fn(p0, BATCHES[0])
    total = optim.global_norm(grads)
    assert torch.equal(total, torch.nn.utils.get_total_norm(tree_leaves(grads)))
    for max_norm in (0.5 * total.item(), 2.0 * total.item()):  # clipping and not clipping
        clipped, _ = optim.clip_by_global_norm(max_norm).update(grads, optim.EmptyState())
        tp = {n: nn.Parameter(torch.zeros_like(g)) for n, g in flatten_names(grads).items()}
        for n, g in flatten_names(grads).items():
            tp[n].grad = g.clone()
        torch.nn.utils.clip_grad_norm_(list(tp.values()), max_norm)
        for n, c in flatten_names(clipped).items():
            assert torch.equal(c, tp[n].grad), n


# ---------------------------------------------------------------------------------------------
# Schedules vs Hugging Face's LambdaLR schedules
# ---------------------------------------------------------------------------------------------


def hf_lrs(make_sched, peak: float, n: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    sched = make_sched(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def ours_lrs(schedule, n: int) -> torch.Tensor:
    return torch.stack([schedule(torch.tensor(s)) for s in range(n)])


@pytest.mark.parametrize("warmup,total", [(0, 20), (1, 20), (7, 30), (10, 10), (5, 40)])
def test_linear_warmup_linear_decay_equals_hf(warmup, total):
    peak = 3e-4
    ref = hf_lrs(lambda o: transformers.get_linear_schedule_with_warmup(o, warmup, total), peak, total + 5)
    ours = ours_lrs(optim.linear_warmup_linear_decay(peak, warmup, total), total + 5)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("warmup,total", [(0, 20), (4, 20), (10, 37)])
def test_cosine_equals_hf(warmup, total):
    peak = 1e-3
    ref = hf_lrs(lambda o: transformers.get_cosine_schedule_with_warmup(o, warmup, total), peak, total + 1)
    ours = ours_lrs(optim.cosine(peak, total, warmup_steps=warmup), total + 1)
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-18)


def test_cosine_final_lr_equals_hf_min_lr():
    peak, final, warmup, total = 1e-3, 1e-4, 5, 25
    ref = hf_lrs(
        lambda o: transformers.get_cosine_with_min_lr_schedule_with_warmup(o, warmup, total, min_lr=final),
        peak,
        total + 1,
    )
    sched = optim.cosine(peak, total, warmup_steps=warmup, final_lr=final)
    torch.testing.assert_close(ours_lrs(sched, total + 1), torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
    # past total_steps fnlm holds final_lr (HF's cosine would start rising again)
    assert math.isclose(sched(torch.tensor(total + 7)).item(), final, rel_tol=1e-12)


def test_constant_schedule_and_vectorised_steps():
    steps = torch.arange(12)
    assert torch.equal(optim.constant(0.25)(steps), torch.full((12,), 0.25, dtype=torch.float64))
    lin = optim.linear_warmup_linear_decay(1.0, 3, 10)
    ref = hf_lrs(lambda o: transformers.get_linear_schedule_with_warmup(o, 3, 10), 1.0, 12)
    assert lin(steps).tolist() == ref


# ---------------------------------------------------------------------------------------------
# torch.compile, vmap, purity
# ---------------------------------------------------------------------------------------------


def make_full_opt():
    return optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.linear_warmup_linear_decay(1e-2, 2, 10), weight_decay=0.1),
    )


COMPILE_OPTS = {
    "clip_adamw_linear": make_full_opt,
    "sgd_nesterov_cosine": lambda: optim.sgd(optim.cosine(0.1, 6, warmup_steps=2), 0.9, True, 0.01),
}


@pytest.mark.parametrize("name", list(COMPILE_OPTS))
def test_update_under_torch_compile_matches_eager_without_recompiling(name):
    import torch._dynamo

    opt = COMPILE_OPTS[name]()

    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    p_eager = p_comp = init_model(7)
    s_eager = s_comp = opt.init(p_eager)
    for i, tokens in enumerate(BATCHES[:6]):
        g_eager, g_comp = grad_fn(p_eager, tokens), grad_fn(p_comp, tokens)
        p_eager, s_eager = step(g_eager, s_eager, p_eager)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # the step count is data, not a constant
            p_comp, s_comp = compiled(g_comp, s_comp, p_comp)
    assert max_rel_err(p_comp, p_eager) <= 1e-6
    assert max_rel_err({"s": tree_flatten(s_comp)[0]}, {"s": tree_flatten(s_eager)[0]}) <= 1e-6
    assert int(tree_flatten(s_comp)[0][0]) == 6  # the step count, the first state leaf
    torch._dynamo.reset()


def test_update_under_vmap_equals_separate_runs():
    opt = make_full_opt()
    members = [init_model(s) for s in (10, 11, 12)]
    data = [batches(4, seed=s) for s in (20, 21, 22)]
    separate = [run_fnlm(opt, p, d) for p, d in zip(members, data)]

    def step(params, state, tokens):
        updates, state = opt.update(grad_fn(params, tokens), state, params)
        return optim.apply_updates(params, updates), state

    params = tree_stack(members)
    state = torch.func.vmap(opt.init)(params)
    ref_state = tree_stack([opt.init(p) for p in members])
    assert all(torch.equal(a, b) for a, b in zip(tree_flatten(state)[0], tree_flatten(ref_state)[0]))
    for t in range(4):
        tokens = torch.stack([d[t] for d in data])
        params, state = torch.func.vmap(step)(params, state, tokens)
    for got, ref in zip(tree_unstack(params), separate):
        assert max_rel_err(got, ref) <= 1e-6


ALL_OPTS = {
    "sgd": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd_schedule": lambda: optim.sgd(optim.cosine(0.1, 10)),
    "adam": lambda: optim.adam(1e-2),
    "adamw": lambda: optim.adamw(optim.linear_warmup_linear_decay(1e-2, 1, 5)),
    "chain": make_full_opt,
    "blocks": lambda: optim.chain(
        optim.add_decayed_weights(0.1), optim.scale_by_schedule(optim.constant(-0.1)), optim.scale(0.5)
    ),
}


@pytest.mark.parametrize("name", list(ALL_OPTS))
def test_update_and_apply_do_not_mutate_inputs(name):
    opt = ALL_OPTS[name]()
    clone = lambda tree: tree_map(lambda x: x.clone(), tree)
    params = start = init_model(8)
    state = opt.init(params)
    for tokens in BATCHES[:3]:  # later steps see non-zero state
        grads = grad_fn(params, tokens)
        snap = clone((params, grads, state))
        updates, new_state = opt.update(grads, state, params)
        snap_u = clone(updates)
        new_params = optim.apply_updates(params, updates)
        for a, b in zip(tree_flatten((params, grads, state, updates))[0], tree_flatten((*snap, snap_u))[0]):
            assert torch.equal(a, b)
        params, state = new_params, new_state
    assert not torch.equal(params["head"]["weight"], start["head"]["weight"])  # the updates did something


# ---------------------------------------------------------------------------------------------
# Masks and building blocks
# ---------------------------------------------------------------------------------------------


def test_default_decay_mask():
    params = init_model(0)
    params["layers"] = [{"attn": {"q": {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}}}]
    expected = {
        "embed": {"weight": True},
        "ln": {"gamma": False, "beta": False},
        "mlp": {"fc1": {"weight": True, "bias": False}, "fc2": {"weight": True, "bias": False}},
        "head": {"weight": True, "bias": False},
        "layers": [{"attn": {"q": {"weight": True, "bias": False}}}],
    }
    assert optim.default_decay_mask(params) == expected


def test_mask_as_tree_or_callable():
    p0 = init_model(9)
    data = BATCHES[:10]
    default = run_fnlm(optim.adamw(1e-2, weight_decay=0.5), p0, data)
    as_tree = run_fnlm(optim.adamw(1e-2, weight_decay=0.5, mask=optim.default_decay_mask(p0)), p0, data)
    assert max_rel_err(as_tree, default) == 0.0
    nothing = run_fnlm(optim.adamw(1e-2, weight_decay=0.5, mask=lambda p: tree_map(lambda _: False, p)), p0, data)
    assert max_rel_err(nothing, run_fnlm(optim.adam(1e-2), p0, data)) == 0.0
    with pytest.raises(ValueError, match="mask"):
        optim.adamw(1e-2, mask={"embed": True}).update(p0, optim.adamw(1e-2).init(p0), p0)


def test_building_blocks_equal_plain_sgd_with_coupled_decay():
    p0 = init_model(10)
    data = BATCHES[:10]
    blocks = optim.chain(optim.add_decayed_weights(0.05), optim.scale(-0.3))
    ref = run_torch(lambda g: torch.optim.SGD(g, lr=0.3, weight_decay=0.05, foreach=False), p0, data)
    assert max_rel_err(run_fnlm(blocks, p0, data), ref) <= 1e-6


def test_argument_errors():
    with pytest.raises(ValueError, match="params"):
        optim.adamw(1e-3).update(init_model(0), optim.adamw(1e-3).init(init_model(0)))
    with pytest.raises(ValueError, match="b2"):
        optim.adam(1e-3, b2=1.0)
    with pytest.raises(TypeError, match="lr"):
        optim.sgd("fast")
    with pytest.raises(ValueError, match="nesterov"):
        optim.sgd(0.1, nesterov=True)


def test_inject_hyperparams_updates_equal_the_plain_optimizer_and_hold_the_lr():
    """inject_hyperparams(adamw)(lr=schedule) updates bitwise as adamw(schedule), and its state
    holds lr_t = schedule(t) of the update just made (the schedule's formula written out here)."""
    peak, warmup, total = 1e-2, 3, 10
    schedule = optim.linear_warmup_linear_decay(peak, warmup, total)
    plain = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(schedule, weight_decay=0.1))
    injected = optim.chain(
        optim.clip_by_global_norm(1.0), optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=0.1)
    )
    gen = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    pa, pb, sa, sb = p, p, plain.init(p), injected.init(p)
    for t in range(8):
        g = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
        ua, sa = plain.update(g, sa, pa)
        ub, sb = injected.update(g, sb, pb)
        pa, pb = optim.apply_updates(pa, ua), optim.apply_updates(pb, ub)
        assert torch.equal(pa["w"], pb["w"]) and torch.equal(pa["b"], pb["b"])
        expected = peak * t / warmup if t < warmup else peak * max(0.0, (total - t) / (total - warmup))
        assert optim.find_hyperparam(sb, "lr").item() == pytest.approx(expected, rel=1e-12)
    assert optim.find_hyperparam(sa, "lr") is None  # nothing injected: no lr in the state


def test_inject_hyperparams_float_lr_lives_in_the_state():
    """A float lr is stored once; overwriting it in the state changes the next update (as optax)."""
    opt = optim.inject_hyperparams(optim.sgd)(lr=0.5)
    p = {"w": torch.ones(2)}
    g = {"w": torch.ones(2)}
    state = opt.init(p)
    u, state = opt.update(g, state, p)
    torch.testing.assert_close(u["w"], torch.full((2,), -0.5))
    state = state._replace(hyperparams={"lr": torch.tensor(0.25, dtype=torch.float64)})
    u, state = opt.update(g, state, p)
    torch.testing.assert_close(u["w"], torch.full((2,), -0.25))
    with pytest.raises(TypeError, match="lr"):
        optim.inject_hyperparams(optim.sgd)(momentum=0.9)


# ---------------------------------------------------------------------------------------------
# flatten: the same optimizer over one vector per group (fnlm.tree.ravel)
# ---------------------------------------------------------------------------------------------


def test_ravel_round_trip_gives_views_of_the_vectors():
    from fnlm.optim import decay_groups
    from fnlm.tree import ravel

    p0 = init_model(7)
    vectors, unravel = ravel(p0, decay_groups)
    assert sorted(vectors) == ["other", "weight"]
    names = flatten_names(p0)
    assert vectors["weight"].numel() == sum(x.numel() for n, x in names.items() if n.endswith("weight"))
    back = unravel(vectors)
    assert tree_flatten(back)[1] == tree_flatten(p0)[1]
    for n, x in flatten_names(back).items():
        assert torch.equal(x, names[n]) and x.shape == names[n].shape
        assert x.untyped_storage().data_ptr() == vectors[decay_groups(n)].untyped_storage().data_ptr()  # a view


def test_ravel_errors():
    from fnlm.tree import ravel

    with pytest.raises(ValueError, match="group 'all' mixes torch.float32 .* and torch.bfloat16"):
        ravel({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.bfloat16)})
    vectors, unravel = ravel({"a": torch.zeros(2, 3), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"vector 'all' has shape \(9,\), expected \(10,\)"):
        unravel({"all": torch.zeros(9)})
    with pytest.raises(ValueError, match=r"expected vectors \['all'\], got \['x'\]"):
        unravel({"x": torch.zeros(10)})
    with pytest.raises(TypeError, match="leaf 'a' is a int"):
        ravel({"a": 3})


def test_flatten_clip_adamw_matches_torch_param_groups():
    """flatten(chain(clip, adamw)) over the 'weight' / 'other' vectors: the default decay mask
    decays exactly the leaves named weight, as torch's two param groups."""
    p0 = init_model(8)
    norms = [torch.nn.utils.get_total_norm(tree_leaves(grad_fn(p0, t))).item() for t in BATCHES[:10]]
    opt = optim.chain(optim.clip_by_global_norm(min(norms)), optim.adamw(1e-2, weight_decay=0.1))
    ours = run_fnlm(optim.flatten(opt), p0)
    ref = run_torch(
        lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=False), p0, groups=decay_groups(0.1), clip=min(norms)
    )
    assert_matches(ours, ref, p0, rtol=1e-5)  # the global norm sums in another order: a few ulps
    state = optim.flatten(opt).init(p0)
    assert [tuple(x.shape) for x in tree_leaves(state.inner[1].mu)] == [
        (D * H + H * D + V * D + D * V,),
        (2 * D + H + D + V,),
    ]


def test_flatten_in_the_compiled_step_equals_the_tree_step_and_does_not_recompile():
    from fnlm.train import make_train_step

    p0 = init_model(9)
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.inject_hyperparams(optim.adamw)(lr=optim.linear_warmup_linear_decay(1e-2, 3, 20)),
    )

    def loss(p, tokens, key):
        return loss_fn(p, tokens), {}

    tree_step = make_train_step(loss, opt, compile=False)
    flat_step = make_train_step(loss, optim.flatten(opt))
    a, sa = p0, opt.init(p0)
    b, sb = p0, optim.flatten(opt).init(p0)
    torch._dynamo.utils.counters.clear()
    for i, tokens in enumerate(BATCHES[:20]):
        a, sa, ma = tree_step(a, sa, tokens, random.key(i))
        b, sb, mb = flat_step(b, sb, tokens, random.key(i))
        assert torch.allclose(ma["lr"], mb["lr"]) and torch.allclose(ma["loss"], mb["loss"], rtol=1e-5)
    assert_matches(b, a, p0, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------------
# RMSProp vs torch.optim.RMSprop, L1 vs an explicit L1 term in the loss
# ---------------------------------------------------------------------------------------------

RMSPROP_CASES = {
    "plain": dict(lr=1e-3),
    "alpha_eps": dict(lr=2e-3, alpha=0.9, eps=1e-6),
    "momentum": dict(lr=1e-3, momentum=0.9),
    "centered": dict(lr=1e-3, centered=True),
    "centered_momentum_wd": dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.01),
}


@pytest.mark.parametrize("case", list(RMSPROP_CASES))
def test_rmsprop_matches_torch(case):
    kw = RMSPROP_CASES[case]
    p0 = init_model(5)
    ours = run_fnlm(optim.rmsprop(**kw), p0)
    ref = run_torch(lambda g: torch.optim.RMSprop(g, foreach=False, **kw), p0)
    assert_matches(ours, ref, p0, rtol=1e-5)


def test_rmsprop_with_schedule_matches_lambdalr():
    p0 = init_model(6)
    sched = optim.linear_warmup_linear_decay(2e-3, 5, STEPS)
    ours = run_fnlm(optim.rmsprop(sched, momentum=0.9, centered=True), p0)
    hf = transformers.get_linear_schedule_with_warmup
    ref = run_torch(
        lambda g: torch.optim.RMSprop(g, lr=2e-3, momentum=0.9, centered=True, foreach=False),
        p0,
        make_sched=lambda o: hf(o, 5, STEPS),
    )
    assert_matches(ours, ref, p0, rtol=1e-5)


def test_add_l1_then_sgd_equals_explicit_l1_gradient():
    """add_l1 + SGD equals SGD on loss + l1 * sum |w| over the masked (weight) leaves, autograd's abs."""
    l1, lr = 1e-3, 0.3
    p0 = init_model(7)
    ours = run_fnlm(optim.chain(optim.add_l1(l1, mask=optim.default_decay_mask), optim.sgd(lr)), p0)

    tp = {n: nn.Parameter(t.detach().clone()) for n, t in flatten_names(p0).items()}
    opt = torch.optim.SGD(list(tp.values()), lr=lr, foreach=False)
    for tokens in BATCHES:
        opt.zero_grad(set_to_none=True)
        penalty = sum(p.abs().sum() for n, p in tp.items() if n.split(".")[-1] == "weight")
        (loss_fn(unflatten_names(tp), tokens) + l1 * penalty).backward()
        opt.step()
    ref = unflatten_names({n: p.detach() for n, p in tp.items()})
    assert_matches(ours, ref, p0, rtol=1e-5)
    # the L1 term did something: without it the weights end elsewhere
    plain = run_fnlm(optim.sgd(lr), p0)
    assert max_rel_err(plain, ref) > 1e-4


def test_rmsprop_and_l1_argument_errors():
    with pytest.raises(ValueError, match="alpha"):
        optim.rmsprop(1e-3, alpha=1.5)
    with pytest.raises(ValueError, match="l1"):
        optim.add_l1(-1.0)
    with pytest.raises(ValueError, match="add_l1"):
        optim.add_l1(0.1).update({"w": torch.zeros(2)}, optim.EmptyState())
