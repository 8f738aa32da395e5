"""Attention: parity with torch.nn.MultiheadAttention, the two implementations agree, gradients,
vmap, and clear errors for bad masks and inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from _torch_ref import load, mha_sd, nn_mask, perturb
from torch import nn
from torch.func import vmap

import fnlm
from fnlm import random

D, H = 16, 4
ATOL = 1e-5


def mha_params(seed=0, d_model=D, n_heads=H, d_kv=None):
    """Attention params with every leaf random (zero biases would hide bias-mapping mistakes)."""
    p = fnlm.init_multi_head_attention(random.key(seed), d_model, n_heads, d_kv=d_kv)
    return perturb(p, random.key(seed + 100))


def ref_mha(p, d_model=D, n_heads=H, d_kv=None):
    kw = {} if d_kv is None else {"kdim": d_kv, "vdim": d_kv}
    m = nn.MultiheadAttention(d_model, n_heads, batch_first=True, **kw)
    return load(m, {k.removeprefix("m."): v for k, v in mha_sd(p, "m").items()})


def padding(batch, length, lengths):
    """``[batch, length]`` bool, True for the first ``lengths[b]`` positions (real tokens)."""
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- parity with nn.MHA
@pytest.mark.parametrize("kind", ["self", "cross", "causal", "key_padding", "causal+key_padding", "mask"])
def test_multi_head_attention_matches_nn_multihead_attention(kind):
    p = mha_params()
    ref = ref_mha(p)
    B, Lq = 3, 5
    Lk = 7 if kind == "cross" else Lq
    x = randn(B, Lq, D, seed=1)
    kv = randn(B, Lk, D, seed=2) if kind == "cross" else x
    kpm = padding(B, Lk, [Lk, 3, 1]) if "key_padding" in kind else None
    mask = None
    if "causal" in kind:
        mask = fnlm.causal_mask(Lq)
    if kind == "mask":  # an arbitrary [len_q, len_k] pattern, each row keeps its diagonal
        mask = (randn(Lq, Lk, seed=3) > 0) | torch.eye(Lq, Lk, dtype=torch.bool)

    got = fnlm.multi_head_attention(p, x, None if kind != "cross" else kv, mask=mask, key_padding_mask=kpm)
    if "causal" in kind:  # the causal= flag is the same mask
        got_flag = fnlm.multi_head_attention(p, x, causal=True, key_padding_mask=kpm)
        torch.testing.assert_close(got_flag, got, atol=ATOL, rtol=0)
    with torch.no_grad():
        want, _ = ref(x, kv, kv, key_padding_mask=nn_mask(kpm), attn_mask=nn_mask(mask), need_weights=False)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_cross_attention_from_memory_of_another_width_matches_nn_kdim_vdim():
    p = mha_params(d_kv=6)
    ref = ref_mha(p, d_kv=6)
    x, mem = randn(2, 4, D, seed=1), randn(2, 9, 6, seed=2)
    kpm = padding(2, 9, [9, 5])
    got = fnlm.multi_head_attention(p, x, mem, key_padding_mask=kpm)
    with torch.no_grad():
        want, _ = ref(x, mem, mem, key_padding_mask=~kpm, need_weights=False)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_unbatched_multi_head_attention_matches_nn():
    p = mha_params()
    ref = ref_mha(p)
    x = randn(5, D, seed=4)
    got = fnlm.multi_head_attention(p, x, causal=True)
    with torch.no_grad():
        want, _ = ref(x, x, x, attn_mask=~fnlm.causal_mask(5), need_weights=False)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_heads_are_independent_attentions_concatenated():
    """MultiHead = Concat(head_1..head_h) W^O with head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V),
    computed here head by head with plain matrix products."""
    p = mha_params()
    x = randn(2, 5, D, seed=5)
    heads = []
    for i in range(H):
        q = x @ p["q"]["weight"][:, i] + p["q"]["bias"][i]
        k = x @ p["k"]["weight"][:, i] + p["k"]["bias"][i]
        v = x @ p["v"]["weight"][:, i] + p["v"]["bias"][i]
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, dim=-1)
        heads.append(a @ v)
    want = torch.cat(heads, -1) @ p["o"]["weight"].reshape(D, D) + p["o"]["bias"]
    torch.testing.assert_close(fnlm.multi_head_attention(p, x), want, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- sdpa == reference
def _masks(B, Lq, Lk):
    """Every mask kind fnlm accepts, each leaving at least one key per query row."""
    diag = torch.eye(Lq, Lk, dtype=torch.bool)
    rand4 = (randn(B, H, Lq, Lk, seed=7) > 0) | diag
    return {
        "none": None,
        "2d": (randn(Lq, Lk, seed=8) > 0) | diag,
        "padding[b,1,1,k]": fnlm.padding_mask(padding(B, Lk, [Lk, 2, 4][:B])),
        "per-head[b,h,q,k]": rand4,
        "per-head[h,q,k]": rand4[0],
        "per-query[b,1,q,k]": rand4[:, :1],
    }


@pytest.mark.parametrize(
    "mask_kind", ["none", "2d", "padding[b,1,1,k]", "per-head[b,h,q,k]", "per-head[h,q,k]", "per-query[b,1,q,k]"]
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_sdpa_and_reference_paths_agree(mask_kind, bias, causal, cross):
    B, Lq = 3, 5
    Lk = 7 if cross else Lq
    q, k, v = randn(B, H, Lq, 8, seed=1), randn(B, H, Lk, 8, seed=2), randn(B, H, Lk, 8, seed=3)
    mask = _masks(B, Lq, Lk)[mask_kind]
    if causal and mask is not None:
        mask = mask.clone()
        mask[..., 0] = True  # a causal row 0 keeps only key 0: keep it attendable
    b = randn(H, Lq, Lk, seed=4) if bias else None
    kw = dict(mask=mask, bias=b, is_causal=causal)
    fast = fnlm.scaled_dot_product_attention(q, k, v, impl="sdpa", **kw)
    ref = fnlm.scaled_dot_product_attention(q, k, v, impl="reference", **kw)
    assert not ref.isnan().any()
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    # and attention_reference is the formula softmax(QK^T/sqrt(d) + B + M) V written out here
    scores = q @ k.transpose(-1, -2) / 8**0.5 + (0 if b is None else b)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool) if mask is None else mask
    if causal:
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool).tril()
    want = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(ref, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_multi_head_attention_impls_agree_with_every_option(cross, batched):
    p = mha_params()
    batch = (2,) if batched else ()
    Lq, Lk = 4, (6 if cross else 4)
    x = randn(*batch, Lq, D, seed=1)
    kv = randn(*batch, Lk, D, seed=2) if cross else None
    kpm = torch.ones(*batch, Lk, dtype=torch.bool)
    kpm[..., -1] = False
    mask = randn(Lq, Lk, seed=3) > 0
    mask[:, 0] = True
    bias = randn(H, Lq, Lk, seed=4)
    for causal, use_mask, use_kpm, use_bias in itertools.product([False, True], repeat=4):
        kw = dict(
            causal=causal,
            mask=mask if use_mask else None,
            key_padding_mask=kpm if use_kpm else None,
            bias=bias if use_bias else None,
        )
        a = fnlm.multi_head_attention(p, x, kv, impl="sdpa", **kw)
        b = fnlm.multi_head_attention(p, x, kv, impl="reference", **kw)
        c = fnlm.multi_head_attention(p, x, kv, **kw)  # impl="auto"
        assert a.shape == (*batch, Lq, D)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=str(kw.keys()))
        torch.testing.assert_close(c, b, atol=ATOL, rtol=0)


def test_key_padding_and_equivalent_mask_give_the_same_result():
    p = mha_params()
    x = randn(2, 5, D, seed=1)
    kpm = padding(2, 5, [5, 3])
    a = fnlm.multi_head_attention(p, x, key_padding_mask=kpm)
    b = fnlm.multi_head_attention(p, x, mask=kpm[:, None, None, :])
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_query_with_no_visible_key_gets_zero_output_and_finite_gradients():
    """A fully masked row: both paths give 0 (softmax over nothing), and no NaN leaks into grads."""
    q = randn(1, 2, 3, 4, seed=1).requires_grad_()
    k, v = randn(1, 2, 5, 4, seed=2), randn(1, 2, 5, 4, seed=3)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    ref = fnlm.scaled_dot_product_attention(q, k, v, mask, impl="reference")
    fast = fnlm.scaled_dot_product_attention(q, k, v, mask, impl="sdpa")
    torch.testing.assert_close(ref, fast, atol=ATOL, rtol=0)
    assert torch.equal(ref[..., 1, :], torch.zeros_like(ref[..., 1, :]))
    full = fnlm.scaled_dot_product_attention(q, k, v, None, impl="reference")
    torch.testing.assert_close(ref[..., [0, 2], :], full[..., [0, 2], :], atol=ATOL, rtol=0)
    (grad,) = torch.autograd.grad(ref.square().sum(), q)
    assert torch.isfinite(grad).all() and torch.equal(grad[..., 1, :], torch.zeros_like(grad[..., 1, :]))


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_scaled_dot_product_attention(impl, causal):
    q = randn(2, 2, 3, 4, seed=1, dtype=torch.float64).requires_grad_()
    k = randn(2, 2, 5, 4, seed=2, dtype=torch.float64).requires_grad_()
    v = randn(2, 2, 5, 3, seed=3, dtype=torch.float64).requires_grad_()
    bias = randn(2, 3, 5, seed=4, dtype=torch.float64).requires_grad_()
    mask = padding(2, 5, [5, 4])[:, None, None, :]

    def f(q, k, v, bias):
        return fnlm.scaled_dot_product_attention(q, k, v, mask, bias, is_causal=causal, impl=impl)

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_func_grad_equals_autograd_grad_for_attention():
    p = mha_params()
    x = randn(2, 5, D, seed=1)
    kpm = padding(2, 5, [5, 3])

    def loss(p, x):
        return fnlm.multi_head_attention(p, x, key_padding_mask=kpm, causal=True).square().mean()

    g_func = torch.func.grad(loss, argnums=(0, 1))(p, x)
    leaves, spec = fnlm.tree.tree_flatten(p)
    leaves = [t.clone().requires_grad_() for t in leaves]
    xr = x.clone().requires_grad_()
    g_auto = torch.autograd.grad(loss(fnlm.tree.tree_unflatten(leaves, spec), xr), [*leaves, xr])
    for a, b in zip(fnlm.tree.tree_leaves(g_func), g_auto):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- vmap
def test_vmap_over_examples_equals_batched_call():
    p = mha_params()
    x, mem = randn(4, 5, D, seed=1), randn(4, 6, D, seed=2)
    kpm = padding(4, 6, [6, 1, 3, 5])
    batched = fnlm.multi_head_attention(p, x, mem, key_padding_mask=kpm)
    per_example = vmap(lambda x, m, k: fnlm.multi_head_attention(p, x, m, key_padding_mask=k))(x, mem, kpm)
    torch.testing.assert_close(per_example, batched, atol=ATOL, rtol=0)
    self_b = fnlm.multi_head_attention(p, x, key_padding_mask=kpm[:, :5], causal=True)
    self_v = vmap(lambda x, k: fnlm.multi_head_attention(p, x, key_padding_mask=k, causal=True))(x, kpm[:, :5])
    torch.testing.assert_close(self_v, self_b, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- masks and dropout
def test_causal_and_padding_mask_helpers():
    m = fnlm.causal_mask(3, 4)
    assert m.dtype == torch.bool and m.shape == (3, 4)
    assert m.tolist() == [[j <= i for j in range(4)] for i in range(3)]
    pm = fnlm.padding_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert pm.shape == (2, 1, 1, 3) and pm.dtype == torch.bool
    assert pm[:, 0, 0].tolist() == [[True, True, False], [True, False, False]]


def test_attention_dropout_is_keyed_and_off_in_eval():
    p = mha_params()
    x = randn(2, 5, D, seed=1)
    eval_out = fnlm.multi_head_attention(p, x, dropout=0.5)
    torch.testing.assert_close(eval_out, fnlm.multi_head_attention(p, x), atol=0, rtol=0)
    a = fnlm.multi_head_attention(p, x, dropout=0.5, key=random.key(1), train=True)
    b = fnlm.multi_head_attention(p, x, dropout=0.5, key=random.key(1), train=True)
    c = fnlm.multi_head_attention(p, x, dropout=0.5, key=random.key(2), train=True)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="needs a random key"):
        fnlm.multi_head_attention(p, x, dropout=0.5, train=True)


# ----------------------------------------------------------------------------- bad input
def test_fused_dropout_of_impl_sdpa_draws_from_the_global_generator():
    """impl='sdpa' keeps the fused kernel under attention dropout: reproducible per global seed,
    inverted dropout (its mean over masks is the dropout-free output), off when not training."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([True, True, True, False, False]).expand(5, 5)

    def fused(seed, train=True):
        torch.manual_seed(seed)
        return fnlm.scaled_dot_product_attention(q, k, v, mask, dropout=0.3, train=train, impl="sdpa")

    plain = fnlm.scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(fused(1), fused(1)) and not torch.equal(fused(1), fused(2))
    assert not torch.allclose(fused(1), plain) and torch.equal(fused(1, train=False), plain)
    mean = torch.stack([fused(s) for s in range(2000)]).mean(0)
    assert (mean - plain).abs().max() < 0.1 < (fused(1) - plain).abs().max()


