"""Encoder / decoder blocks and the full Transformer: parity with torch.nn's Transformer layers
(weights copied), gradients, vmap, the causal and padding properties, and bad input."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from _torch_ref import decoder_layer_sd, encoder_layer_sd, load, nn_mask, perturb, transformer_sd
from torch import nn
from torch.func import vmap

import fnlm
from fnlm import random
from fnlm.tree import tree_flatten, tree_leaves, tree_map, tree_unflatten

ATOL = 1e-5
D, H, FF = 16, 4, 32
SRC_V, TGT_V = 13, 11


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def cfg_for(**kw) -> fnlm.TransformerConfig:
    base = dict(
        d_model=D, n_heads=H, d_ff=FF, n_layers=2, dropout=0.0, src_vocab_size=SRC_V, tgt_vocab_size=TGT_V, max_len=32
    )
    return fnlm.TransformerConfig(**{**base, **kw})


def lengths_mask(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def ids(shape, vocab, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- parity: blocks
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_block_matches_nn_transformer_encoder_layer(norm_first, activation):
    cfg = cfg_for(norm_first=norm_first, activation=activation, layer_norm_eps=1e-6)
    p = perturb(fnlm.init_encoder_block(random.key(0), cfg), random.key(1))
    ref = load(
        nn.TransformerEncoderLayer(
            D, H, FF, dropout=0.0, activation=activation, layer_norm_eps=1e-6, batch_first=True, norm_first=norm_first
        ),
        encoder_layer_sd(p),
    )
    x = randn(3, 6, D, seed=2)
    kpm = lengths_mask([6, 4, 1], 6)
    got = fnlm.encoder_block(p, x, cfg, key_padding_mask=kpm)
    got_nomask = fnlm.encoder_block(p, x, cfg)
    with torch.no_grad():
        want = ref(x, src_key_padding_mask=nn_mask(kpm))
        want_nomask = ref(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_nomask, want_nomask, atol=ATOL, rtol=0)
    assert not torch.allclose(got, got_nomask, atol=1e-3)  # the padding mask mattered


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_block_matches_nn_transformer_decoder_layer(norm_first, activation):
    cfg = cfg_for(norm_first=norm_first, activation=activation)
    p = perturb(fnlm.init_decoder_block(random.key(0), cfg), random.key(1))
    ref = load(
        nn.TransformerDecoderLayer(
            D, H, FF, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
        ),
        decoder_layer_sd(p),
    )
    y, memory = randn(3, 5, D, seed=2), randn(3, 7, D, seed=3)
    mem_pad = lengths_mask([7, 3, 5], 7)
    tgt_pad = lengths_mask([5, 5, 2], 5)
    got = fnlm.decoder_block(p, y, memory, cfg, tgt_padding_mask=tgt_pad, memory_padding_mask=mem_pad)
    with torch.no_grad():
        want = ref(
            y,
            memory,
            tgt_mask=nn_mask(fnlm.causal_mask(5)),
            memory_key_padding_mask=nn_mask(mem_pad),
            tgt_key_padding_mask=nn_mask(tgt_pad),
        )
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_full_transformer_matches_nn_transformer(norm_first, activation):
    # nn.Transformer always ends each stack with a LayerNorm: final_norm=True
    cfg = cfg_for(norm_first=norm_first, activation=activation, final_norm=True, n_decoder_layers=3)
    params = perturb(fnlm.init_transformer(random.key(0), cfg), random.key(1), std=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ... norm_first"
        ref = nn.Transformer(
            D,
            H,
            num_encoder_layers=2,
            num_decoder_layers=3,
            dim_feedforward=FF,
            dropout=0.0,
            activation=activation,
            batch_first=True,
            norm_first=norm_first,
        )
    load(ref, transformer_sd(params))
    src, tgt = ids((3, 7), SRC_V, 2), ids((3, 5), TGT_V, 3)
    src_pad, tgt_pad = lengths_mask([7, 4, 2], 7), lengths_mask([5, 5, 3], 5)

    got = fnlm.transformer(params, src, tgt, cfg, src_padding_mask=src_pad, tgt_padding_mask=tgt_pad)
    with torch.no_grad(), warnings.catch_warnings():  # embeddings (x sqrt(d_model) + sinusoids) and
        warnings.simplefilter("ignore")  # the output projection are applied outside
        out = ref(
            fnlm.embed(params, src, cfg, "src"),
            fnlm.embed(params, tgt, cfg, "tgt"),
            tgt_mask=nn_mask(fnlm.causal_mask(5)),
            src_key_padding_mask=nn_mask(src_pad),
            tgt_key_padding_mask=nn_mask(tgt_pad),
            memory_key_padding_mask=nn_mask(src_pad),
        )
        want = fnlm.linear(params["out"], out)
    assert got.shape == (3, 5, TGT_V)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_embed_is_scaled_lookup_plus_positions():
    cfg = cfg_for()
    params = fnlm.init_transformer(random.key(0), cfg)
    src = ids((2, 6), SRC_V, 1)
    want = params["src_embed"]["weight"][src] * D**0.5 + fnlm.sinusoidal_table(6, D)
    torch.testing.assert_close(fnlm.embed(params, src, cfg, "src"), want, atol=1e-6, rtol=0)
    cfg_l = cfg_for(positional="learned", scale_embeddings=False)
    pl = fnlm.init_transformer(random.key(0), cfg_l)
    torch.testing.assert_close(
        fnlm.embed(pl, src, cfg_l, "src"), pl["src_embed"]["weight"][src] + pl["src_pos"]["weight"][:6], atol=0, rtol=0
    )
    cfg_t = cfg_for(tie_output=True)
    pt = fnlm.init_transformer(random.key(0), cfg_t)
    assert "out" not in pt
    tgt = ids((2, 4), TGT_V, 2)
    mem = fnlm.encode(pt, src, cfg_t)
    hidden = fnlm.decoder(pt["decoder"], fnlm.embed(pt, tgt, cfg_t, "tgt"), mem, cfg_t)
    torch.testing.assert_close(
        fnlm.decode(pt, tgt, mem, cfg_t), hidden @ pt["tgt_embed"]["weight"].T, atol=ATOL, rtol=0
    )


# ----------------------------------------------------------------------------- gradients
def test_gradcheck_encoder_block():
    cfg = cfg_for(d_model=8, n_heads=2, d_ff=8, norm_first=False, activation="gelu")
    p = perturb(fnlm.init_encoder_block(random.key(0), cfg), random.key(1))
    leaves, spec = tree_flatten(tree_map(lambda t: t.double().requires_grad_(), p))
    x = randn(2, 3, 8, seed=2, dtype=torch.float64).requires_grad_()
    kpm = lengths_mask([3, 2], 3)

    def f(x, *leaves):
        return fnlm.encoder_block(tree_unflatten(list(leaves), spec), x, cfg, key_padding_mask=kpm)

    assert torch.autograd.gradcheck(f, (x, *leaves), fast_mode=True)


def test_func_grad_equals_autograd_grad_for_the_full_model():
    cfg = cfg_for(dropout=0.1, attention_dropout=0.1)
    params = fnlm.init_transformer(random.key(0), cfg)
    src, tgt_in, tgt_out = ids((3, 6), SRC_V, 1), ids((3, 5), TGT_V, 2), ids((3, 5), TGT_V, 3)
    src_pad = lengths_mask([6, 3, 5], 6)
    k = random.key(7)

    def loss(p):
        logits = fnlm.transformer(p, src, tgt_in, cfg, src_padding_mask=src_pad, key=k, train=True)
        return fnlm.cross_entropy(logits, tgt_out)

    g_func = torch.func.grad(loss)(params)
    leaves, spec = tree_flatten(params)
    leaves = [t.clone().requires_grad_() for t in leaves]
    g_auto = torch.autograd.grad(loss(tree_unflatten(leaves, spec)), leaves)
    assert len(tree_leaves(g_func)) == len(g_auto)
    for a, b in zip(tree_leaves(g_func), g_auto):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in g_auto)  # every parameter is used


# ----------------------------------------------------------------------------- vmap
def test_vmap_encoder_block_over_examples():
    cfg = cfg_for()
    p = perturb(fnlm.init_encoder_block(random.key(0), cfg), random.key(1))
    x = randn(4, 6, D, seed=2)
    kpm = lengths_mask([6, 2, 4, 5], 6)
    batched = fnlm.encoder_block(p, x, cfg, key_padding_mask=kpm)
    per_example = vmap(lambda x, m: fnlm.encoder_block(p, x, cfg, key_padding_mask=m))(x, kpm)
    torch.testing.assert_close(per_example, batched, atol=ATOL, rtol=0)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "relative"])
def test_vmap_full_transformer_over_examples(positional):
    cfg = cfg_for(positional=positional)
    params = fnlm.init_transformer(random.key(0), cfg)
    src, tgt = ids((4, 6), SRC_V, 1), ids((4, 5), TGT_V, 2)
    src_pad = lengths_mask([6, 2, 4, 5], 6)
    batched = fnlm.transformer(params, src, tgt, cfg, src_padding_mask=src_pad)
    per_example = vmap(lambda s, t, m: fnlm.transformer(params, s, t, cfg, src_padding_mask=m))(src, tgt, src_pad)
    torch.testing.assert_close(per_example, batched, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("positional", ["sinusoidal", "relative"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_is_causal(positional, norm_first):
    """Changing target token t+1 never changes the outputs at positions <= t."""
    cfg = cfg_for(positional=positional, norm_first=norm_first)
    params = fnlm.init_transformer(random.key(0), cfg)
    src, tgt = ids((2, 6), SRC_V, 1), ids((2, 7), TGT_V, 2)
    base = fnlm.transformer(params, src, tgt, cfg)
    for t in range(6):
        changed = tgt.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1 + t) % TGT_V
        out = fnlm.transformer(params, src, changed, cfg)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=ATOL, rtol=0)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4)  # ... but does change t+1


@pytest.mark.parametrize("norm_first", [False, True])
def test_block_queries_compute_exactly_those_rows(norm_first):
    """``queries=slice`` skips the other rows' attention and FFN; the rows it keeps are the full
    block's, with a padding mask, a per-query mask and an additive per-query bias all present."""
    cfg = cfg_for(norm_first=norm_first)
    p = perturb(fnlm.init_encoder_block(random.key(0), cfg), random.key(1))
    x = randn(3, 6, D, seed=2, dtype=torch.float64)
    p = tree_map(lambda t: t.double(), p)
    kw = dict(
        key_padding_mask=lengths_mask([6, 4, 2], 6),
        mask=randn(6, 6, seed=3) > -1.0,
        bias=randn(H, 6, 6, seed=4, dtype=torch.float64),
    )
    full = fnlm.encoder_block(p, x, cfg, **kw)
    for rows in (slice(0, 1), slice(2, 5), slice(None)):
        got = fnlm.encoder_block(p, x, cfg, queries=rows, **kw)
        assert got.shape == full[:, rows].shape
        torch.testing.assert_close(got, full[:, rows], atol=1e-12, rtol=0)
    with pytest.raises(TypeError, match="queries must be a slice"):
        fnlm.encoder_block(p, x, cfg, queries=0)


