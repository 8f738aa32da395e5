"""Rematerialisation (fnlm.nn.remat, encoder/bert(remat=)): same loss and gradients as keeping the
activations, under torch.func.grad eagerly and inside the compiled whole step, with dropout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import grad_and_value

import fnlm
from fnlm import optim, random
from fnlm.nn import remat
from fnlm.tree import flatten_names

CFG = fnlm.BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    hidden_dropout_prob=0.2,
    attention_probs_dropout_prob=0.2,
)


def batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    return {
        "input_ids": torch.randint(1, 50, (4, 10), generator=g),
        "attention_mask": mask,
        "labels": torch.tensor([0, 1, 1, 0]),
    }


def loss_with(remat_spec, cfg=CFG):
    def loss_fn(params, b, key):
        return fnlm.classifier_loss(params, b, cfg, key=key, train=True, remat=remat_spec)

    return loss_fn


def test_same_loss_and_grads_as_without_remat_under_grad():
    params = fnlm.init_bert_classifier(random.key(0), CFG)
    b, key = batch(), random.key(7)
    g_ref, (l_ref, _) = grad_and_value(loss_with(None), has_aux=True)(params, b, key)
    ref = flatten_names(g_ref)
    for spec in ("nothing", "matmuls", [None, "nothing", "matmuls"]):
        g, (l, _) = grad_and_value(loss_with(spec), has_aux=True)(params, b, key)
        assert torch.equal(l, l_ref), spec  # same dropout masks: the recomputation uses the same keys
        for n, x in flatten_names(g).items():
            torch.testing.assert_close(x, ref[n], rtol=1e-5, atol=1e-6, msg=f"{spec}: {n}")
    # another key, other masks: remat follows the key, it does not freeze one draw
    _, (l2, _) = grad_and_value(loss_with("nothing"), has_aux=True)(params, b, random.key(8))
    _, (l2_ref, _) = grad_and_value(loss_with(None), has_aux=True)(params, b, random.key(8))
    assert torch.equal(l2, l2_ref) and not torch.equal(l2, l_ref)


def check_compiled_step(backend, cfg, steps):
    params = fnlm.init_bert_classifier(random.key(0), cfg)
    opt = optim.adamw(1e-3)
    eager = fnlm.make_train_step(loss_with(None, cfg), opt, compile=False)
    compiled = fnlm.make_train_step(loss_with("nothing", cfg), opt, compile=backend)
    p_e, s_e, p_c, s_c = params, opt.init(params), params, opt.init(params)
    for i in range(steps):
        p_e, s_e, m_e = eager(p_e, s_e, batch(), random.key(i))
        p_c, s_c, m_c = compiled(p_c, s_c, batch(), random.key(i))
        torch.testing.assert_close(m_c["loss"], m_e["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m_c["grad_norm"], m_e["grad_norm"], rtol=1e-4, atol=1e-6)
    ref = flatten_names(p_e)
    for n, x in flatten_names(p_c).items():
        torch.testing.assert_close(x, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_traced_step_with_remat_equals_eager_step_without():
    """dynamo + AOT autograd trace the remat function's backward inside the whole step."""
    check_compiled_step("aot_eager", dataclasses.replace(CFG, num_hidden_layers=1), steps=1)


@pytest.mark.slow
def test_compiled_step_with_remat_equals_eager_step_without():
    check_compiled_step(True, CFG, steps=2)  # Inductor


def test_remat_of_any_function_and_bad_specs():
    w = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)

    def f(w, x, scale):
        return torch.tanh(x @ w) * scale

    for policy in ("nothing", "matmuls"):
        g = torch.func.grad(lambda w: remat(f, policy)(w, x, scale=2.0).sum())(w)
        torch.testing.assert_close(g, torch.func.grad(lambda w: f(w, x, 2.0).sum())(w))
    assert torch.autograd.gradcheck(lambda w: remat(f)(w, x, 2.0), (w.requires_grad_(),))
    params = fnlm.init_bert_classifier(random.key(0), CFG)
    for spec, pattern in (("all", "remat must be None"), (["nothing"], "must list 3 entries")):
        with pytest.raises(ValueError, match=pattern) as e:
            loss_with(spec)(params, batch(), random.key(0))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="remat policy must be one of"):
        remat(f, "everything")


@pytest.mark.parametrize("model", ["gpt2", "transformer"])
def test_gpt2_and_encoder_decoder_remat_same_loss_and_grads(model):
    """The per-layer switch of the other models: GPT-2's blocks (lm_loss(remat=)) and the
    encoder-decoder Transformer's encoder and decoder blocks (transformer(remat=)), with dropout."""
    g = torch.Generator().manual_seed(1)
    if model == "gpt2":
        cfg = fnlm.GPT2Config(
            vocab_size=40,
            n_positions=16,
            n_embd=16,
            n_layer=3,
            n_head=2,
            resid_pdrop=0.2,
            embd_pdrop=0.2,
            attn_pdrop=0.2,
        )
        params = fnlm.models.init_gpt2(random.key(0), cfg)
        ids = torch.randint(0, 40, (3, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0

        def loss(p, key, spec):
            return fnlm.models.lm_loss(p, ids, cfg, attention_mask=mask, key=key, train=True, remat=spec)
    else:
        cfg = fnlm.TransformerConfig(
            d_model=16, n_heads=2, d_ff=32, n_layers=2, src_vocab_size=30, tgt_vocab_size=30, max_len=16, dropout=0.2
        )
        params = fnlm.init_transformer(random.key(0), cfg)
        src, tgt = torch.randint(0, 30, (3, 10), generator=g), torch.randint(0, 30, (3, 8), generator=g)

        def loss(p, key, spec):
            logits = fnlm.transformer(p, src, tgt[:, :-1], cfg, key=key, train=True, remat=spec)
            return fnlm.cross_entropy(logits, tgt[:, 1:])

    key = random.key(3)
    g_ref, l_ref = grad_and_value(loss)(params, key, None)
    ref = flatten_names(g_ref)
    n_layers = 3 if model == "gpt2" else 2
    for spec in ("nothing", "matmuls", ["nothing"] + [None] * (n_layers - 1)):
        g_r, l_r = grad_and_value(loss)(params, key, spec)
        assert torch.equal(l_r, l_ref), spec
        for n, x in flatten_names(g_r).items():
            torch.testing.assert_close(x, ref[n], rtol=1e-5, atol=1e-6, msg=f"{spec}: {n}")
    assert not torch.equal(grad_and_value(loss)(params, random.key(4), "nothing")[1], l_ref)  # keys are followed
