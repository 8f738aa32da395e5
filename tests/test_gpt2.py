"""GPT-2 as pure functions vs Hugging Face ``GPT2LMHeadModel`` (random weights, same tensors),
and the checkpoint mapping both ways."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import fnlm
from fnlm.io import CheckpointError
from fnlm.models import GPT2Config, gpt2, gpt2_config_from_hf, init_gpt2, lm_loss, load_gpt2, save_gpt2
from fnlm.tree import flatten_names

transformers.logging.set_verbosity_error()

# several small shapes, both spellings of tanh-GELU that GPT-2 checkpoints use
CONFIGS = {
    "gelu_new": dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new"),
    "pytorch_tanh": dict(
        vocab_size=61,
        n_positions=24,
        n_embd=24,
        n_layer=3,
        n_head=2,
        n_inner=40,
        activation_function="gelu_pytorch_tanh",
        layer_norm_epsilon=1e-6,
    ),
    "one_head": dict(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=1, activation_function="gelu_new"),
}


def make_hf(name: str, seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A random-weight HF model; biases and LayerNorms randomised too (HF initialises them to 0/1)."""
    torch.manual_seed(seed)
    hc = transformers.GPT2Config(
        **CONFIGS[name], bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = transformers.GPT2LMHeadModel(hc).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or ".ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name in CONFIGS:
        d = tmp_path_factory.mktemp(name)
        make_hf(name).save_pretrained(d)
        out[name] = d
    return out


def batch(cfg: GPT2Config, B=3, L=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, min(L, cfg.n_positions)), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_loss_match_transformers(saved, name):
    hf = transformers.GPT2LMHeadModel.from_pretrained(saved[name]).eval()
    params, cfg = load_gpt2(saved[name])
    ids, mask = batch(cfg)
    with torch.no_grad():
        ref = hf(ids).logits
        ref_pad = hf(ids, attention_mask=mask).logits
        labels = ids.masked_fill(mask == 0, -100)
        ref_loss = hf(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(gpt2(params, ids, cfg), ref, atol=1e-4, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(gpt2(params, ids, cfg, attention_mask=mask)[real], ref_pad[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(lm_loss(params, ids, cfg, attention_mask=mask), ref_loss, atol=1e-5, rtol=0)


def test_left_padding_with_position_ids_matches_transformers(saved):
    hf = transformers.GPT2LMHeadModel.from_pretrained(saved["gelu_new"]).eval()
    params, cfg = load_gpt2(saved["gelu_new"])
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
    out = gpt2(params, ids, cfg, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)


def test_gradients_match_transformers(saved, tmp_path):
    name = "pytorch_tanh"
    hf = transformers.GPT2LMHeadModel.from_pretrained(saved[name])
    hf.eval()
    params, cfg = load_gpt2(saved[name])
    ids, mask = batch(cfg)
    hf(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    grads = torch.func.grad(lambda p: lm_loss(p, ids, cfg, attention_mask=mask))(params)
    # HF's gradients, written as a checkpoint and read through the same table as the weights
    # (the table itself is proven by the logits test above)
    save_file({n: p.grad.contiguous() for n, p in hf.named_parameters()}, tmp_path / "model.safetensors")
    ref, _ = load_gpt2(tmp_path, config=cfg)
    ours, theirs = flatten_names(grads), flatten_names(ref)
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=2e-5, rtol=1e-4, msg=k)


def test_causal_fast_path_equals_reference_formula():
    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    params = init_gpt2(fnlm.random.key(0), cfg)
    ids = torch.randint(0, 40, (2, 12))
    fast = gpt2(params, ids, cfg)  # is_causal SDPA kernel
    slow = gpt2(params, ids, cfg, attention_mask=torch.ones_like(ids))  # explicit boolean causal & padding mask
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    # and the future does not leak: changing token 8 leaves logits 0..7 unchanged
    ids2 = ids.clone()
    ids2[:, 8] = (ids2[:, 8] + 1) % 40
    torch.testing.assert_close(gpt2(params, ids2, cfg)[:, :8], fast[:, :8], atol=0, rtol=0)


def test_init_is_gpt2_like_and_dropout_needs_a_key():
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=4, n_head=4)
    p = init_gpt2(fnlm.random.key(0), cfg)
    assert "lm_head" not in p  # tied
    assert abs(p["tok_embed"]["weight"].std().item() - 0.02) < 0.003
    proj = p["layers"][0]["ffn"]["w2"]["weight"].std().item()
    assert abs(proj - 0.02 / (2 * cfg.n_layer) ** 0.5) < 0.002
    ids = torch.randint(0, 50, (2, 8))
    a = lm_loss(p, ids, cfg, key=fnlm.random.key(1), train=True)
    b = lm_loss(p, ids, cfg, key=fnlm.random.key(1), train=True)
    c = lm_loss(p, ids, cfg, key=fnlm.random.key(2), train=True)
    assert a == b and a != c


def test_round_trip_fnlm_hf_fnlm(tmp_path):
    cfg = GPT2Config(vocab_size=45, n_positions=20, n_embd=24, n_layer=2, n_head=3, n_inner=56)
    params = init_gpt2(fnlm.random.key(5), cfg)
    params = fnlm.tree.tree_map(lambda t: t + 0.05 * torch.randn_like(t), params)  # non-trivial LN/biases
    save_gpt2(params, cfg, tmp_path / "m")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 45, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, gpt2(params, ids, cfg), atol=1e-4, rtol=0)
    back, cfg2 = load_gpt2(tmp_path / "m")
    assert cfg2 == cfg
    a, b = flatten_names(params), flatten_names(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf.save_pretrained(tmp_path / "hf")  # HF's own save (lm_head tied, maybe dropped) loads again
    again, _ = load_gpt2(tmp_path / "hf")
    assert all(torch.equal(a[k], flatten_names(again)[k]) for k in a)


def test_bare_names_sharded_and_buffers(saved, tmp_path):
    params, cfg = load_gpt2(saved["gelu_new"])
    sd = load_file(saved["gelu_new"] / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()  # causal-mask buffers of older checkpoints
    bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    names = sorted(bare)
    (tmp_path / "sh").mkdir()
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for f, keys in shards.items():
        save_file({k: bare[k].contiguous() for k in keys}, tmp_path / "sh" / f)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "sh" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "sh" / "config.json").write_text((saved["gelu_new"] / "config.json").read_text())
    loaded, _ = load_gpt2(tmp_path / "sh")
    a, b = flatten_names(params), flatten_names(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "field,value", [("scale_attn_weights", False), ("add_cross_attention", True), ("tie_word_embeddings", False)]
)
def test_unimplemented_config_options_are_refused(field, value):
    d = transformers.GPT2Config(**CONFIGS["gelu_new"]).to_dict()
    d[field] = value
    with pytest.raises(ValueError, match=f"^{field}=.* is not implemented") as e:
        gpt2_config_from_hf(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "flags",
    [
        dict(scale_attn_by_inverse_layer_idx=True),
        dict(reorder_and_upcast_attn=True),
        dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    ],
)
def test_inverse_layer_scaling_and_upcast_attention_match_transformers(tmp_path, flags):
    torch.manual_seed(0)
    hc = transformers.GPT2Config(
        **CONFIGS["pytorch_tanh"],
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **flags,
    )
    model = transformers.GPT2LMHeadModel(hc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # large enough that a missing 1/(layer+1) shows
    model.save_pretrained(tmp_path / "hf")
    params, cfg = load_gpt2(tmp_path / "hf")
    ids, mask = batch(cfg)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    got = gpt2(params, ids, cfg, attention_mask=mask)
    real = mask.bool()
    assert (got - want)[real].abs().max() <= 1e-4
    if flags.get("scale_attn_by_inverse_layer_idx"):  # the folding is what makes them equal
        unfolded, _ = load_gpt2(tmp_path / "hf", config=cfg)
        assert (gpt2(unfolded, ids, cfg, attention_mask=mask) - want)[real].abs().max() > 1e-3
    save_gpt2(params, cfg, tmp_path / "fnlm")  # folded: an equivalent checkpoint with the flags off
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "fnlm").eval()
    assert not again.config.scale_attn_by_inverse_layer_idx
    with torch.no_grad():
        assert (again(input_ids=ids, attention_mask=mask).logits - want)[real].abs().max() <= 1e-4


def test_bad_config_values():
    with pytest.raises(ValueError, match="activation_function='swish' is not supported"):
        GPT2Config(activation_function="swish")
    with pytest.raises(ValueError, match="n_embd=30 must be divisible by n_head=4"):
        GPT2Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        gpt2_config_from_hf({"model_type": "bert"})


def test_pickle_refused_and_key_reports(saved, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"not really")
    (tmp_path / "p" / "config.json").write_text((saved["one_head"] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused.*save_file"):
        load_gpt2(tmp_path / "p")
    sd = load_file(saved["one_head"] / "model.safetensors")
    sd.pop("transformer.h.0.mlp.c_fc.bias")
    sd["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"][:, :-3].contiguous()
    sd["transformer.extra.weight"] = torch.zeros(2)
    sd["lm_head.weight"] = torch.zeros_like(sd["transformer.wte.weight"])  # untied
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_gpt2(tmp_path / "bad.safetensors", config=saved["one_head"] / "config.json")
    msg = str(e.value)
    for part in (
        "bad.safetensors",
        "missing keys (1): h.0.mlp.c_fc.bias",
        "unexpected keys (1): transformer.extra.weight",
        "transformer.h.0.attn.c_attn.weight: expected shape (16, 48) [n_embd, 3 * n_embd]",
        "lm_head.weight: differs from wte.weight",
    ):
        assert part in msg, msg
    with pytest.raises(CheckpointError, match="no config.json found"):
        load_gpt2(tmp_path / "bad.safetensors")


def test_save_refuses_wrong_params_and_leaves_nothing(tmp_path):
    cfg = GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    params = init_gpt2(fnlm.random.key(0), cfg)
    with pytest.raises(ValueError, match="layers.0.attn.q.weight: expected a tensor of shape"):
        save_gpt2(params, GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=4), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="vocabulary"):
        gpt2(params, torch.tensor([[3, 25]]), cfg)
    with pytest.raises(ValueError, match="longer than the position table"):
        gpt2(params, torch.zeros(1, 9, dtype=torch.long), cfg)