def test_encoder_last_queries_equals_the_full_stack_rows():
    cfg = cfg_for(positional="relative", n_layers=3)
    params = fnlm.init_transformer(random.key(0), cfg)["encoder"]
    x, kpm = randn(2, 7, D, seed=1), lengths_mask([7, 3], 7)
    full = fnlm.encoder(params, x, cfg, key_padding_mask=kpm)
    cls = fnlm.encoder(params, x, cfg, key_padding_mask=kpm, last_queries=slice(0, 1))
    torch.testing.assert_close(cls, full[:, :1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "relative"])
def test_padded_tokens_have_no_effect(positional):
    cfg = cfg_for(positional=positional)
    params = fnlm.init_transformer(random.key(0), cfg)
    lengths = [7, 3, 5]
    src, tgt = ids((3, 7), SRC_V, 1), ids((3, 6), TGT_V, 2)
    src_pad, tgt_pad = lengths_mask(lengths, 7), lengths_mask([6, 4, 2], 6)
    src2 = torch.where(src_pad, src, ids((3, 7), SRC_V, 3))  # different ids in the padded slots
    tgt2 = torch.where(tgt_pad, tgt, ids((3, 6), TGT_V, 4))
    assert not torch.equal(src2, src) and not torch.equal(tgt2, tgt)
    kw = dict(src_padding_mask=src_pad, tgt_padding_mask=tgt_pad)
    a = fnlm.transformer(params, src, tgt, cfg, **kw)
    b = fnlm.transformer(params, src2, tgt2, cfg, **kw)
    torch.testing.assert_close(b[tgt_pad], a[tgt_pad], atol=ATOL, rtol=0)
    mem_a, mem_b = (
        fnlm.encode(params, src, cfg, src_padding_mask=src_pad),
        fnlm.encode(params, src2, cfg, src_padding_mask=src_pad),
    )
    torch.testing.assert_close(mem_b[src_pad], mem_a[src_pad], atol=ATOL, rtol=0)
    # and the same sentence alone, unpadded, gives the same encoding as inside the padded batch
    alone = fnlm.encode(params, src[1:2, :3], cfg)
    torch.testing.assert_close(alone[0], mem_a[1, :3], atol=ATOL, rtol=0)


