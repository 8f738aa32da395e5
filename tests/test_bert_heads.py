"""Token classification and span heads against transformers' BertForTokenClassification /
BertForQuestionAnswering, and word/offset alignment against transformers' fast tokenizer."""

from __future__ import annotations

import itertools

import pytest
import torch

from fnlm import random
from fnlm.data import WordPieceTokenizer, align_labels, encode_windows, encode_words, span_positions
from fnlm.models import (
    BertConfig,
    best_span,
    decode_span,
    init_span_head,
    init_token_classifier,
    load_bert,
    save_bert,
    span_logits,
    span_loss,
    token_classifier,
    token_classifier_loss,
)
from fnlm.models._bert_hf import _to_hf, param_mapping
from fnlm.tree import flatten_names

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def hf_config(num_labels=5):
    return transformers.BertConfig(
        vocab_size=61,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=40,
        max_position_embeddings=20,
        num_labels=num_labels,
        attn_implementation="eager",
    )


def make_hf(cls, config, seed=0):
    torch.manual_seed(seed)
    m = cls(config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def inputs(B=3, L=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (B, L), generator=g)
    am = (torch.arange(L)[None] < torch.tensor([L, 5, 8])[:B, None]).long()
    tt = (torch.arange(L)[None] >= 4).long() * am
    return {"input_ids": ids * am, "attention_mask": am, "token_type_ids": tt}


def assert_grads_match(grads, hf_model, cfg, head, atol=1e-5):
    """fnlm's gradient tree, mapped to HF names and layouts, equals autograd's .grad on every parameter."""
    flat = flatten_names(grads)
    named = dict(hf_model.named_parameters())
    table = param_mapping(cfg, head, pooler=False)
    assert len(table) == len(flat) == len(named)
    for e in table:
        want = named[e.hf_name(head)].grad
        got = _to_hf(e.kind, flat[e.fnlm], cfg)
        if e.hf.endswith("word_embeddings.weight"):
            # nn.Embedding(padding_idx=pad) zeroes the [PAD] row's gradient; fnlm's table does not
            # (padded positions reach the span loss, whose softmax HF does not mask)
            got, want = got[1:], want[1:]
        assert (got - want).abs().max() <= atol * max(1.0, want.abs().max().item()), e.hf_name(head)


# ---------------------------------------------------------------------------------------------
# token classifier
# ---------------------------------------------------------------------------------------------
def test_token_classifier_logits_loss_and_grads_equal_transformers(tmp_path):
    ref = make_hf(transformers.BertForTokenClassification, hf_config(5))
    ref.save_pretrained(tmp_path)
    params, cfg = load_bert(tmp_path, head="token_classifier")
    assert "pooler" not in params["bert"] and cfg.num_labels == 5
    x = inputs()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, x["input_ids"].shape, generator=g)
    labels = labels.masked_fill(x["attention_mask"] == 0, -100)
    labels[:, 0] = -100  # [CLS]
    labels[0, 3] = -100  # a continuation piece
    out = ref(**x, labels=labels)
    out.loss.backward()
    logits = token_classifier(
        params, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
    )
    real = x["attention_mask"].bool()
    assert (logits - out.logits.detach())[real].abs().max() <= 1e-5
    grads, (loss, aux) = torch.func.grad_and_value(
        lambda p: token_classifier_loss(p, {**x, "labels": labels}, cfg), has_aux=True
    )(params)
    assert abs(loss.item() - out.loss.item()) <= 1e-6
    keep = labels != -100
    want_acc = (out.logits.argmax(-1) == labels)[keep].float().mean()
    assert abs(aux["accuracy"].item() - want_acc.item()) <= 1e-6
    assert_grads_match(grads, ref, cfg, "token_classifier")


def test_token_classifier_round_trips_both_ways(tmp_path):
    cfg = BertConfig(
        vocab_size=61,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=40,
        max_position_embeddings=20,
        num_labels=4,
        id2label=("O", "B-PER", "I-PER", "B-LOC"),
    )
    params = init_token_classifier(random.key(3), cfg)
    save_bert(params, cfg, tmp_path / "tc")
    model, info = transformers.BertForTokenClassification.from_pretrained(
        tmp_path / "tc", output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info
    assert model.config.id2label[1] == "B-PER"
    x = inputs()
    with torch.no_grad():
        want = model.eval()(**x).logits
    got = token_classifier(
        params, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
    )
    assert (got - want).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "back")
    again, cfg2 = load_bert(tmp_path / "back", head="token_classifier")
    assert cfg2 == cfg
    a, b = flatten_names(again), flatten_names(params)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a pretrained body (BertModel, pooler skipped) with a fresh token head
    body = make_hf(transformers.BertModel, hf_config(2), seed=4)
    body.save_pretrained(tmp_path / "body")
    with pytest.raises(Exception, match="head_key"):
        load_bert(tmp_path / "body", head="token_classifier", strict=False)
    p, _ = load_bert(tmp_path / "body", head="token_classifier", num_labels=7, head_key=random.key(0), strict=False)
    assert p["token_classifier"]["weight"].shape == (24, 7) and "pooler" not in p["bert"]


