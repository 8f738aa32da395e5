"""Frozen parameters: fnlm.tree.partition/combine, fnlm.train.with_frozen, and the optimizer-side
fnlm.optim.multi_transform / masked / set_to_zero."""

from __future__ import annotations

import pytest
import torch

import fnlm
from fnlm import optim, random
from fnlm.train import make_train_step, with_frozen
from fnlm.tree import combine, flatten_names, mask, partition

CFG = fnlm.BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
)
TRAIN = ["classifier.*", "bert.encoder.layers.1.*"]


def loss_fn(params, batch, key):
    return fnlm.classifier_loss(params, batch, CFG, key=key, train=True)


def batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1, 50, (4, 9), generator=g),
            "attention_mask": torch.ones(4, 9, dtype=torch.long),
            "labels": torch.randint(0, 2, (4,), generator=g),
        }
        for _ in range(n)
    ]


def test_partition_combine_round_trip_and_names():
    params = fnlm.init_bert_classifier(random.key(0), CFG)
    trainable, frozen = partition(params, TRAIN)
    names = flatten_names(params)
    assert set(flatten_names(trainable)) == {
        n for n in names if n.startswith(("classifier.", "bert.encoder.layers.1."))
    }
    assert set(flatten_names(trainable)) | set(flatten_names(frozen)) == set(names)
    back = flatten_names(combine(trainable, frozen))
    assert back.keys() == names.keys() and all(back[n] is names[n] for n in names)
    by_pred, _ = partition(params, lambda name, leaf: leaf.ndim == 1)
    assert all(x.ndim == 1 for x in flatten_names(by_pred).values())
    assert flatten_names(mask(params, "classifier.*")) == {n: n.startswith("classifier.") for n in names}


def test_trainable_step_equals_full_step_with_frozen_updates_zeroed():
    params = fnlm.init_bert_classifier(random.key(0), CFG)
    trainable, frozen = partition(params, TRAIN)
    inner = optim.adamw(1e-2, weight_decay=0.01)
    # the split tree: a step over the trainable part only
    step = make_train_step(with_frozen(loss_fn, frozen), inner, compile=False)
    state = inner.init(trainable)
    # one tree: the same optimizer on the trainable leaves, set_to_zero on the frozen ones
    labels = lambda p: fnlm.tree.tree_map_with_name(  # noqa: E731
        lambda n, _: "train" if n.startswith(("classifier.", "bert.encoder.layers.1.")) else "frozen", p
    )
    full_opt = optim.multi_transform({"train": inner, "frozen": optim.set_to_zero()}, labels)
    full_step = make_train_step(loss_fn, full_opt, compile=False)
    full, full_state = params, full_opt.init(params)
    for i, batch in enumerate(batches()):
        trainable, state, m = step(trainable, state, batch, random.key(i))
        full, full_state, fm = full_step(full, full_state, batch, random.key(i))
        assert torch.equal(m["loss"], fm["loss"])
    got, want, orig = flatten_names(combine(trainable, frozen)), flatten_names(full), flatten_names(params)
    for n in orig:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)
        if n in flatten_names(frozen):
            assert torch.equal(got[n], orig[n]) and torch.equal(want[n], orig[n]), n  # bitwise unchanged
        else:
            assert not torch.equal(got[n], orig[n]), n  # and the trainable ones did move
    # optimizer state: moments for the trainable leaves only; none at all for the frozen label
    assert set(flatten_names(state.mu)) == set(flatten_names(trainable))
    inner_states = full_state.inner_states
    assert set(flatten_names(inner_states["train"].mu)) == set(flatten_names(trainable))
    assert flatten_names(inner_states["frozen"]) == {}


def test_masked_passes_other_leaves_through():
    params = {"a": {"weight": torch.ones(3)}, "b": {"weight": torch.ones(2)}}
    grads = {"a": {"weight": torch.full((3,), 2.0)}, "b": {"weight": torch.full((2,), 5.0)}}
    opt = optim.masked(optim.scale(-0.5), lambda p: mask(p, "a.*"))
    u, _ = opt.update(grads, opt.init(params), params)
    assert torch.equal(u["a"]["weight"], torch.full((3,), -1.0)) and torch.equal(u["b"]["weight"], grads["b"]["weight"])
    z, _ = optim.set_to_zero().update(grads, optim.set_to_zero().init(params))
    assert all(torch.equal(x, torch.zeros_like(x)) for x in fnlm.tree.tree_leaves(z))


def test_bad_specs_are_one_line_errors():
    params = fnlm.init_bert_classifier(random.key(0), CFG)
    with pytest.raises(ValueError, match=r"pattern 'encoder\.\*' matches no leaf") as e:
        partition(params, ["classifier.*", "encoder.*"])
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="glob pattern"):
        partition(params, 3)
    with pytest.raises(ValueError, match="labels 'x' have no transformation"):
        optim.multi_transform({"a": optim.sgd(0.1)}, lambda p: fnlm.tree.tree_map(lambda _: "x", p)).init(params)
    with pytest.raises(ValueError, match="in more than one part"):
        combine(params, params)