def test_greedy_decode_is_argmax_of_its_own_prefix():
    cfg = cfg_for()
    params = fnlm.init_transformer(random.key(0), cfg)
    src = ids((3, 5), SRC_V, 1)
    ys = fnlm.greedy_decode(params, src, cfg, bos_id=1, max_len=6)
    assert ys.shape == (3, 6) and (ys[:, 0] == 1).all()
    logits = fnlm.transformer(params, src, ys[:, :-1], cfg)
    assert torch.equal(logits.argmax(-1), ys[:, 1:])


def test_dropout_in_blocks_is_keyed():
    cfg = cfg_for(dropout=0.3, attention_dropout=0.2)
    params = fnlm.init_transformer(random.key(0), cfg)
    src, tgt = ids((2, 5), SRC_V, 1), ids((2, 4), TGT_V, 2)
    a = fnlm.transformer(params, src, tgt, cfg, key=random.key(1), train=True)
    b = fnlm.transformer(params, src, tgt, cfg, key=random.key(1), train=True)
    c = fnlm.transformer(params, src, tgt, cfg, key=random.key(2), train=True)
    e1, e2 = fnlm.transformer(params, src, tgt, cfg), fnlm.transformer(params, src, tgt, cfg, key=random.key(1))
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)
    assert torch.equal(e1, e2) and not torch.allclose(a, e1, atol=1e-3)
    with pytest.raises(ValueError, match="needs a random key"):
        fnlm.transformer(params, src, tgt, cfg, train=True)