def test_mismatched_d_model_is_named():
    p = mha_params()
    with pytest.raises(ValueError, match=r"x_q has shape \(2, 5, 12\).*d_model=16"):
        fnlm.multi_head_attention(p, torch.zeros(2, 5, 12))
    with pytest.raises(ValueError, match=r"x_kv has shape \(2, 5, 12\).*d_kv=16"):
        fnlm.multi_head_attention(p, torch.zeros(2, 5, D), torch.zeros(2, 5, 12))
    with pytest.raises(ValueError, match="different batch axes"):
        fnlm.multi_head_attention(p, torch.zeros(2, 5, D), torch.zeros(3, 5, D))


def test_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=3"):
        fnlm.init_multi_head_attention(random.key(0), 10, 3)


def test_mask_of_wrong_shape():
    p = mha_params()
    x = torch.zeros(2, 5, D)
    with pytest.raises(ValueError, match=r"mask of shape \(5, 4\) does not broadcast"):
        fnlm.multi_head_attention(p, x, mask=torch.ones(5, 4, dtype=torch.bool))
    # also when combined with a key padding mask (the mask is checked before it is combined)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5, 5\) does not broadcast"):
        fnlm.multi_head_attention(
            p, x, mask=torch.ones(3, 5, 5, dtype=torch.bool), key_padding_mask=torch.ones(2, 5, dtype=torch.bool)
        )
    q = torch.zeros(2, 2, 5, 4)
    with pytest.raises(ValueError, match=r"mask of shape \(5, 6\) does not broadcast"):
        fnlm.scaled_dot_product_attention(q, q, q, torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bias of shape \(3, 5, 5\) does not broadcast"):
        fnlm.scaled_dot_product_attention(q, q, q, bias=torch.zeros(3, 5, 5))


def test_non_bool_mask_is_a_type_error():
    p = mha_params()
    x = torch.zeros(2, 5, D)
    for kpm in (None, torch.ones(2, 5, dtype=torch.bool)):
        with pytest.raises(TypeError, match="mask must be a boolean.*float32"):
            fnlm.multi_head_attention(p, x, mask=torch.ones(5, 5), key_padding_mask=kpm)
    q = torch.zeros(2, 2, 5, 4)
    with pytest.raises(TypeError, match="mask must be boolean.*int64"):
        fnlm.scaled_dot_product_attention(q, q, q, torch.ones(5, 5, dtype=torch.long))


def test_key_padding_mask_of_wrong_shape():
    p = mha_params()
    with pytest.raises(
        ValueError, match=r"key_padding_mask has shape \(2, 4\), expected \[\*batch, len_k\] = \[2, 5\]"
    ):
        fnlm.multi_head_attention(p, torch.zeros(2, 5, D), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(5,\)"):
        fnlm.multi_head_attention(p, torch.zeros(2, 5, D), key_padding_mask=torch.ones(5, dtype=torch.bool))


def test_qkv_shape_mismatch_and_bad_impl():
    q = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="q and k must share d_k"):
        fnlm.scaled_dot_product_attention(q, torch.zeros(2, 5, 3), q)
    with pytest.raises(ValueError, match="k and v must share len_k"):
        fnlm.scaled_dot_product_attention(q, q, torch.zeros(2, 6, 4))
    with pytest.raises(ValueError, match="impl must be"):
        fnlm.scaled_dot_product_attention(q, q, q, impl="flash")


def test_attention_reference_is_the_literal_formula():
    """eq. 1 with bias and mask, written out element by element in float64:
    out[i] = sum_j softmax_j(q_i . k_j / sqrt(d_k) + B_ij + M_ij) v_j."""
    n_q, n_k, d_k, d_v = 3, 4, 5, 2
    q, k, v = (
        randn(n_q, d_k, seed=1, dtype=torch.float64),
        randn(n_k, d_k, seed=2, dtype=torch.float64),
        randn(n_k, d_v, seed=3, dtype=torch.float64),
    )
    bias = randn(n_q, n_k, seed=4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.zeros(n_q, d_v, dtype=torch.float64)
    for i in range(n_q):
        logits = [float(q[i] @ k[j]) / d_k**0.5 + float(bias[i, j]) for j in range(n_k) if mask[i, j]]
        js = [j for j in range(n_k) if mask[i, j]]
        z = sum(pow(2.718281828459045, x) for x in logits)
        for x, j in zip(logits, js):
            expected[i] += pow(2.718281828459045, x) / z * v[j]
    out = fnlm.attention_reference(q, k, v, mask, bias)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fnlm.scaled_dot_product_attention(q, k, v, mask, bias), expected, atol=1e-12, rtol=1e-12)
