"""fnlm.models (BERT) against Hugging Face transformers (the independent reference).

* real weights: all-MiniLM-L6-v2 through fnlm and through ``transformers.BertModel``;
* tiny random BERTs built by transformers: classifier logits / loss / gradients, MLM logits / loss;
* torch.func (grad, vmap) and torch.compile(fullgraph=True) against eager;
* dropout keys, init statistics, BERT's 80/10/10 masking, config parsing and input validation.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from fnlm import random
from fnlm.models import (
    BertConfig,
    bert,
    bert_classifier,
    bert_config_from_hf,
    bert_config_to_hf,
    bert_mlm,
    classifier_loss,
    init_bert,
    init_bert_classifier,
    init_bert_mlm,
    load_bert,
    mask_tokens,
    mlm_loss,
    read_bert_config,
    save_bert,
)
from fnlm.train import compile_fn
from fnlm.tree import cast, flatten_names, tree_leaves, tree_map, tree_stack, tree_structure

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SENTENCES = [
    "The cat sat on the mat.",
    "A completely different sentence, which is quite a bit longer than the first one, with commas.",
    "Short.",
    "Functional transformers: params are data, layers are pure functions.",
]


def hf_config(cfg: BertConfig, **kw) -> "transformers.BertConfig":
    """The same hyper-parameters as a transformers config (written independently of bert_config_to_hf)."""
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        num_labels=cfg.num_labels,
        attn_implementation="eager",
        **kw,
    )


TINY = BertConfig(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=24,
    type_vocab_size=2,
    hidden_act="gelu",
    num_labels=3,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    layer_norm_eps=1e-12,
)


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Make every parameter (biases, LayerNorm gains too) non-trivial so the mapping is fully exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def batch_for(cfg: BertConfig, seed: int = 0, B: int = 4, L: int = 11) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (B, L), generator=g)
    lengths = torch.tensor([L, L - 3, 2, L - 6])[:B]
    am = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids * am  # pad id 0
    tt = (torch.arange(L)[None] >= (lengths[:, None] // 2)).long() * am
    if cfg.type_vocab_size == 1:
        tt = torch.zeros_like(tt)
    labels = torch.randint(0, cfg.num_labels, (B,), generator=g)
    return {"input_ids": ids, "attention_mask": am, "token_type_ids": tt, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(minilm_dir):
    params, cfg = load_bert(minilm_dir)
    tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    return params, cfg, tok


@pytest.fixture(scope="module")
def minilm_hf(minilm_dir):
    return transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()


def test_minilm_matches_hf(minilm, minilm_hf):
    params, cfg, tok = minilm
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert enc["attention_mask"].sum(-1).unique().numel() == len(SENTENCES)  # all lengths differ
    with torch.no_grad():
        ref = minilm_hf(**enc)
    h, pooled = bert(
        params, enc["input_ids"], cfg, attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"]
    )
    real = enc["attention_mask"].bool()
    assert h.shape == ref.last_hidden_state.shape and pooled.shape == ref.pooler_output.shape
    assert (h - ref.last_hidden_state)[real].abs().max() <= 1e-4
    assert (pooled - ref.pooler_output).abs().max() <= 1e-4
    # Padded query positions are computed the same way (they attend to the real keys only), so they
    # match HF too, but they are worse conditioned in float32: measured ~6e-5 here, and HF's own
    # float32 output is ~7e-5 away from its float64 output at those positions, hence the looser
    # bound. In float64 (next test) every position, padding included, agrees to ~1e-13.
    assert (h - ref.last_hidden_state)[~real].abs().max() <= 3e-4
    # and each sentence alone (no padding) gives its padded row's real positions
    for i, s in enumerate(SENTENCES[:2]):
        one = tok([s], return_tensors="pt")
        h1, p1 = bert(params, one["input_ids"], cfg, attention_mask=one["attention_mask"])
        n = one["input_ids"].shape[1]
        assert (h1[0] - h[i, :n]).abs().max() <= 1e-4
        assert (p1[0] - pooled[i]).abs().max() <= 1e-4


def test_minilm_float64_matches_hf_everywhere(minilm, minilm_dir):
    """In float64 the two implementations agree to ~1e-12 at every position, padding included."""
    params, cfg, tok = minilm
    ref_model = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").double().eval()
    enc = tok(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**enc)
    h, pooled = bert(cast(params, torch.float64), enc["input_ids"], cfg, attention_mask=enc["attention_mask"])
    assert (h - ref.last_hidden_state).abs().max() <= 1e-10
    assert (pooled - ref.pooler_output).abs().max() <= 1e-10


def test_minilm_without_mask_equals_all_ones(minilm):
    params, cfg, tok = minilm
    enc = tok(SENTENCES[:1], return_tensors="pt")
    a, pa = bert(params, enc["input_ids"], cfg)
    b, pb = bert(
        params,
        enc["input_ids"],
        cfg,
        attention_mask=torch.ones_like(enc["input_ids"]),
        token_type_ids=torch.zeros_like(enc["input_ids"]),
    )
    assert torch.equal(a, b) and torch.equal(pa, pb)


def test_pooled_only_computes_the_cls_row_of_the_full_model(minilm):
    params, cfg, tok = minilm
    enc = tok(SENTENCES[:3], padding=True, return_tensors="pt")
    h, pooled = bert(params, enc["input_ids"], cfg, attention_mask=enc["attention_mask"])
    h_cls, pooled_cls = bert(params, enc["input_ids"], cfg, attention_mask=enc["attention_mask"], pooled_only=True)
    assert h_cls.shape == (3, 1, cfg.hidden_size)
    torch.testing.assert_close(h_cls, h[:, :1], atol=2e-6, rtol=0)
    torch.testing.assert_close(pooled_cls, pooled, atol=2e-6, rtol=0)


def test_all_padding_row_is_finite(minilm):
    """A row with no real token (batch padding) must not produce NaN (it would poison the loss)."""
    params, cfg, tok = minilm
    enc = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    am = enc["attention_mask"].clone()
    am[1] = 0
    h, pooled = bert(params, enc["input_ids"], cfg, attention_mask=am)
    assert torch.isfinite(h).all() and torch.isfinite(pooled).all()
    h0, _ = bert(params, enc["input_ids"][:1], cfg, attention_mask=am[:1])
    assert torch.equal(h0[0], h[0])  # other rows unaffected


# ---------------------------------------------------------------------------------------------
# Tiny random BERTs built by transformers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    torch.manual_seed(0)
    ref = perturb(transformers.BertForSequenceClassification(hf_config(TINY)))
    d = tmp_path_factory.mktemp("tiny_cls")
    ref.save_pretrained(d)
    params, cfg = load_bert(d, head="classifier")
    return params, cfg, ref


def test_classifier_logits_and_loss_match_hf(tiny_classifier):
    params, cfg, ref = tiny_classifier
    b = batch_for(cfg)
    with torch.no_grad():
        out = ref(**b)
    logits = bert_classifier(
        params, b["input_ids"], cfg, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
    )
    assert (logits - out.logits).abs().max() <= 1e-5
    loss, aux = classifier_loss(params, b, cfg)
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    acc = (out.logits.argmax(-1) == b["labels"]).float().mean()
    assert torch.allclose(aux["accuracy"], acc)


def test_classifier_loss_weight_drops_padding_rows(tiny_classifier):
    params, cfg, ref = tiny_classifier
    b = batch_for(cfg)
    b["attention_mask"][3] = 0  # an all-padding row, as a fixed-size last batch would have
    b["input_ids"][3] = 0
    b["weight"] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    real = {k: v[:3] for k, v in b.items() if k != "weight"}
    with torch.no_grad():
        out = ref(**real)
    loss, aux = classifier_loss(params, b, cfg)
    assert torch.isfinite(loss)
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    assert torch.allclose(aux["accuracy"], (out.logits.argmax(-1) == real["labels"]).float().mean())
    grads, _ = torch.func.grad(classifier_loss, has_aux=True)(params, b, cfg)
    assert all(torch.isfinite(g).all() for g in tree_leaves(grads))


def test_grad_and_value_matches_hf_autograd(tiny_classifier, tmp_path):
    """torch.func gradients of classifier_loss == HF's loss.backward() gradients, every parameter."""
    params, cfg, ref = tiny_classifier
    b = batch_for(cfg, seed=1)
    grads, (loss, aux) = torch.func.grad_and_value(classifier_loss, has_aux=True)(params, b, cfg)
    ref.zero_grad()
    out = ref(**b)
    out.loss.backward()
    assert abs(loss.item() - out.loss.item()) <= 1e-5 and "accuracy" in aux
    # write the gradient tree with HF names (save_bert) and compare name by name with HF's .grad
    save_bert(grads, cfg, tmp_path / "grads")
    hf_grads = {n: p.grad for n, p in ref.named_parameters()}
    with safe_open(str(tmp_path / "grads" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(hf_grads)
        for n in f.keys():
            assert torch.allclose(f.get_tensor(n), hf_grads[n], atol=1e-6, rtol=1e-4), n


def test_per_example_grads_with_vmap(tiny_classifier):
    params, cfg, _ = tiny_classifier
    b = batch_for(cfg, seed=2, B=3)
    b.pop("labels")
    labels = torch.tensor([0, 2, 1])

    def one(p, ids, am, tt, y):
        ex = {"input_ids": ids[None], "attention_mask": am[None], "token_type_ids": tt[None], "labels": y[None]}
        return classifier_loss(p, ex, cfg)[0]

    per_ex = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0, 0))(
        params, b["input_ids"], b["attention_mask"], b["token_type_ids"], labels
    )
    for i in range(3):
        gi = torch.func.grad(one)(params, b["input_ids"][i], b["attention_mask"][i], b["token_type_ids"][i], labels[i])
        for x, y in zip(tree_leaves(per_ex), tree_leaves(gi)):
            assert torch.allclose(x[i], y, atol=1e-6)