# ----------------------------------------------------------------------------- bad input
def test_config_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=4"):
        fnlm.TransformerConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="positional must be one of"):
        fnlm.TransformerConfig(positional="rotary")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        fnlm.TransformerConfig(dropout=1.5)
    with pytest.raises(ValueError, match="n_heads must be positive, got 0"):
        fnlm.TransformerConfig(n_heads=0)
    with pytest.raises(ValueError, match="needs src_vocab_size and tgt_vocab_size"):
        fnlm.init_transformer(random.key(0), fnlm.TransformerConfig(d_model=16, n_heads=2))
    cfg = cfg_for()
    assert hash(cfg) == hash(dataclasses.replace(cfg))  # hashable: a compile-time constant


def test_blocks_name_a_mismatched_d_model():
    cfg = cfg_for()
    enc = fnlm.init_encoder_block(random.key(0), cfg)
    dec = fnlm.init_decoder_block(random.key(0), cfg)
    with pytest.raises(ValueError, match=r"x_q has shape \(2, 5, 8\), but its last axis must be d_model=16"):
        fnlm.encoder_block(enc, torch.zeros(2, 5, 8), cfg)
    with pytest.raises(ValueError, match=r"x_kv has shape \(2, 4, 8\), but its last axis must be d_kv=16"):
        fnlm.decoder_block(dec, torch.zeros(2, 5, D), torch.zeros(2, 4, 8), cfg)
    pre = cfg_for(norm_first=True)
    with pytest.raises(ValueError, match=r"layer_norm input has shape \(5, 8\).*d_model=16"):
        fnlm.encoder_block(enc, torch.zeros(5, 8), pre)


