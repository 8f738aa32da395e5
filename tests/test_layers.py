"""Single layers: linear, embedding, positional encodings, layer norm, dropout, feed-forward, losses.
Each is checked against an independent implementation (torch.nn, Hugging Face, the formula in
plain Python) or a property."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _torch_ref import linear_sd, load, perturb
from torch import nn

import fnlm
from fnlm import random

ATOL = 1e-5


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- linear / FFN
def test_linear_matches_nn_linear():
    p = perturb(fnlm.init_linear(random.key(0), 6, 4), random.key(1))
    ref = load(nn.Linear(6, 4), {k.removeprefix("m."): v for k, v in linear_sd(p, "m").items()})
    x = randn(3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(fnlm.linear(p, x), ref(x), atol=ATOL, rtol=0)
    assert "bias" not in fnlm.init_linear(random.key(0), 6, 4, bias=False)


def test_linear_init_is_xavier_uniform_or_normal():
    d_in, d_out = 200, 300
    w = fnlm.init_linear(random.key(0), d_in, d_out)["weight"]
    a = math.sqrt(6 / (d_in + d_out))
    assert w.shape == (d_in, d_out) and w.abs().max() <= a
    assert abs(w.std().item() - a / math.sqrt(3)) < 0.01 * a  # std of U(-a, a)
    w = fnlm.init_linear(random.key(0), d_in, d_out, std=0.02)["weight"]
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_feed_forward_is_act_xw1_b1_w2_b2(activation):
    p = perturb(fnlm.init_feed_forward(random.key(0), 8, 32), random.key(1))
    x = randn(2, 3, 8)
    h = x @ p["w1"]["weight"] + p["w1"]["bias"]
    h = {
        "relu": torch.clamp(h, min=0),  # max(0, x W1 + b1)
        "gelu": 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
        "gelu_tanh": 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    }[activation]
    want = h @ p["w2"]["weight"] + p["w2"]["bias"]
    torch.testing.assert_close(fnlm.feed_forward(p, x, activation), want, atol=ATOL, rtol=0)


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        fnlm.get_activation("swishy")
    with pytest.raises(ValueError, match="unknown activation"):
        fnlm.TransformerConfig(activation="swishy")


# ----------------------------------------------------------------------------- embedding
def test_embedding_is_a_row_lookup_and_checks_ids():
    p = fnlm.init_embedding(random.key(0), 11, 8)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    out = fnlm.embedding(p, ids)
    assert out.shape == (2, 3, 8)
    for b in range(2):
        for t in range(3):
            assert torch.equal(out[b, t], p["weight"][ids[b, t]])
    big = fnlm.init_embedding(random.key(1), 1000, 16)["weight"]
    assert abs(big.std().item() - 16**-0.5) < 0.02 * 16**-0.5  # default std d_model^-1/2
    with pytest.raises(ValueError, match=r"contain -1, outside the vocabulary \[0, 11\)"):
        fnlm.embedding(p, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match=r"contain 11, outside the vocabulary \[0, 11\)"):
        fnlm.embedding(p, torch.tensor([[0, 11]]))
    with pytest.raises(TypeError, match="must be an integer tensor, got torch.float32"):
        fnlm.embedding(p, torch.tensor([0.0, 1.0]))


def test_embedding_gradient_is_bitwise_reproducible_on_a_multithreaded_cpu():
    """Repeated ids: the gradient rows are sums, and they must come out the same every time (so that
    the same seed gives the same training run); indexing's backward would sum with atomics."""
    p = fnlm.init_embedding(random.key(0), 3000, 384)
    ids = torch.randint(0, 50, (16, 256), generator=torch.Generator().manual_seed(0))
    g = torch.randn(16, 256, 384, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        grads = [torch.func.grad(lambda q: (fnlm.embedding(q, ids) * g).sum())(p)["weight"] for _ in range(10)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], x) for x in grads[1:])
    want = torch.zeros(3000, 384, dtype=torch.float64).index_add_(0, ids.reshape(-1), g.reshape(-1, 384).double())
    torch.testing.assert_close(grads[0], want.float(), atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- positional
@pytest.mark.parametrize("n,d", [(7, 8), (50, 16), (3, 2)])
def test_sinusoidal_table_matches_the_formula(n, d):
    pe = fnlm.sinusoidal_table(n, d, dtype=torch.float64)
    assert pe.shape == (n, d)
    for pos in range(n):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)


