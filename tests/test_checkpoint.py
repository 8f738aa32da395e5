"""fnlm.checkpoint: exact round trips, atomic replacement, and bitwise resume in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fnlm
from fnlm import optim, random
from fnlm.io import CheckpointError, read_safetensors
from fnlm.train import load_train_state, save_train_state
from fnlm.tree import tree_flatten, tree_leaves

ROOT = Path(__file__).resolve().parents[1]


def assert_same_tree(a, b):
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    assert sa == sb  # same containers (dict keys and order, lists, tuples, NamedTuple classes)
    for x, y in zip(la, lb):
        assert type(x) is type(y)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:
            assert x == y


def test_round_trip_is_exact(tmp_path):
    cfg = fnlm.TransformerConfig(
        d_model=8, n_heads=2, d_ff=16, n_layers=2, src_vocab_size=11, tgt_vocab_size=11, max_len=8
    )
    params = fnlm.init_transformer(random.key(0), cfg)
    params["tied"] = params["src_embed"]["weight"]  # an alias: saved as its own copy
    params["half"] = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    opt = optim.chain(
        optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine(1e-3, 100, 10)), optim.sgd(0.1, momentum=0.9)
    )
    opt_state = opt.init(params)
    opt_state = (opt_state[0], opt_state[1]._replace(count=torch.tensor(7)), opt_state[2])
    key = random.split(random.key(3))[1]
    extra = {"config": {"d_model": 8}, "data": {"epoch": 2, "offset": 17}, "note": "hi", "loss": 1.5}
    out = save_train_state(tmp_path / "ckpt", params, opt_state, 7, key, extra)
    assert sorted(p.name for p in out.iterdir()) == ["tensors.safetensors", "train_state.json"]
    p2, s2, step, k2, e2 = load_train_state(tmp_path / "ckpt")
    assert_same_tree(p2, params)
    assert_same_tree(s2, opt_state)
    assert isinstance(s2[1], optim.AdamState) and s2[1].count.dtype == torch.int64 and s2[1].count.ndim == 0
    assert isinstance(s2[0], optim.EmptyState) and isinstance(s2, tuple)
    assert isinstance(p2["encoder"]["layers"], list)
    assert step == 7 and isinstance(step, int) and e2 == extra
    assert torch.equal(k2, key) and k2.dtype == torch.int64
    # the file itself is plain safetensors with dotted names
    tensors, _ = read_safetensors(tmp_path / "ckpt" / "tensors.safetensors")
    assert "params.encoder.layers.1.attn.q.weight" in tensors and "opt_state.1.count" in tensors and "key" in tensors


def test_save_replaces_atomically_and_failures_leave_the_old_checkpoint(tmp_path, monkeypatch):
    p = {"w": torch.ones(3)}
    save_train_state(tmp_path / "ckpt", p, (), 1, random.key(0))
    save_train_state(tmp_path / "ckpt", {"w": torch.full((3,), 2.0)}, (), 2, random.key(0))
    params, _, step, _, _ = load_train_state(tmp_path / "ckpt")
    assert step == 2 and torch.equal(params["w"], torch.full((3,), 2.0))

    from fnlm.train import _checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        save_train_state(tmp_path / "ckpt", {"w": torch.zeros(3)}, (), 3, random.key(0))
    params, _, step, _, _ = load_train_state(tmp_path / "ckpt")
    assert step == 2 and torch.equal(params["w"], torch.full((3,), 2.0))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directories left behind


def test_bad_inputs_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(TypeError, match="extra must be JSON"):
        save_train_state(tmp_path / "a", {"w": torch.ones(1)}, (), 0, random.key(0), extra={"t": torch.ones(1)})
    with pytest.raises(TypeError, match="step"):
        save_train_state(tmp_path / "a", {"w": torch.ones(1)}, (), -1, random.key(0))
    with pytest.raises(TypeError, match="cannot save a object"):
        save_train_state(tmp_path / "a", {"w": object()}, (), 0, random.key(0))
    assert not (tmp_path / "a").exists()
    with pytest.raises(CheckpointError, match="not a training-state checkpoint"):
        load_train_state(tmp_path / "missing")
    save_train_state(tmp_path / "b", {"w": torch.ones(2)}, (), 0, random.key(0))
    meta = json.loads((tmp_path / "b" / "train_state.json").read_text())
    params_desc = dict(meta["structure"]["dict"])["params"]["dict"]  # [[name, entry], ...]
    params_desc.append(["v", {"tensor": "params.v"}])
    (tmp_path / "b" / "train_state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="params.v"):
        load_train_state(tmp_path / "b")
    params_desc[-1] = ["v", {"namedtuple": "os:system", "fields": []}]
    (tmp_path / "b" / "train_state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a NamedTuple"):
        load_train_state(tmp_path / "b")
    (tmp_path / "b" / "tensors.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError):
        load_train_state(tmp_path / "b")


# ----------------------------------------------------------------------------- resume
TRAIN_SCRIPT = textwrap.dedent("""
    import sys, torch
    import fnlm
    from fnlm import optim, random
    from fnlm.train import load_train_state, save_train_state
    from fnlm.train import make_train_step

    CFG = fnlm.TransformerConfig(d_model=16, n_heads=2, d_ff=32, n_layers=1, src_vocab_size=13,
                                 tgt_vocab_size=13, max_len=10, dropout=0.2, attention_dropout=0.1)
    SCHEDULE = optim.linear_warmup_linear_decay(1e-2, 2, 50)
    OPT = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(SCHEDULE, weight_decay=0.01))
    DATA_KEY = random.key(99)

    def loss_fn(params, batch, key):
        logits = fnlm.transformer(params, batch["src"], batch["tgt"][:, :-1], CFG, key=key, train=True)
        return fnlm.cross_entropy(logits, batch["tgt"][:, 1:]), {}

    def batch_at(step):  # the data order is a pure function of the step
        k1, k2 = random.split(random.fold_in(DATA_KEY, step))
        src = (random.bits(k1, (4, 8)) % 13)
        return {"src": src, "tgt": (random.bits(k2, (4, 7)) % 13)}

    def train(params, opt_state, key, start, stop):
        step_fn = make_train_step(loss_fn, OPT, compile=False)
        for step in range(start, stop):
            key, sub = random.split(key)
            params, opt_state, _ = step_fn(params, opt_state, batch_at(step), sub)
        return params, opt_state, key

    def fresh():
        params = fnlm.init_transformer(random.key(0), CFG)
        return params, OPT.init(params), random.key(1)

    if __name__ == "__main__":
        mode, path, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
        if mode == "first_half":
            params, opt_state, key = train(*fresh(), 0, k)
            save_train_state(path, params, opt_state, k, key, extra={"k": k})
        else:
            params, opt_state, step, key, extra = load_train_state(path)
            params, opt_state, key = train(params, opt_state, key, step, 2 * k)
            save_train_state(path + "_final", params, opt_state, 2 * k, key, extra)
""")


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    ckpt, k = str(tmp_path / "ckpt"), 3
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for mode in ("first_half", "second_half"):  # two separate interpreters
        subprocess.run(
            [sys.executable, str(script), mode, ckpt, str(k)], check=True, env=env, cwd=tmp_path, timeout=300
        )
    resumed, resumed_state, step, resumed_key, extra = load_train_state(ckpt + "_final")
    assert step == 2 * k and extra == {"k": k}

    sys.path.insert(0, str(tmp_path))
    try:
        import train_script as ts
    finally:
        sys.path.remove(str(tmp_path))
    params, opt_state, key = ts.train(*ts.fresh(), 0, 2 * k)  # uninterrupted, in this process
    for a, b in zip(tree_leaves((params, opt_state, key)), tree_leaves((resumed, resumed_state, resumed_key))):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert int(opt_state[1].count) == 2 * k
