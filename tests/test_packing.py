"""Packed sequences (fnlm.data.pack_sequences, fnlm.models.bert_classifier_packed): each packed
sequence's logits equal the sequence run alone, and no attention crosses a sequence boundary."""

from __future__ import annotations

import pytest
import torch

import fnlm
from fnlm.data import pack_rows, pack_sequences, padding_efficiency
from fnlm.models import (
    BertConfig,
    bert_classifier,
    bert_classifier_packed,
    classifier_loss,
    init_bert_classifier,
    packed_attention_mask,
    packed_classifier_loss,
)

CFG = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)
LENGTHS = [30, 5, 17, 2, 40, 11, 23, 9]
CLS = 2


@pytest.fixture(scope="module")
def params():
    p = init_bert_classifier(fnlm.random.key(0), CFG)
    p["classifier"]["weight"] = fnlm.random.normal(fnlm.random.key(1), (32, 2), std=1.0)  # O(1) logits
    return p


def sequences(seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [[CLS, *torch.randint(5, CFG.vocab_size, (n - 1,), generator=g).tolist()] for n in lengths]


def alone(params, seqs):
    """Each sequence through bert_classifier on its own (no padding, no packing)."""
    with torch.no_grad():
        return torch.cat([bert_classifier(params, torch.tensor([s]), CFG) for s in seqs])


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows(LENGTHS, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in r) <= 64 for r in rows)
    assert rows == [[4, 6], [0, 2, 5, 1], [7, 3]]  # 40+23, 30+17+11+5, 9+2: written out by hand
    with pytest.raises(ValueError, match="row_len=16"):
        pack_rows([3, 17], 16)


def test_pack_sequences_layout():
    seqs = sequences()
    b = pack_sequences(seqs, list(range(len(seqs))), row_len=64)
    assert b["input_ids"].shape == (3, 64) and b["labels"].tolist() == list(range(len(seqs)))
    r, t = b["cls_index"][1].tolist()  # sequence 1 (5 tokens) is the last of row 1: 30 + 17 + 11 = 58
    assert (r, t) == (1, 58)
    assert b["input_ids"][r, t : t + 5].tolist() == seqs[1]
    assert b["position_ids"][r, t : t + 5].tolist() == [0, 1, 2, 3, 4]
    assert b["sequence_ids"][r, t : t + 5].tolist() == [4] * 5 and b["sequence_ids"][r, 63] == 0
    assert (b["input_ids"][b["cls_index"][:, 0], b["cls_index"][:, 1]] == CLS).all()
    assert padding_efficiency([b]) == pytest.approx(sum(LENGTHS) / (3 * 64))
    m = packed_attention_mask(b["sequence_ids"])
    assert m.shape == (3, 1, 64, 64) and m[1, 0, 58, 57].item() is False and m[1, 0, 58, 62].item() is True


def test_packed_logits_equal_each_sequence_alone(params):
    seqs = sequences()
    with torch.no_grad():
        packed = bert_classifier_packed(params, pack_sequences(seqs, row_len=64), CFG)
    torch.testing.assert_close(packed, alone(params, seqs), atol=1e-5, rtol=0)


def test_changing_one_sequence_leaves_its_neighbours_unchanged(params):
    seqs = sequences()
    b = pack_sequences(seqs, row_len=64)
    changed = [list(s) for s in seqs]
    changed[2][1:] = sequences(seed=1)[2][1:]  # sequence 2 shares row 1 with sequences 0, 5 and 1
    rows = pack_rows(LENGTHS, 64)
    b2 = pack_sequences(changed, row_len=64, rows=rows)
    assert torch.equal(b2["cls_index"], b["cls_index"])  # the same places
    with torch.no_grad():
        before, after = bert_classifier_packed(params, b, CFG), bert_classifier_packed(params, b2, CFG)
    others = [i for i in range(len(seqs)) if i != 2]
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    assert (after[2] - before[2]).abs().max() > 1e-3  # the changed one did change


def test_packed_loss_and_gradients_equal_the_padded_batch(params):
    seqs = sequences()
    labels = [i % 2 for i in range(len(seqs))]
    packed = pack_sequences(seqs, labels, row_len=64)
    width = max(LENGTHS)
    padded = {
        "input_ids": torch.tensor([s + [0] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "labels": torch.tensor(labels),
    }
    g_packed, (l_packed, _) = torch.func.grad_and_value(packed_classifier_loss, has_aux=True)(params, packed, CFG)
    g_padded, (l_padded, _) = torch.func.grad_and_value(classifier_loss, has_aux=True)(params, padded, CFG)
    torch.testing.assert_close(l_packed, l_padded, atol=1e-5, rtol=0)
    for (name, a), b in zip(fnlm.tree.flatten_names(g_packed).items(), fnlm.tree.flatten_names(g_padded).values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_errors(params):
    b = pack_sequences(sequences(), row_len=64)
    with pytest.raises(ValueError, match="must all be"):
        bert_classifier_packed(params, {**b, "position_ids": b["position_ids"][:, :10]}, CFG)
    with pytest.raises(ValueError, match="every sequence index"):
        pack_sequences(sequences(), row_len=64, rows=[[0, 1]])
