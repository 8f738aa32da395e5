"""BERT's pretraining heads (MLM + next-sentence prediction, ``BertForPreTraining``) both ways,
the combined loss, sentence-pair batches, and (whole-word) masking."""

from __future__ import annotations

import pytest
import torch

from fnlm import random
from fnlm.data import load_tokenizer
from fnlm.io import CheckpointError
from fnlm.models import (
    bert_mlm,
    bert_pretraining,
    init_bert_pretraining,
    load_bert,
    mask_tokens,
    pretraining_loss,
    save_bert,
)
from fnlm.models._bert_hf import infer_head

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def hf_config(layers, heads, hidden, act, type_vocab):
    return transformers.BertConfig(
        vocab_size=57,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        hidden_act=act,
        type_vocab_size=type_vocab,
        max_position_embeddings=16,
        attn_implementation="eager",
    )


def random_hf(cls, config, seed):
    """A transformers model with every parameter (LayerNorms and biases too) randomised."""
    torch.manual_seed(seed)
    m = cls(config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def pair_batch(V, seed=0):
    """Sentence pairs with padding: [CLS]=1 A [SEP]=2 B [SEP], token types 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    lens_a, lens_b, L = [3, 2, 4], [4, 1, 2], 10
    ids = torch.zeros(3, L, dtype=torch.long)
    am, tt = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (a, b) in enumerate(zip(lens_a, lens_b)):
        row = [
            1,
            *torch.randint(5, V, (a,), generator=g).tolist(),
            2,
            *torch.randint(5, V, (b,), generator=g).tolist(),
            2,
        ]
        ids[i, : len(row)] = torch.tensor(row)
        am[i, : len(row)] = 1
        tt[i, a + 2 : len(row)] = 1
    return {"input_ids": ids, "attention_mask": am, "token_type_ids": tt}


@pytest.fixture(scope="module", params=[(1, 2, 16, "gelu", 2), (2, 4, 32, "relu", 2)], ids=["l1h2_gelu", "l2h4_relu"])
def hf_pretraining(request, tmp_path_factory):
    m = random_hf(transformers.BertForPreTraining, hf_config(*request.param), seed=3)
    d = tmp_path_factory.mktemp("bert_pretraining")
    m.save_pretrained(d)
    return m, d


def test_logits_and_loss_match_hf(hf_pretraining):
    ref, d = hf_pretraining
    params, cfg = load_bert(d, head="pretraining")
    assert infer_head(params) == "pretraining" and set(params) == {"bert", "mlm", "nsp"}
    b = pair_batch(cfg.vocab_size)
    ids, labels = mask_tokens(
        random.key(0), b["input_ids"], b["attention_mask"], 4, cfg.vocab_size, [0, 1, 2], prob=0.4
    )
    assert (labels != -100).any()
    nsp = torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = ref(
            input_ids=ids,
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
            labels=labels,
            next_sentence_label=nsp,
        )
    mlm_logits, nsp_logits = bert_pretraining(
        params, ids, cfg, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
    )
    assert (mlm_logits - out.prediction_logits).abs().max() <= 1e-5
    assert (nsp_logits - out.seq_relationship_logits).abs().max() <= 1e-5
    batch = {
        "input_ids": ids,
        "attention_mask": b["attention_mask"],
        "token_type_ids": b["token_type_ids"],
        "labels": labels,
        "next_sentence_label": nsp,
    }
    loss, aux = pretraining_loss(params, batch, cfg)
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    assert torch.allclose(aux["mlm_loss"] + aux["nsp_loss"], loss)
    assert torch.allclose(aux["nsp_accuracy"], (out.seq_relationship_logits.argmax(-1) == nsp).float().mean())


def test_save_then_transformers_loads_the_same_model(hf_pretraining, tmp_path):
    _, d = hf_pretraining
    params, cfg = load_bert(d, head="pretraining")
    save_bert(params, cfg, tmp_path / "out")
    m, info = transformers.BertForPreTraining.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    b = pair_batch(cfg.vocab_size, seed=1)
    with torch.no_grad():
        out = m.eval()(**b)
    mlm_logits, nsp_logits = bert_pretraining(
        params, b["input_ids"], cfg, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
    )
    assert (mlm_logits - out.prediction_logits).abs().max() <= 1e-5
    assert (nsp_logits - out.seq_relationship_logits).abs().max() <= 1e-5
    params2, _ = load_bert(tmp_path / "out", head="pretraining")
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.utils._pytree.tree_leaves(params), torch.utils._pytree.tree_leaves(params2))
    )


def test_other_heads_from_a_pretraining_checkpoint_and_back(hf_pretraining, tmp_path):
    ref, d = hf_pretraining
    mlm, cfg = load_bert(d, head="mlm")  # NSP and pooler skipped, as BertForMaskedLM
    assert set(mlm) == {"bert", "mlm"} and "pooler" not in mlm["bert"]
    b = pair_batch(cfg.vocab_size)
    with torch.no_grad():
        ref_logits = ref(**b).prediction_logits
    assert (
        bert_mlm(mlm, b["input_ids"], cfg, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
        - ref_logits
    ).abs().max() <= 1e-5
    load_bert(d, head="classifier", head_key=random.key(0))
    # a bare BertModel gets fresh MLM + NSP heads on request, and a clear error otherwise
    bare = random_hf(transformers.BertModel, ref.config, seed=5)
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no pretraining head: pass head_key"):
        load_bert(tmp_path / "bare", head="pretraining")
    params, _ = load_bert(tmp_path / "bare", head="pretraining", head_key=random.key(1))
    assert params["nsp"]["weight"].shape == (cfg.hidden_size, 2) and torch.equal(params["nsp"]["bias"], torch.zeros(2))
    with pytest.raises(CheckpointError, match="pooler"):  # BertForMaskedLM has no pooler, NSP needs it
        save_bert(mlm, cfg, tmp_path / "mlm")
        load_bert(tmp_path / "mlm", head="pretraining", head_key=random.key(1))


def test_init_matches_tree_of_loaded_model(hf_pretraining):
    _, d = hf_pretraining
    params, cfg = load_bert(d, head="pretraining")
    fresh = init_bert_pretraining(random.key(0), cfg)
    shapes = lambda t: [x.shape for x in torch.utils._pytree.tree_leaves(t)]
    assert torch.utils._pytree.tree_structure(fresh) == torch.utils._pytree.tree_structure(params)
    assert shapes(fresh) == shapes(params)


def test_sentence_pair_batch_from_the_tokenizer(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    ref = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    a, b = ["the film was long.", "I liked it"], ["but never boring", "a lot, really"]
    mine, theirs = tok.encode(a, b), ref(a, b, padding=True, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(mine[k], theirs[k]), k
    assert mine["token_type_ids"].sum() > 0


# ----------------------------------------------------------------------------- masking
def text_batch(B=64, L=128, V=1000, seed=0):
    """Random ids with [CLS]=101 / [SEP]=102 / padding 0 and random word boundaries."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(104, V, (B, L), generator=g)
    lens = torch.randint(L // 2, L + 1, (B,), generator=g)
    am = (torch.arange(L)[None] < lens[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(B), lens - 1] = 102
    ids = ids.masked_fill(am == 0, 0)
    starts = torch.rand(B, L, generator=g) < 0.6  # ~40% of pieces continue a word
    return ids, am, starts


def words_of(starts_row, n):
    out, cur = [], []
    for t in range(n):
        if starts_row[t] and cur:
            out.append(cur)
            cur = []
        cur.append(t)
    return out + ([cur] if cur else [])


def test_whole_word_masking_all_pieces_or_none():
    V, special = 1000, [0, 101, 102]
    ids, am, starts = text_batch(V=V)
    out, labels = mask_tokens(random.key(0), ids, am, 103, V, special, prob=0.15, word_starts=starts)
    sel = labels != -100
    cand = (am == 1) & ~torch.isin(ids, torch.tensor(special))
    assert not (sel & ~cand).any()  # never special tokens or padding
    assert torch.equal(labels[sel], ids[sel]) and torch.equal(out[~sel], ids[~sel])
    n_words = n_sel_words = 0
    for i in range(ids.shape[0]):
        st = starts[i] | ~cand[i]
        for w in words_of(st, ids.shape[1]):
            w = [t for t in w if cand[i, t]]
            if not w:
                continue
            s = sel[i, w]
            assert s.all() or not s.any(), f"row {i}: word {w} partly selected"
            n_words += 1
            n_sel_words += int(s.all())
    assert any(len(w) > 1 for w in words_of(starts[0], 128))  # multi-piece words exist
    assert abs(n_sel_words / n_words - 0.15) < 0.02  # words selected with probability 0.15
    n = sel.sum().item()  # 80/10/10 per selected token
    masked, kept = (out == 103) & sel, (out == ids) & sel
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(kept.sum().item() / n - 0.1) < 0.03
    assert abs((sel & ~masked & ~kept).sum().item() / n - 0.1) < 0.03
    out2, labels2 = mask_tokens(random.key(0), ids, am, 103, V, special, prob=0.15, word_starts=starts)
    assert torch.equal(out, out2) and torch.equal(labels, labels2)
    _, labels3 = mask_tokens(random.key(1), ids, am, 103, V, special, prob=0.15, word_starts=starts)
    assert not torch.equal(labels, labels3)
    # every piece a word of its own: whole-word masking is token masking with the same key
    ones = torch.ones_like(starts)
    assert torch.equal(
        mask_tokens(random.key(2), ids, am, 103, V, special, word_starts=ones)[1],
        mask_tokens(random.key(2), ids, am, 103, V, special)[1],
    )
    with pytest.raises(ValueError, match="word_starts has shape"):
        mask_tokens(random.key(0), ids, am, 103, V, special, word_starts=starts[:, :5])


def test_tokenizer_word_starts_drive_whole_word_masking(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    b = tok.encode(["unbelievably hyperbolic filmmaking"] * 200)
    ws = tok.word_starts(b["input_ids"])
    pieces = [tok.id_to_token(int(i)) for i in b["input_ids"][0]]
    assert ws[0].tolist() == [not p.startswith("##") for p in pieces]
    _, labels = mask_tokens(
        random.key(0),
        b["input_ids"],
        b["attention_mask"],
        tok.mask_id,
        tok.vocab_size,
        [tok.cls_id, tok.sep_id, tok.pad_id],
        prob=0.5,
        word_starts=ws,
    )
    sel = labels != -100
    un = [i for i, p in enumerate(pieces) if i and i < 6]  # un ##bel ##ie ##va ##bly
    assert pieces[1:6] == ["un", "##bel", "##ie", "##va", "##bly"]
    assert (sel[:, un].all(1) | ~sel[:, un].any(1)).all() and sel[:, un].all(1).any()
