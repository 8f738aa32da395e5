"""Intermediates, the pure way: hidden states after the embeddings and every layer, and every
layer's attention probabilities, returned as an extra output (``output_hidden_states`` /
``output_attentions``), against transformers' ``BertModel`` on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
import torch

from fnlm import random
from fnlm.models import bert, load_bert
from fnlm.nn import TransformerConfig, attention_reference, encoder, encoder_block, init_encoder, multi_head_attention

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SENTENCES = [
    "The cat sat on the mat.",
    "A completely different sentence, which is quite a bit longer than the first one, with commas.",
    "Short.",
    "Functional transformers: params are data, layers are pure functions.",
]


@pytest.fixture(scope="module")
def minilm_both(minilm_dir):
    params, cfg = load_bert(minilm_dir)
    tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    hf = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc, output_hidden_states=True, output_attentions=True)
        out = bert(
            params,
            enc["input_ids"],
            cfg,
            attention_mask=enc["attention_mask"],
            token_type_ids=enc["token_type_ids"],
            output_hidden_states=True,
            output_attentions=True,
        )
        plain = bert(
            params, enc["input_ids"], cfg, attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"]
        )
    return cfg, enc, ref, out, plain


def test_hidden_states_and_attentions_match_hf_with_padding(minilm_both):
    cfg, enc, ref, (h, pooled, inter), _ = minilm_both
    real = enc["attention_mask"].bool()
    assert (~real).any()  # the batch is padded
    hs, att = inter["hidden_states"], inter["attentions"]
    assert len(hs) == cfg.num_hidden_layers + 1 == len(ref.hidden_states)
    assert len(att) == cfg.num_hidden_layers == len(ref.attentions)
    for i, (a, b) in enumerate(zip(hs, ref.hidden_states)):
        assert a.shape == b.shape
        assert (a - b)[real].abs().max() <= 1e-5, f"hidden state {i}"
        # padded query rows: same maths, worse conditioned in float32 (see test_bert.test_minilm_matches_hf)
        assert (a - b).abs().max() <= 3e-4, f"hidden state {i} (padding rows)"
    for i, (a, b) in enumerate(zip(att, ref.attentions)):
        assert a.shape == b.shape == (len(SENTENCES), cfg.num_attention_heads, real.shape[1], real.shape[1])
        assert (a - b).abs().max() <= 1e-5, f"attention {i}"
        assert (a.masked_select(~real[:, None, None, :]) == 0).all()  # padded keys get no attention
    assert torch.equal(hs[-1], h)
    assert (h - ref.last_hidden_state)[real].abs().max() <= 1e-5


def test_asking_does_not_change_the_main_output(minilm_both):
    _, enc, _, (h, pooled, _), (h0, pooled0) = minilm_both
    real = enc["attention_mask"].bool()
    # the reference formula (probabilities asked) vs the fused kernel (default): float rounding only
    assert (h - h0)[real].abs().max() <= 1e-5 and (h - h0).abs().max() <= 1e-4
    assert (pooled - pooled0).abs().max() <= 1e-5


def test_only_what_is_asked_for(minilm_dir):
    params, cfg = load_bert(minilm_dir)
    ids = torch.tensor([[101, 2023, 2003, 102]])
    out = bert(params, ids, cfg)
    assert len(out) == 2
    _, _, inter = bert(params, ids, cfg, output_hidden_states=True)
    assert set(inter) == {"hidden_states"}
    _, _, inter = bert(params, ids, cfg, output_attentions=True)
    assert set(inter) == {"attentions"}
    with pytest.raises(ValueError, match="pooled_only"):
        bert(params, ids, cfg, pooled_only=True, output_hidden_states=True)


def test_encoder_intermediates_are_the_blocks_own_outputs():
    """Pre-LN stack with a final LayerNorm: x_i = block_i(x_{i-1}); P_i is the probability matrix
    of block i's attention (reference formula on its own projections); output = LN(x_N)."""
    cfg = TransformerConfig(
        d_model=16, n_heads=2, d_ff=32, n_layers=3, dropout=0.0, attention_dropout=0.0, norm_first=True, final_norm=True
    )
    params = init_encoder(random.key(0), cfg)
    x = random.normal(random.key(1), (2, 5, 16))
    kpm = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    y, inter = encoder(params, x, cfg, key_padding_mask=kpm, output_hidden_states=True, output_attentions=True)
    assert torch.allclose(y, encoder(params, x, cfg, key_padding_mask=kpm), atol=1e-5)
    hs, att = inter["hidden_states"], inter["attentions"]
    assert len(hs) == 4 and len(att) == 3 and torch.equal(hs[0], x)
    for i, layer in enumerate(params["layers"]):
        assert torch.allclose(hs[i + 1], encoder_block(layer, hs[i], cfg, key_padding_mask=kpm), atol=1e-5)
        _, p = multi_head_attention(
            layer["attn"],
            torch.nn.functional.layer_norm(
                hs[i], (16,), layer["norm1"]["gamma"], layer["norm1"]["beta"], cfg.layer_norm_eps
            ),
            key_padding_mask=kpm,
            return_probs=True,
        )
        assert torch.equal(att[i], p)
        assert torch.allclose(att[i].sum(-1), torch.ones(2, 2, 5))
        assert (att[i][1, :, :, 3:] == 0).all()  # padded keys get no attention


def test_attention_probs_are_the_ones_that_made_the_output():
    q, k, v = (random.normal(random.key(i), (2, 3, 4, 8)) for i in range(3))
    out, p = attention_reference(q, k, v, dropout=0.5, key=random.key(7), train=True, return_probs=True)
    assert torch.allclose(out, p @ v, atol=1e-6)  # post-dropout probabilities, as HF's output_attentions
    assert torch.equal(out, attention_reference(q, k, v, dropout=0.5, key=random.key(7), train=True))