def test_vmap_over_an_ensemble(tiny_classifier):
    params, cfg, _ = tiny_classifier
    members = [params, init_bert_classifier(random.key(5), cfg)]
    b = batch_for(cfg, seed=3)
    f = lambda p: bert_classifier(p, b["input_ids"], cfg, attention_mask=b["attention_mask"])  # noqa: E731
    stacked = torch.func.vmap(f)(tree_stack(members))
    for i, m in enumerate(members):
        assert torch.allclose(stacked[i], f(m), atol=1e-5)


def test_compile_fullgraph_equals_eager(tiny_classifier):
    params, cfg, _ = tiny_classifier
    b = batch_for(cfg, seed=4)
    b["weight"] = torch.tensor([1.0, 1.0, 0.5, 1.0])
    compiled = compile_fn(classifier_loss)  # torch.compile(fullgraph=True) + fnlm's Inductor options
    k = random.key(11)
    for train, key in ((False, None), (True, k)):
        (l_c, a_c), (l_e, a_e) = (
            compiled(params, b, cfg, key=key, train=train),
            classifier_loss(params, b, cfg, key=key, train=train),
        )
        assert torch.allclose(l_c, l_e, atol=1e-5), train
        assert torch.allclose(a_c["accuracy"], a_e["accuracy"])


