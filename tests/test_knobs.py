"""Fine-tuning knobs against torch references: freezing (fnlm.train.freeze + partition +
with_frozen = requires_grad=False), gradient accumulation (make_train_step(accum_steps=N) = one
step on the N-times larger batch), float16 dynamic loss scaling (fnlm.optim.dynamic_loss_scale =
torch.amp.GradScaler: an overflowing step is skipped and the scale backs off)."""

import pytest
import torch

from fnlm import optim, random
from fnlm.train import freeze, make_train_step, with_frozen
from fnlm.tree import combine, flatten_names, partition, unflatten_names


def init(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5
    return {
        "embeddings": {"word": {"weight": r(11, 6)}},
        "encoder": {"layers": [{"w": r(6, 6), "b": r(6)} for _ in range(3)]},
        "classifier": {"weight": r(6, 3), "bias": r(3)},
    }


def forward(p, ids):
    h = p["embeddings"]["word"]["weight"][ids].mean(1)
    for layer in p["encoder"]["layers"]:
        h = torch.tanh(h @ layer["w"] + layer["b"])
    return h @ p["classifier"]["weight"] + p["classifier"]["bias"]


def loss_fn(p, batch, key):
    logits = forward(p, batch["ids"]) * batch.get("boost", torch.tensor(1.0))
    return torch.nn.functional.cross_entropy(logits, batch["labels"]), {}


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 11, (n, 5), generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def torch_reference(
    p0, batches, frozen=(), make_opt=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), scaler=None
):
    flat = {k: torch.nn.Parameter(v.clone(), requires_grad=k not in frozen) for k, v in flatten_names(p0).items()}
    opt = make_opt([v for v in flat.values() if v.requires_grad])
    for batch in batches:
        opt.zero_grad()
        loss, _ = loss_fn(unflatten_names(dict(flat)), batch, None)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return {k: v.detach() for k, v in flat.items()}, opt


def close(a, b, tol=1e-5):
    return all((a[k] - b[k]).abs().max() <= tol for k in a)


def test_freeze_selects_by_glob_and_frozen_leaves_get_no_update_and_no_state():
    p0 = init()
    mask = freeze(p0, "embeddings.*, encoder.layers.[0-1].*")
    flat = flatten_names(mask)
    assert {k for k, v in flat.items() if v} == {
        "embeddings.word.weight",
        "encoder.layers.0.w",
        "encoder.layers.0.b",
        "encoder.layers.1.w",
        "encoder.layers.1.b",
    }
    wrapped = {"bert": p0}  # a pattern also matches a tail of the name ('embeddings' = 'embeddings.*')
    assert flatten_names(freeze(wrapped, ["embeddings"]))["bert.embeddings.word.weight"] is True
    frozen, trainable = partition(p0, mask)
    opt = optim.adamw(1e-2, weight_decay=0.0)
    state = opt.init(trainable)
    names = set(flatten_names(trainable))
    assert names == {"encoder.layers.2.w", "encoder.layers.2.b", "classifier.weight", "classifier.bias"}
    assert sum(t.numel() for t in flatten_names(state).values()) == 1 + 2 * sum(
        t.numel() for t in flatten_names(trainable).values()
    )  # count + (mu, nu) of the trainable leaves only
    step = make_train_step(with_frozen(loss_fn, frozen), opt, compile=False)
    batches = [data(8, s) for s in range(3)]
    for b in batches:
        trainable, state, _ = step(trainable, state, b, random.key(0))
    got = flatten_names(combine(trainable, frozen))
    want, _ = torch_reference(p0, batches, frozen={k for k, v in flat.items() if v})
    assert close(got, want)
    assert all(torch.equal(got[k], flatten_names(p0)[k]) for k, v in flat.items() if v)


@pytest.mark.parametrize("bad, match", [("nothing.*", "matches no parameter"), ("*", "freezes every parameter")])
def test_freeze_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        freeze(init(), bad)


@pytest.mark.parametrize("make", ["sgd", "adamw"])
def test_grad_accumulation_equals_the_larger_batch(make):
    p0, n, b = init(), 4, 6
    big = [data(n * b, s) for s in range(2)]
    opt = optim.sgd(0.1, momentum=0.9) if make == "sgd" else optim.adamw(1e-2, weight_decay=0.1, mask=None)
    step = make_train_step(loss_fn, opt, accum_steps=n, compile=False)
    params, state = p0, opt.init(p0)
    for batch in big:
        micro = {k: v.reshape(n, b, *v.shape[1:]) for k, v in batch.items()}
        params, state, metrics = step(params, state, micro, random.key(1))
    ref_opt = (
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
        if make == "sgd"
        else (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
    )
    want, _ = torch_reference(p0, big, make_opt=ref_opt)
    assert close(flatten_names(params), want)


def test_dynamic_loss_scale_matches_grad_scaler_and_skips_overflow():
    p0 = init()
    batches = [data(8, 0), {**data(8, 1), "boost": torch.tensor(1e36)}, data(8, 2), data(8, 3), data(8, 4)]
    opt = optim.dynamic_loss_scale(optim.adamw(1e-2, weight_decay=0.0), init_scale=2.0**16, growth_interval=2)
    step = make_train_step(loss_fn, opt, compile=False)  # nonfinite='raise': an overflow is not an error
    params, state = p0, opt.init(p0)
    seen = []
    for i, batch in enumerate(batches):
        before = params
        params, state, m = step(params, state, batch, random.key(i))
        seen.append((bool(m["overflow"]), float(m["loss_scale"]), float(state.loss_scale)))
        if i == 1:
            assert bool(m["overflow"]) and all(
                torch.equal(a, b) for a, b in zip(flatten_names(params).values(), flatten_names(before).values())
            )
    # the scale: 2^16, overflow -> 2^15, two good steps -> 2^16, ...
    assert seen == [
        (False, 2.0**16, 2.0**16),
        (True, 2.0**16, 2.0**15),
        (False, 2.0**15, 2.0**15),
        (False, 2.0**15, 2.0**16),
        (False, 2.0**16, 2.0**16),
    ]
    assert int(flatten_names(state)["inner.count"]) == 4  # the inner optimizer skipped the overflowing step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    want, _ = torch_reference(
        p0, batches, make_opt=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), scaler=scaler
    )
    assert scaler.get_scale() == float(state.loss_scale)
    assert close(flatten_names(params), want)


def test_make_train_step_without_loss_scale_is_unchanged():
    p0, opt = init(), optim.sgd(0.1)
    params, _, m = make_train_step(loss_fn, opt, compile=False)(p0, opt.init(p0), data(8), random.key(0))
    assert "loss_scale" not in m and "overflow" not in m
    want, _ = torch_reference(p0, [data(8)], make_opt=lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert close(flatten_names(params), want)