def test_full_model_rejects_bad_token_ids_and_long_sequences():
    cfg = cfg_for(positional="learned", max_len=8)
    params = fnlm.init_transformer(random.key(0), cfg)
    src, tgt = ids((2, 5), SRC_V, 1), ids((2, 4), TGT_V, 2)
    bad = src.clone()
    bad[1, 2] = -3
    with pytest.raises(ValueError, match=r"contain -3, outside the vocabulary \[0, 13\)"):
        fnlm.transformer(params, bad, tgt, cfg)
    bad = tgt.clone()
    bad[0, 0] = TGT_V
    with pytest.raises(ValueError, match=r"contain 11, outside the vocabulary \[0, 11\)"):
        fnlm.transformer(params, src, bad, cfg)
    with pytest.raises(ValueError, match=r"src sequence length 9 is longer than the position table \(8 positions\)"):
        fnlm.transformer(params, ids((2, 9), SRC_V, 3), tgt, cfg)
    with pytest.raises(ValueError, match=r"tgt sequence length 10 is longer than the position table"):
        fnlm.transformer(params, src, ids((2, 10), TGT_V, 3), cfg)
    with pytest.raises(
        ValueError, match=r"key_padding_mask has shape \(2, 4\), expected \[\*batch, len_k\] = \[2, 5\]"
    ):
        fnlm.transformer(params, src, tgt, cfg, src_padding_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("norm_first", [False, True])
def test_sublayer_is_either_residual_order(norm_first):
    """post-LN: LN(x + Dropout(f(x)));  pre-LN: x + Dropout(f(LN(x))); LN and dropout written out."""
    x = randn(2, 5, D, seed=1, dtype=torch.float64)
    norm = {"gamma": randn(D, seed=2, dtype=torch.float64), "beta": randn(D, seed=3, dtype=torch.float64)}
    w = randn(D, D, seed=4, dtype=torch.float64)
    rate, key, eps = 0.25, random.key(7), 1e-5

    def f(h):
        return torch.tanh(h @ w)

    def ln(h):
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return norm["gamma"] * (h - mu) / torch.sqrt(var + eps) + norm["beta"]

    keep = (~random.bernoulli(key, rate, x.shape)).to(x.dtype)  # the mask fnlm.nn.dropout draws from this key

    def drop(h):
        return h * keep / (1 - rate)

    expected = x + drop(f(ln(x))) if norm_first else ln(x + drop(f(x)))
    out = fnlm.nn.sublayer(norm, x, f, norm_first=norm_first, eps=eps, rate=rate, key=key, train=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    no_drop = x + f(ln(x)) if norm_first else ln(x + f(x))
    torch.testing.assert_close(
        fnlm.nn.sublayer(norm, x, f, norm_first=norm_first, eps=eps, rate=rate), no_drop, atol=1e-12, rtol=1e-12
    )