# ---------------------------------------------------------------------------------------------
# span head
# ---------------------------------------------------------------------------------------------
def test_span_logits_loss_and_grads_equal_transformers(tmp_path):
    ref = make_hf(transformers.BertForQuestionAnswering, hf_config(2), seed=1)
    ref.save_pretrained(tmp_path)
    params, cfg = load_bert(tmp_path, head="span")
    x = inputs()
    start = torch.tensor([5, 0, 11])  # 11 == len: outside the window, ignored (HF's clamp rule)
    end = torch.tensor([7, 0, 40])
    out = ref(**x, start_positions=start, end_positions=end)
    out.loss.backward()
    s, e = span_logits(
        params, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
    )
    assert (s - out.start_logits.detach()).abs().max() <= 1e-5
    assert (e - out.end_logits.detach()).abs().max() <= 1e-5
    grads, (loss, _) = torch.func.grad_and_value(
        lambda p: span_loss(p, {**x, "start_positions": start, "end_positions": end}, cfg), has_aux=True
    )(params)
    assert abs(loss.item() - out.loss.item()) <= 1e-6
    assert_grads_match(grads, ref, cfg, "span")


def test_span_head_round_trips_both_ways(tmp_path):
    cfg = BertConfig(
        vocab_size=61,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=20,
    )
    params = init_span_head(random.key(5), cfg)
    save_bert(params, cfg, tmp_path / "qa")
    model, info = transformers.BertForQuestionAnswering.from_pretrained(
        tmp_path / "qa", output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info
    x = inputs()
    with torch.no_grad():
        out = model.eval()(**x)
    s, e = span_logits(
        params, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
    )
    assert (s - out.start_logits).abs().max() <= 1e-5 and (e - out.end_logits).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "back")
    again, _ = load_bert(tmp_path / "back", head="span")
    a, b = flatten_names(again), flatten_names(params)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_span_is_the_brute_force_maximum():
    g = torch.Generator().manual_seed(0)
    B, L, M = 6, 13, 4
    s, e = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    ctx = torch.zeros(B, L, dtype=torch.bool)
    ctx[:, 5:12] = True
    ctx[1, 5:] = False
    ctx[1, 7] = True  # a one-piece context
    e[2, 3] = 100.0  # a huge end score outside the context must not be chosen
    s[3, 6], e[3, 11] = 50.0, 50.0  # too long (6 pieces > M)
    i, j, score = best_span(s, e, ctx, max_answer_length=M)
    for b in range(B):
        cands = [
            (s[b, a] + e[b, c], a, c)
            for a, c in itertools.product(range(L), range(L))
            if a <= c < a + M and ctx[b, a] and ctx[b, c]
        ]
        want = max(cands)
        assert (i[b].item(), j[b].item()) == (want[1], want[2]) and abs(score[b].item() - want[0].item()) < 1e-6
    assert (i[1].item(), j[1].item()) == (7, 7)
    none_i, none_j, none_s = best_span(s[:1], e[:1], torch.zeros(1, L, dtype=torch.bool))
    assert none_i.item() == none_j.item() == 0 and torch.isneginf(none_s).all()
    with pytest.raises(ValueError, match="max_answer_length"):
        best_span(s, e, ctx, max_answer_length=0)


# ---------------------------------------------------------------------------------------------
# alignment and windows against the fast tokenizer
# ---------------------------------------------------------------------------------------------
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "who",
    "where",
    "did",
    "?",
    ".",
    ",",
    "new",
    "york",
    "john",
    "smith",
    "lives",
    "in",
    "un",
    "##believ",
    "##able",
    "##s",
    "##ing",
    "play",
    "a",
    "b",
    "c",
    "##a",
    "##b",
    "##c",
    "##at",
    "m",
    "##t",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return WordPieceTokenizer.from_vocab(d / "vocab.txt"), transformers.BertTokenizerFast.from_pretrained(str(d))


WORDS = [
    ["John", "Smith", "lives", "in", "New", "York", "."],
    ["unbelievable", "playing", "cats", "abc", "mat"],
    ["the"],
]
WORD_LABELS = [[1, 2, 0, 0, 3, 4, 0], [0, 5, 6, 0, 1], [2]]