def test_classifier_pooled_only_false_runs_the_full_last_layer_to_the_same_logits(tiny_classifier):
    params, cfg, _ = tiny_classifier
    b = batch_for(cfg, seed=3)
    kw = dict(attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    cls_only = bert_classifier(params, b["input_ids"], cfg, **kw)
    full = bert_classifier(params, b["input_ids"], cfg, **kw, pooled_only=False)
    assert full.shape == cls_only.shape == (b["input_ids"].shape[0], cfg.num_labels)
    torch.testing.assert_close(full, cls_only, atol=2e-6, rtol=0)


def test_dropout_keys(tiny_classifier):
    params, cfg, _ = tiny_classifier
    b = batch_for(cfg, seed=5)
    kw = dict(attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    ev = bert_classifier(params, b["input_ids"], cfg, **kw)
    k1, k2 = random.key(1), random.key(2)
    t1 = bert_classifier(params, b["input_ids"], cfg, **kw, key=k1, train=True)
    t1b = bert_classifier(params, b["input_ids"], cfg, **kw, key=random.key(1), train=True)
    t2 = bert_classifier(params, b["input_ids"], cfg, **kw, key=k2, train=True)
    assert not torch.allclose(t1, ev, atol=1e-4)
    assert torch.equal(t1, t1b)
    assert not torch.allclose(t1, t2, atol=1e-4)
    # eval ignores the key; train without a key is a clear error
    assert torch.equal(bert_classifier(params, b["input_ids"], cfg, **kw, key=k1), ev)
    with pytest.raises(ValueError, match="key"):
        bert_classifier(params, b["input_ids"], cfg, **kw, train=True)
    # no dropout anywhere: train mode == eval mode
    cfg0 = dataclasses.replace(cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert torch.allclose(bert_classifier(params, b["input_ids"], cfg0, **kw, key=k1, train=True), ev, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# MLM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_mlm_logits_and_loss_match_hf(tmp_path, act):
    cfg = dataclasses.replace(TINY, hidden_act=act)
    torch.manual_seed(1)
    ref = perturb(transformers.BertForMaskedLM(hf_config(cfg)), seed=1)
    ref.save_pretrained(tmp_path)
    params, cfg2 = load_bert(tmp_path, head="mlm")
    assert cfg2 == cfg
    b = batch_for(cfg)
    ids, labels = mask_tokens(
        random.key(3),
        b["input_ids"],
        b["attention_mask"],
        mask_id=5,
        vocab_size=cfg.vocab_size,
        special_ids=[0],
        prob=0.3,
    )
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"], labels=labels)
    logits = bert_mlm(params, ids, cfg, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    assert (logits - out.logits).abs().max() <= 1e-5
    loss, aux = mlm_loss(
        params,
        {
            "input_ids": ids,
            "attention_mask": b["attention_mask"],
            "token_type_ids": b["token_type_ids"],
            "labels": labels,
        },
        cfg,
    )
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    sel = labels != -100
    assert torch.allclose(aux["accuracy"], (out.logits.argmax(-1)[sel] == labels[sel]).float().mean())


def test_mlm_decoder_is_tied():
    params = init_bert_mlm(random.key(0), TINY)
    assert "pooler" not in params["bert"]  # as BertForMaskedLM
    ids = torch.randint(0, TINY.vocab_size, (2, 5))
    g = torch.func.grad(lambda p: bert_mlm(p, ids, TINY).logsumexp(-1).sum())(params)
    # the word table receives gradient both as input embedding and as decoder matrix
    only_input = torch.func.grad(lambda p: bert(p, ids, TINY)[0].sum())(params["bert"])
    assert (g["bert"]["embeddings"]["word"]["weight"].abs().sum(-1) > 0).sum() > (
        only_input["embeddings"]["word"]["weight"].abs().sum(-1) > 0
    ).sum()


def test_mask_tokens_80_10_10():
    g = torch.Generator().manual_seed(0)
    V, mask_id, special = 1000, 103, [0, 101, 102]
    ids = torch.randint(104, V, (64, 512), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    am = torch.ones_like(ids)
    am[:, 400:] = 0
    ids = ids.masked_fill(am == 0, 0)
    out, labels = mask_tokens(random.key(0), ids, am, mask_id, V, special, prob=0.15)
    sel = labels != -100
    cand = (am == 1) & ~torch.isin(ids, torch.tensor(special))
    assert not (sel & ~cand).any()  # never special tokens or padding
    assert torch.equal(labels[sel], ids[sel]) and torch.equal(out[~sel], ids[~sel])
    n = sel.sum().item()
    assert abs(n / cand.sum().item() - 0.15) < 0.01
    masked = (out == mask_id) & sel
    kept = (out == ids) & sel
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - (0.1 + 0.1 / V)) < 0.02
    assert abs((sel & ~masked & ~kept).sum().item() / n - 0.1) < 0.02
    assert out.min() >= 0 and out.max() < V
    out2, labels2 = mask_tokens(random.key(0), ids, am, mask_id, V, special, prob=0.15)
    assert torch.equal(out, out2) and torch.equal(labels, labels2)
    out3, _ = mask_tokens(random.key(1), ids, am, mask_id, V, special, prob=0.15)
    assert not torch.equal(out, out3)


# ---------------------------------------------------------------------------------------------
# Init, config, validation
# ---------------------------------------------------------------------------------------------
def test_init_matches_hf_scheme():
    cfg = dataclasses.replace(TINY, hidden_size=64, intermediate_size=128, vocab_size=500, initializer_range=0.03)
    p = init_bert_classifier(random.key(0), cfg)
    ref = transformers.BertForSequenceClassification(hf_config(cfg, initializer_range=0.03))
    # the same parameter count as HF's model, and the same statistics per kind of parameter
    assert sum(x.numel() for x in tree_leaves(p)) == sum(x.numel() for x in ref.parameters())
    flat = flatten_names(p)
    for name, x in flat.items():
        if name.endswith(("gamma",)):
            assert torch.equal(x, torch.ones_like(x)), name
        elif name.endswith(("bias", "beta")):
            assert torch.equal(x, torch.zeros_like(x)), name
        else:
            w = x[1:] if name.endswith("word.weight") else x
            assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 0.03) < 0.004, name
    assert torch.equal(flat["bert.embeddings.word.weight"][0], torch.zeros(cfg.hidden_size))  # pad row
    assert torch.equal(ref.bert.embeddings.word_embeddings.weight[0].detach(), torch.zeros(cfg.hidden_size))
    # different keys, different params; same key, same params
    q = init_bert_classifier(random.key(0), cfg)
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(p), tree_leaves(q)))
    r = init_bert_classifier(random.key(1), cfg)
    assert not torch.equal(flat["bert.pooler.weight"], r["bert"]["pooler"]["weight"])


def test_config_from_hf_json(minilm_dir):
    cfg = read_bert_config(minilm_dir / "config.json")
    raw = json.loads((minilm_dir / "config.json").read_text())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        raw["hidden_size"],
        raw["num_hidden_layers"],
        raw["num_attention_heads"],
        raw["intermediate_size"],
    )
    assert cfg.layer_norm_eps == raw["layer_norm_eps"] and cfg.vocab_size == raw["vocab_size"]
    t = cfg.transformer_config()
    assert (t.d_model, t.n_heads, t.d_ff, t.n_layers, t.norm_first, t.use_final_norm, t.max_len) == (
        384,
        12,
        1536,
        6,
        False,
        False,
        512,
    )
    assert (t.dropout, t.attention_dropout, t.activation, t.layer_norm_eps, t.init_std) == (
        0.1,
        0.1,
        "gelu",
        1e-12,
        0.02,
    )
    hash(cfg)  # hashable: a constant for torch.compile
    # bert_config_to_hf round-trips through transformers and back
    hf = transformers.BertConfig.from_dict(bert_config_to_hf(cfg, "classifier"))
    assert hf.model_type == "bert" and hf.architectures == ["BertForSequenceClassification"]
    assert hf.hidden_size == 384 and hf.num_labels == 2 and hf.layer_norm_eps == 1e-12
    assert bert_config_from_hf(hf.to_dict()) == cfg
    labelled = dataclasses.replace(cfg, num_labels=3, id2label=("neg", "neu", "pos"))
    back = bert_config_from_hf(transformers.BertConfig.from_dict(bert_config_to_hf(labelled, "classifier")).to_dict())
    assert back == labelled


def test_config_errors():
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert_config_from_hf({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="model_type"):
        bert_config_from_hf({"model_type": "roberta"})
    with pytest.raises(ValueError, match="is_decoder"):
        bert_config_from_hf({"is_decoder": True})
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        BertConfig(hidden_dropout_prob=1.0)
    assert bert_config_from_hf({"hidden_size": 64, "num_attention_heads": 2, "some_new_key": 1}).hidden_size == 64


def test_bad_inputs_raise_value_error():
    params = init_bert(random.key(0), TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 6))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bert(params, ids.clone().index_fill_(1, torch.tensor([2]), TINY.vocab_size), TINY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bert(params, -ids - 1, TINY)
    with pytest.raises(ValueError, match="longer than the position table"):
        bert(params, torch.zeros(1, TINY.max_position_embeddings + 1, dtype=torch.long), TINY)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        bert(params, ids, TINY, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids"):
        bert(params, ids, TINY, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        bert(params, ids, TINY, token_type_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        bert(params, ids.float(), TINY)
    with pytest.raises(TypeError, match="BertConfig"):
        bert(params, ids, TINY.transformer_config())
    cp = init_bert_classifier(random.key(0), TINY)
    with pytest.raises(ValueError, match="labels"):
        classifier_loss(cp, {"input_ids": ids, "labels": torch.tensor([0, TINY.num_labels])}, TINY)
    # the maximum length itself is fine
    h, _ = bert(params, torch.zeros(1, TINY.max_position_embeddings, dtype=torch.long), TINY)
    assert h.shape == (1, TINY.max_position_embeddings, TINY.hidden_size)


def test_unbatched_input_and_tree_shapes():
    params = init_bert(random.key(0), TINY)
    ids = torch.randint(0, TINY.vocab_size, (7,))
    h, pooled = bert(params, ids, TINY)
    hb, pb = bert(params, ids[None], TINY)
    assert h.shape == (7, TINY.hidden_size) and pooled.shape == (TINY.hidden_size,)
    assert torch.allclose(h, hb[0], atol=1e-6) and torch.allclose(pooled, pb[0], atol=1e-6)
    layer = params["encoder"]["layers"][0]
    assert layer["attn"]["q"]["weight"].shape == (32, 4, 8) and layer["attn"]["o"]["weight"].shape == (4, 8, 32)
    assert tree_structure(tree_map(lambda x: 0, params)) == tree_structure(
        tree_map(lambda x: 0, init_bert(random.key(1), TINY))
    )
