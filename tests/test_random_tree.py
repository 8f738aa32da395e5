"""Explicit random keys (fnlm.random) and parameter pytrees (fnlm.tree)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap

import fnlm
from fnlm import random
from fnlm.train import compile_fn
from fnlm.tree import (
    cast,
    flatten_names,
    num_params,
    tree_leaves,
    tree_map,
    tree_map_with_name,
    tree_stack,
    tree_structure,
    tree_unstack,
    unflatten_names,
)

SMALL = fnlm.TransformerConfig(
    d_model=16,
    n_heads=2,
    d_ff=32,
    n_layers=2,
    dropout=0.0,
    src_vocab_size=10,
    tgt_vocab_size=12,
    max_len=16,
    positional="learned",
)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


# ----------------------------------------------------------------------------- keys
def test_key_is_two_32_bit_words_and_deterministic():
    k = random.key(0)
    assert k.dtype == torch.int64 and k.shape == (2,)
    assert ((k >= 0) & (k < 2**32)).all()
    assert torch.equal(random.key(0), k)
    seeds = [0, 1, 2, 2**32, 2**40 + 7, -1, 12345]
    keys = {tuple(random.key(s).tolist()) for s in seeds}
    assert len(keys) == len(seeds)  # distinct seeds, distinct keys (also above 32 bits and negative)


def test_same_key_gives_same_params_and_different_seeds_differ():
    a = fnlm.init_transformer(random.key(3), SMALL)
    b = fnlm.init_transformer(random.key(3), SMALL)
    c = fnlm.init_transformer(random.key(4), SMALL)
    assert tree_structure(a) == tree_structure(b) == tree_structure(c)
    for x, y, z in zip(tree_leaves(a), tree_leaves(b), tree_leaves(c)):
        assert torch.equal(x, y)
        if x.std() > 0:  # random leaves (biases are zeros and gains ones, whatever the seed)
            assert not torch.equal(x, z)
            assert abs(corr(x, z)) < 0.5
    # and random leaves within one model are not copies of each other
    ws = [x for x in tree_leaves(a) if x.std() > 0]
    for i in range(len(ws) - 1):
        n = min(ws[i].numel(), ws[i + 1].numel())
        assert not torch.equal(ws[i].flatten()[:n], ws[i + 1].flatten()[:n])


def test_split_and_fold_in_give_distinct_deterministic_keys():
    k = random.key(0)
    ks = random.split(k, 8)
    assert ks.shape == (8, 2) and ks.dtype == torch.int64
    assert torch.equal(ks, random.split(k, 8))
    k1, k2 = random.split(k)
    assert not torch.equal(k1, k2) and not torch.equal(k1, k) and not torch.equal(k2, k)
    folds = torch.stack([random.fold_in(k, i) for i in range(8)])
    assert torch.equal(random.fold_in(k, torch.tensor(5)), folds[5])
    everything = {tuple(x.tolist()) for x in [k, *ks, *folds]}
    assert len(everything) == 1 + 8 + 8  # the key, its 8 children and 8 folds: all distinct


def test_split_streams_are_uncorrelated():
    n = 20_000
    bound = 4.5 / math.sqrt(n)  # |r| of independent streams: ~N(0, 1/n)
    ks = random.split(random.key(42), 6)
    streams = [random.uniform(k, (n,)) for k in ks]
    streams += [random.uniform(random.fold_in(random.key(42), i), (n,)) for i in range(3)]
    streams.append(random.uniform(random.key(42), (n,)))  # the parent
    streams.append(random.uniform(random.key(43), (n,)))  # a neighbouring seed
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            assert abs(corr(streams[i], streams[j])) < bound, (i, j)
        u = streams[i]
        assert abs(corr(u[:-1], u[1:])) < bound  # no lag-1 correlation within a stream
    # normal draws from the two halves of a split too
    k1, k2 = random.split(random.key(7))
    assert abs(corr(random.normal(k1, (n,)), random.normal(k2, (n,)))) < bound


def test_distributions():
    n = 100_000
    u = random.uniform(random.key(1), (n,), low=-2.0, high=3.0)
    assert u.min() >= -2.0 and u.max() < 3.0
    assert abs(u.mean().item() - 0.5) < 5 * 5 / math.sqrt(12 * n)
    counts = torch.histc(u, bins=20, min=-2.0, max=3.0)
    chi2 = ((counts - n / 20) ** 2 / (n / 20)).sum().item()
    assert chi2 < 50  # 19 degrees of freedom: P(chi2 > 50) ~ 1e-4

    z = random.normal(random.key(2), (n,), std=2.0)
    assert abs(z.mean().item()) < 5 * 2 / math.sqrt(n) and abs(z.std().item() - 2.0) < 0.03
    assert abs((z.abs() < 2.0).float().mean().item() - 0.6827) < 0.01  # within one sigma

    t = random.truncated_normal(random.key(3), (n,), std=0.5, bound=2.0)
    assert t.abs().max() <= 1.0 and abs(t.mean().item()) < 0.01

    m = random.bernoulli(random.key(4), 0.3, (n,))
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.3) < 5 * math.sqrt(0.21 / n)

    b = random.bits(random.key(5), (n,))
    assert b.min() >= 0 and b.max() < 2**32
    ones = torch.stack([(b >> i) & 1 for i in range(32)]).float().mean(1)  # every bit is fair
    assert ((ones - 0.5).abs() < 5 * 0.5 / math.sqrt(n)).all()


def test_random_errors():
    with pytest.raises(TypeError, match="expected a random key"):
        random.split(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="expected a random key"):
        random.normal(torch.zeros(3, dtype=torch.int64), (2,))
    with pytest.raises(ValueError, match="limit 2\\*\\*32"):
        random.bits(random.key(0), (2**16, 2**16))


# ----------------------------------------------------------------------------- transforms
def _draws(key):
    k1, k2, k3 = random.split(key, 3)
    return {
        "split": random.split(key, 4),
        "fold_in": random.fold_in(k1, 7),
        "bits": random.bits(k1, (3, 5)),
        "uniform": random.uniform(k2, (4, 6), low=-1.0, high=2.0),
        "bernoulli": random.bernoulli(k3, 0.25, (5, 5)),
        "normal": random.normal(k3, (4, 6)),
        "init_linear": fnlm.init_linear(k2, 5, 3),
    }


def test_random_is_identical_under_torch_compile_fullgraph():
    compiled = compile_fn(_draws)  # torch.compile(fullgraph=True, dynamic=False) + fnlm's options
    for seed in (0, 1):  # a new key value is data: no recompilation, same numbers
        key = random.key(seed)
        eager, comp = _draws(key), compiled(key)
        for name in ("split", "fold_in", "bits", "bernoulli", "uniform"):  # integer pipelines: bit-exact
            assert torch.equal(comp[name], eager[name]), name
        # transcendental functions (log, cos) may be vectorised differently: ulps
        torch.testing.assert_close(comp["normal"], eager["normal"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(comp["init_linear"], eager["init_linear"], atol=0, rtol=0)


def test_vmap_over_split_keys_equals_a_loop():
    keys = random.split(random.key(9), 5)
    batched = vmap(_draws)(keys)
    looped = tree_stack([_draws(k) for k in keys])
    assert tree_structure(batched) == tree_structure(looped)
    for name, x in flatten_names(looped).items():
        assert torch.equal(flatten_names(batched)[name], x), name
    # an ensemble of models initialised under vmap: member i == init with key i
    ensemble = vmap(lambda k: fnlm.init_transformer(k, SMALL))(keys[:3])
    for i, member in enumerate(tree_unstack(ensemble)):
        single = fnlm.init_transformer(keys[i], SMALL)
        assert all(torch.equal(a, b) for a, b in zip(tree_leaves(member), tree_leaves(single)))


# ----------------------------------------------------------------------------- trees
def test_flatten_unflatten_names_round_trip_with_lists():
    params = fnlm.init_transformer(random.key(0), SMALL)
    flat = flatten_names(params)
    assert "encoder.layers.1.attn.q.weight" in flat
    assert "decoder.layers.0.cross_attn.o.bias" in flat
    assert flat["encoder.layers.1.ffn.w2.weight"] is params["encoder"]["layers"][1]["ffn"]["w2"]["weight"]
    assert len(flat) == len(tree_leaves(params))
    back = unflatten_names(flat)
    assert isinstance(back["encoder"]["layers"], list) and len(back["encoder"]["layers"]) == 2
    assert tree_structure(back) == tree_structure(params)
    assert all(a is b for a, b in zip(tree_leaves(back), tree_leaves(params)))
    # a custom separator, and digit keys that are not 0..n-1 stay a dict
    assert unflatten_names(flatten_names(params, sep="/"), sep="/").keys() == params.keys()
    t = unflatten_names({"a.0": 1, "a.1": 2, "b.1": 3, "b.2": 4, "c.x.0": 5})
    assert t == {"a": [1, 2], "b": {"1": 3, "2": 4}, "c": {"x": [5]}}
    with pytest.raises(ValueError, match="conflicts with a leaf"):
        unflatten_names({"a": 1, "a.b": 2})
    with pytest.raises(ValueError, match="duplicate name 'a'"):
        unflatten_names({"a.b": 1, "a": 2})


def test_tree_map_with_name_sees_the_flatten_names():
    params = fnlm.init_transformer(random.key(0), SMALL)
    names = tree_leaves(tree_map_with_name(lambda name, x: name, params))
    assert names == list(flatten_names(params))


def test_cast_keeps_integer_leaves():
    tree = {
        "w": torch.ones(2, 3),
        "step": torch.tensor(7),
        "key": random.key(1),
        "layers": [torch.zeros(4)],
        "mask": torch.tensor([True, False]),
    }
    out = cast(tree, torch.float64)
    assert out["w"].dtype == torch.float64 and out["layers"][0].dtype == torch.float64
    assert out["step"].dtype == torch.int64 and out["step"].item() == 7
    assert out["key"].dtype == torch.int64 and torch.equal(out["key"], tree["key"])
    assert out["mask"].dtype == torch.bool
    half = cast(tree, torch.bfloat16)
    assert half["w"].dtype == torch.bfloat16 and half["step"].dtype == torch.int64
    assert tree["w"].dtype == torch.float32  # not modified in place


def test_num_params_and_stack_unstack():
    cfg = SMALL
    params = fnlm.init_transformer(random.key(0), cfg)
    d, ff, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    attn = 4 * (d * d + d)
    enc = attn + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
    dec = 2 * attn + (d * ff + ff) + (ff * d + d) + 3 * 2 * d
    emb = (10 + 12) * d + 2 * cfg.max_len * d  # token tables and learned position tables
    out = d * 12 + 12
    assert num_params(params) == L * enc + L * dec + emb + out
    trees = [fnlm.init_linear(k, 3, 2) for k in random.split(random.key(0), 4)]
    stacked = tree_stack(trees)
    assert stacked["weight"].shape == (4, 3, 2)
    for a, b in zip(tree_unstack(stacked), trees):
        assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["bias"], b["bias"])
    doubled = tree_map(lambda x: 2 * x, trees[0])
    assert torch.equal(doubled["weight"], 2 * trees[0]["weight"])