@pytest.mark.parametrize("max_len", [64, 7])
def test_label_alignment_equals_the_fast_tokenizer_word_ids_recipe(tokenizers, max_len):
    ours_tok, hf = tokenizers
    enc = encode_words(ours_tok, WORDS, labels=WORD_LABELS, max_len=max_len)
    ref = hf(WORDS, is_split_into_words=True, truncation=True, max_length=max_len, padding="longest")
    assert enc["input_ids"].tolist() == ref["input_ids"]
    assert enc["attention_mask"].tolist() == ref["attention_mask"]
    for b in range(len(WORDS)):
        word_ids = ref.word_ids(b)
        assert enc["word_ids"][b] == word_ids
        want, prev = [], None  # transformers' run_ner tokenize_and_align_labels
        for w in word_ids:
            want.append(-100 if w is None else WORD_LABELS[b][w] if w != prev else -100)
            prev = w
        assert enc["labels"][b].tolist() == want
    assert align_labels([None, 0, 0, 1, None], [7, 8], label_all_pieces=True) == [-100, 7, 7, 8, -100]


QUESTIONS = ["who lives in new york?", "where did the cat sit?"]
CONTEXTS = [
    "John Smith lives in New York. the cat sat on the mat, unbelievable. a b c abc the cat sat.",
    "the cat sat on the mat.",
]


@pytest.mark.parametrize("max_len,stride", [(24, 4), (20, 6), (64, 8)])
def test_windows_with_stride_equal_the_fast_tokenizer_and_cover_the_context(tokenizers, max_len, stride):
    ours_tok, hf = tokenizers
    enc = encode_windows(ours_tok, QUESTIONS, CONTEXTS, max_len=max_len, stride=stride)
    ref = hf(
        QUESTIONS,
        CONTEXTS,
        truncation="only_second",
        max_length=max_len,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    assert enc["input_ids"].tolist() == ref["input_ids"]
    assert enc["token_type_ids"].tolist() == ref["token_type_ids"]
    assert enc["attention_mask"].tolist() == ref["attention_mask"]
    assert enc["sample"].tolist() == ref["overflow_to_sample_mapping"]
    for w in range(len(ref["input_ids"])):
        seq = ref.sequence_ids(w)
        want = [list(o) if s == 1 else [-1, -1] for o, s in zip(ref["offset_mapping"][w], seq)]
        assert enc["offsets"][w].tolist() == want
    # every context piece lies in some window, and neighbours share `stride` pieces
    for s, ctx in enumerate(CONTEXTS):
        n = len(ours_tok.tokenize(ctx))
        rows = enc["offsets"][enc["sample"] == s]
        seen = set()
        for r in rows:
            seen |= {tuple(o) for o in r.tolist() if o[0] >= 0}
        assert len(seen) == n
        if len(rows) > 1:
            a = {tuple(o) for o in rows[0].tolist() if o[0] >= 0}
            b = {tuple(o) for o in rows[1].tolist() if o[0] >= 0}
            assert len(a & b) == stride


def test_span_positions_equal_the_run_qa_recipe_and_decode_back(tokenizers):
    ours_tok, hf = tokenizers
    answer = "new york"
    a0 = CONTEXTS[0].lower().index(answer)
    a1 = a0 + len(answer)
    enc = encode_windows(ours_tok, QUESTIONS[:1], CONTEXTS[:1], max_len=20, stride=6)
    W = enc["input_ids"].shape[0]
    assert W > 2
    start, end = span_positions(enc["offsets"], torch.full((W,), a0), torch.full((W,), a1))
    ref = hf(
        QUESTIONS[:1],
        CONTEXTS[:1],
        truncation="only_second",
        max_length=20,
        stride=6,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    for w in range(W):  # transformers' run_qa prepare_train_features, context pieces only
        offs, seq = ref["offset_mapping"][w], ref.sequence_ids(w)
        ts = seq.index(1)
        te = len(seq) - 1 - seq[::-1].index(1)
        if not (offs[ts][0] <= a0 and offs[te][1] >= a1):
            want = (0, 0)
        else:
            while ts <= te and offs[ts][0] <= a0:
                ts += 1
            while offs[te][1] >= a1:
                te -= 1
            want = (ts - 1, te + 1)
        assert (start[w].item(), end[w].item()) == want
    assert (start > 0).sum() >= 1
    # logits peaked at the labelled pieces decode to the answer's text
    w = int((start > 0).nonzero()[0])
    s = torch.full((enc["input_ids"].shape[1],), -5.0)
    e = s.clone()
    s[start[w]], e[end[w]] = 5.0, 5.0
    text, _ = decode_span(s, e, enc["offsets"][w], CONTEXTS[0])
    assert text.lower() == answer


def test_errors(tokenizers):
    ours_tok, _ = tokenizers
    with pytest.raises(ValueError, match="stride"):
        encode_windows(ours_tok, ["who lives in new york"], ["the cat"], max_len=12, stride=6)
    with pytest.raises(ValueError, match="padding"):
        encode_words(ours_tok, WORDS, padding="nope")
