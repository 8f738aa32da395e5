"""Pooling and sentence embeddings: ``sentence_embedding`` equals sentence-transformers'
all-MiniLM-L6-v2 ``encode(..., normalize_embeddings=True)``; cls / mean / max over real tokens;
concatenation or mean of the last k layers."""

from __future__ import annotations

import pytest
import torch

from fnlm import random
from fnlm.data import load_tokenizer
from fnlm.models import bert, combine_layers, load_bert, pool, sentence_embedding

SENTENCES = [
    "The cat sat on the mat.",
    "A completely different sentence, which is quite a bit longer than the first one, with commas.",
    "Short.",
    "Functional transformers: params are data, layers are pure functions.",
    "I loved this movie; the acting was superb and the ending made me cry.",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    params, cfg = load_bert(minilm_dir)
    return params, cfg, load_tokenizer(minilm_dir)


def sentence_transformer(model_dir):
    """all-MiniLM-L6-v2 as sentence-transformers builds it (Transformer -> mean Pooling ->
    Normalize), from the local checkpoint folder (it has no sentence-transformers config files)."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tr = Transformer(str(model_dir), max_seq_length=256)
    dim = tr.auto_model.config.hidden_size
    return st.SentenceTransformer(modules=[tr, Pooling(dim, "mean"), Normalize()], device="cpu")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_sentence_embedding_equals_sentence_transformers(minilm, minilm_dir):
    params, cfg, tok = minilm
    ref = sentence_transformer(minilm_dir).encode(
        SENTENCES, batch_size=8, normalize_embeddings=True, convert_to_tensor=True
    )
    b = tok.encode(SENTENCES, max_len=256)
    assert (b["attention_mask"] == 0).any()  # one padded batch
    with torch.no_grad():
        e = sentence_embedding(
            params, b["input_ids"], cfg, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
        )
    assert e.shape == ref.shape == (len(SENTENCES), cfg.hidden_size)
    assert (e - ref).abs().max() <= 1e-5
    assert torch.allclose(e.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_pool_cls_mean_max_over_real_tokens_only():
    h = random.normal(random.key(0), (2, 4, 3))
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.equal(pool(h, m, "cls"), h[:, 0])
    assert torch.allclose(pool(h, m, "mean")[1], h[1, :2].mean(0))
    assert torch.allclose(pool(h, m, "mean")[0], h[0].mean(0))
    assert torch.equal(pool(h, m, "max")[1], h[1, :2].amax(0))
    h2 = h.clone()
    h2[1, 2:] = 1e6  # padding rows must not matter
    for how in ("mean", "max"):
        assert torch.equal(pool(h2, m, how), pool(h, m, how))
    assert torch.allclose(pool(h, None, "mean"), h.mean(1))


def test_last_k_layers(minilm):
    params, cfg, tok = minilm
    b = tok.encode(SENTENCES[:2], max_len=64)
    kw = dict(attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    with torch.no_grad():
        _, _, inter = bert(params, b["input_ids"], cfg, output_hidden_states=True, **kw)
        hs = inter["hidden_states"]
        cat = sentence_embedding(params, b["input_ids"], cfg, layers=range(-4, 0), normalize=False, **kw)
        avg = sentence_embedding(params, b["input_ids"], cfg, layers=[-2, -1], combine="mean", pooling="cls", **kw)
        last = sentence_embedding(params, b["input_ids"], cfg, layers=[-1], **kw)
        default = sentence_embedding(params, b["input_ids"], cfg, **kw)
    assert cat.shape == (2, 4 * cfg.hidden_size)
    for j, i in enumerate(range(-4, 0)):
        assert torch.allclose(cat[:, j * cfg.hidden_size : (j + 1) * cfg.hidden_size], pool(hs[i], b["attention_mask"]))
    expect = torch.nn.functional.normalize((hs[-2][:, 0] + hs[-1][:, 0]) / 2, dim=-1)
    assert torch.allclose(avg, expect, atol=1e-6)
    assert torch.allclose(last, default, atol=1e-6)
    assert torch.equal(combine_layers(hs, [0]), hs[0])


def test_errors(minilm):
    params, cfg, _ = minilm
    ids = torch.tensor([[101, 2023, 102]])
    with pytest.raises(ValueError, match="unknown pooling 'median'"):
        sentence_embedding(params, ids, cfg, pooling="median")
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(torch.zeros(1, 3, 4), None, "sum")
    hs = [torch.zeros(1, 3, 4)] * 7
    with pytest.raises(ValueError, match="layer index 7 is out of range: there are 7 hidden states"):
        combine_layers(hs, [7])
    with pytest.raises(ValueError, match="layer index -8 is out of range"):
        combine_layers(hs, [-8, -1])
    with pytest.raises(ValueError, match="unknown layer combination"):
        combine_layers(hs, [-1], "sum")
    with pytest.raises(ValueError, match="out of range"):
        sentence_embedding(params, ids, cfg, layers=[12])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        pool(torch.zeros(2, 3, 4), torch.ones(2, 4))