def test_sinusoidal_encoding_adds_the_table_with_offset():
    x = randn(2, 5, 8)
    pe = fnlm.sinusoidal_table(9, 8)
    torch.testing.assert_close(fnlm.sinusoidal_encoding(x), x + pe[:5], atol=1e-6, rtol=0)
    torch.testing.assert_close(fnlm.sinusoidal_encoding(x, offset=4), x + pe[4:9], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="even d_model, got 7"):
        fnlm.sinusoidal_table(4, 7)


def test_learned_positional_adds_rows_and_rejects_long_sequences():
    p = fnlm.init_learned_positional(random.key(0), 6, 4)
    x = randn(2, 3, 4)
    torch.testing.assert_close(fnlm.learned_positional(p, x), x + p["weight"][:3], atol=0, rtol=0)
    torch.testing.assert_close(fnlm.learned_positional(p, x, offset=3), x + p["weight"][3:6], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"sequence length 7 is longer than the position table \(6 positions\)"):
        fnlm.learned_positional(p, randn(1, 7, 4))
    with pytest.raises(ValueError, match="length 7 is longer than the position table"):
        fnlm.learned_positional(p, x, offset=4)
    with pytest.raises(ValueError, match=r"last axis must be d_model=4"):
        fnlm.learned_positional(p, randn(1, 3, 5))


def test_gradcheck_positional_params():
    p = {"weight": randn(6, 4, dtype=torch.float64).requires_grad_()}
    x = randn(2, 5, 4, seed=1, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, x: fnlm.learned_positional({"weight": w}, x, offset=1), (p["weight"], x))
    b = randn(32, 3, seed=2, dtype=torch.float64).requires_grad_()
    for bidirectional in (True, False):
        assert torch.autograd.gradcheck(
            lambda b: fnlm.relative_bias({"weight": b}, 5, 7, bidirectional=bidirectional, max_distance=8), (b,)
        )
    # through attention: the bias enters the logits
    q = randn(1, 3, 5, 4, seed=3, dtype=torch.float64)
    k = randn(1, 3, 7, 4, seed=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda b: fnlm.scaled_dot_product_attention(q, k, k, bias=fnlm.relative_bias({"weight": b}, 5, 7)), (b,)
    )


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("n_buckets,max_distance", [(32, 128), (16, 32), (8, 20)])
def test_relative_position_bucket_matches_hf_t5(bidirectional, n_buckets, max_distance):
    T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
    r = torch.arange(-400, 401)[None, :] + torch.zeros(2, 1, dtype=torch.long)  # a 2-D grid of r = j - i
    want = T5Attention._relative_position_bucket(
        r, bidirectional=bidirectional, num_buckets=n_buckets, max_distance=max_distance
    )
    got = fnlm.relative_position_bucket(r, bidirectional=bidirectional, n_buckets=n_buckets, max_distance=max_distance)
    assert torch.equal(got, want)
    assert got.min() >= 0 and got.max() == n_buckets - 1


def test_relative_bias_is_the_bucket_lookup():
    p = fnlm.init_relative_bias(random.key(0), n_heads=3, n_buckets=16)
    B = fnlm.relative_bias(p, 4, 6, max_distance=32)
    assert B.shape == (3, 4, 6)
    for i in range(4):
        for j in range(6):
            bucket = fnlm.relative_position_bucket(torch.tensor(j - i), n_buckets=16, max_distance=32)
            assert torch.equal(B[:, i, j], p["weight"][bucket])


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_bias_is_invariant_to_shifting_all_positions(bidirectional):
    p = perturb(fnlm.init_relative_bias(random.key(0), n_heads=4), random.key(1), std=1.0)
    mha = fnlm.init_multi_head_attention(random.key(2), 16, 4)
    x = randn(2, 6, 16)
    eye = torch.eye(6).expand(2, 4, 6, 6)
    q = k = randn(2, 4, 6, 4, seed=3)

    def run(shift):
        bias = fnlm.relative_bias(p, 6, 6, bidirectional=bidirectional, offset_q=shift, offset_k=shift)
        # attention with V = I returns the attention probabilities themselves
        pattern = fnlm.attention_reference(q, k, eye, bias=bias)
        return bias, pattern, fnlm.multi_head_attention(mha, x, bias=bias)

    b0, a0, y0 = run(0)
    assert b0.std() > 0.5  # the bias is not trivially constant
    for shift in (1, 17, 300):
        b, a, y = run(shift)
        assert torch.equal(b, b0) and torch.equal(a, a0) and torch.equal(y, y0)
    # a relative shift (queries only) does change the pattern
    b_moved = fnlm.relative_bias(p, 6, 6, bidirectional=bidirectional, offset_q=2)
    assert not torch.equal(b_moved, b0)


# ----------------------------------------------------------------------------- layer norm
def test_layer_norm_matches_reference_and_nn():
    p = perturb(fnlm.init_layer_norm(12), random.key(0))
    x = randn(3, 4, 12) * 5 + 2
    for eps in (1e-5, 1e-12, 0.1):
        y = fnlm.layer_norm(p, x, eps)
        torch.testing.assert_close(y, fnlm.layer_norm_reference(p, x, eps), atol=1e-5, rtol=0)
        ref = load(nn.LayerNorm(12, eps=eps), {"weight": p["gamma"], "bias": p["beta"]})
        with torch.no_grad():
            torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=0)
    # with gamma = 1, beta = 0: zero mean and unit (biased) variance per row
    y = fnlm.layer_norm(fnlm.init_layer_norm(12, dtype=torch.float64), x.double(), 0.0)
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(3, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(
        ValueError, match=r"layer_norm input has shape \(3, 4, 12\), but its last axis must be d_model=8"
    ):
        fnlm.layer_norm(fnlm.init_layer_norm(8), x)


# ----------------------------------------------------------------------------- dropout
def test_dropout_is_identity_in_eval_and_with_rate_zero():
    x = randn(100)
    assert fnlm.dropout(x, 0.5) is x
    assert fnlm.dropout(x, 0.5, key=random.key(0), train=False) is x
    assert torch.equal(fnlm.dropout(x, 0.0, key=random.key(0), train=True), x)


def test_dropout_is_a_pure_function_of_the_key():
    x = torch.ones(64, 64)
    a = fnlm.dropout(x, 0.3, key=random.key(1), train=True)
    b = fnlm.dropout(x, 0.3, key=random.key(1), train=True)
    c = fnlm.dropout(x, 0.3, key=random.key(2), train=True)
    assert torch.equal(a, b)
    assert not torch.equal(a == 0, c == 0)
    assert ((a == 0) != (c == 0)).float().mean() > 0.3  # different keys: largely different masks


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction_and_scaling(rate):
    x = randn(200_000).abs() + 0.5  # no zeros in the input
    y = fnlm.dropout(x, rate, key=random.key(3), train=True)
    kept = y != 0
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / n)
    torch.testing.assert_close(y[kept], x[kept] / (1 - rate), atol=0, rtol=1e-6)
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.02  # unbiased in expectation


def test_dropout_errors():
    with pytest.raises(ValueError, match="needs a random key"):
        fnlm.dropout(torch.ones(3), 0.1, train=True)
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        fnlm.dropout(torch.ones(3), 1.0)


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(smoothing):
    logits = randn(4, 5, 7) * 3
    labels = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(1))
    labels[0, :2] = -100
    want = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100, label_smoothing=smoothing)
    torch.testing.assert_close(
        fnlm.cross_entropy(logits, labels, label_smoothing=smoothing), want, atol=1e-6, rtol=1e-6
    )
    # weights: a weighted mean of per-example losses
    w = torch.rand(4, 5, generator=torch.Generator().manual_seed(2))
    per = F.cross_entropy(
        logits.reshape(-1, 7), labels.reshape(-1), reduction="none", label_smoothing=smoothing
    ).reshape(4, 5)
    valid = (labels != -100).float()
    torch.testing.assert_close(
        fnlm.cross_entropy(logits, labels, weight=w, label_smoothing=smoothing),
        (per * w * valid).sum() / (w * valid).sum(),
        atol=1e-6,
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="disagree"):
        fnlm.cross_entropy(logits, labels[:, :3])


def test_accuracy():
    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([1, 1, 1, -100])
    assert fnlm.accuracy(logits, labels).item() == pytest.approx(2 / 3)
