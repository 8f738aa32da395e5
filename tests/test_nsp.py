"""fnlm.data.nsp_pairs: IsNext/NotNext balance and provenance read back from the token ids alone,
sentence splitting, packing to max_len; slow: a short `pretrain_mlm.py --nsp` run beats chance."""

from __future__ import annotations

import pytest

from fnlm.data import WordPieceTokenizer, make_batches, nsp_pairs, split_sentences

N_DOCS, N_SENTS = 40, 9
VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "!", "?", "x", "test"]
    + [f"d{i}" for i in range(N_DOCS + 5)]
    + [f"s{j}" for j in range(N_SENTS)]
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return WordPieceTokenizer.from_vocab(d / "vocab.txt")


def doc(i: int, n: int = N_SENTS) -> str:
    """Document i: sentence j is 'd{i} s{j} x ... .' (a varying number of x), so every sentence
    says where it comes from."""
    ends = ".!?"
    return " ".join(f"d{i} s{j} " + "x " * ((i + j) % 4) + ends[j % 3] for j in range(n))


def parse(tok, ids: list[int], b_start: int):
    """[(doc, sentence)] of segment A and of segment B, read from the tokens."""
    toks = [tok.id_to_token(t) for t in ids]
    assert toks[0] == "[CLS]" and toks[b_start - 1] == "[SEP]" and toks[-1] == "[SEP]"

    def sentences(seg):
        return [(int(a[1:]), int(b[1:])) for a, b in zip(seg, seg[1:]) if a.startswith("d") and b.startswith("s")]

    return sentences(toks[1 : b_start - 1]), sentences(toks[b_start:-1])


def test_split_sentences():
    assert split_sentences('One. Two!  Three? "Four." (Five.) six') == [
        "One.",
        "Two!",
        "Three?",
        '"Four."',
        "(Five.)",
        "six",
    ]
    assert split_sentences("3.14 is pi. ok") == ["3.14 is pi.", "ok"]
    assert split_sentences("   ") == []


@pytest.mark.parametrize("max_len", [24, 64, 512])
def test_pairs_are_balanced_consecutive_or_from_another_review(tok, max_len):
    docs = [doc(i) for i in range(N_DOCS)]
    pairs = nsp_pairs(tok, docs, max_len=max_len, seed=3)
    n = len(pairs.labels)
    assert n >= N_DOCS
    assert abs(sum(pairs.labels) - n / 2) <= 1  # 50/50
    assert max(map(len, pairs.input_ids)) <= max_len
    if max_len == 24:
        assert sum(len(x) >= max_len - 4 for x in pairs.input_ids) > n / 2  # packed close to max_len
    for ids, b0, label in zip(pairs.input_ids, pairs.b_start, pairs.labels):
        a, b = parse(tok, ids, b0)
        assert a and b
        assert len({d for d, _ in a}) == 1 and len({d for d, _ in b}) == 1  # each segment from one review
        (da, _), (db, _) = a[-1], b[0]
        if label == 0:  # IsNext: B starts with the sentence right after A's last one, in the same review
            assert da == db and b[0][1] == a[-1][1] + 1
        else:
            assert da != db
        for seg in (a, b):  # consecutive sentences within a segment
            assert [s for _, s in seg] == list(range(seg[0][1], seg[0][1] + len(seg)))
    # deterministic given the seed, different for another one
    assert nsp_pairs(tok, docs, max_len=max_len, seed=3) == pairs
    assert nsp_pairs(tok, docs, max_len=max_len, seed=4).labels != pairs.labels


def test_only_the_given_documents_are_read(tok):
    """Documents not passed (here: ones marked 'test') never appear in any pair."""
    train = [doc(i) for i in range(N_DOCS)]
    held = [f"test d{N_DOCS + k} s0 . test d{N_DOCS + k} s1 ." for k in range(5)]
    pairs = nsp_pairs(tok, train, max_len=40, seed=0)
    test_ids = {tok.token_to_id("test")} | {tok.token_to_id(f"d{N_DOCS + k}") for k in range(5)}
    assert all(not (set(ids) & test_ids) for ids in pairs.input_ids)
    assert held  # (the held-out documents exist; they were simply never given)


def test_token_type_ids_from_batches(tok):
    pairs = nsp_pairs(tok, [doc(i) for i in range(N_DOCS)], max_len=32, seed=1)
    (batch, *_) = make_batches(pairs.input_ids, pairs.labels, 8, [32], shuffle=True, seed=0, pad_id=tok.pad_id)
    tt = pairs.token_type_ids(batch["index"], batch["attention_mask"])
    for r, i in enumerate(batch["index"].tolist()):
        n = len(pairs.input_ids[i])
        want = [0] * pairs.b_start[i] + [1] * (n - pairs.b_start[i]) + [0] * (32 - n)
        assert tt[r].tolist() == want
        assert batch["labels"][r].item() == pairs.labels[i]


def test_errors(tok):
    with pytest.raises(ValueError, match="max_len"):
        nsp_pairs(tok, [doc(0)], max_len=4)
    with pytest.raises(ValueError, match="two documents"):
        nsp_pairs(tok, [doc(0)], max_len=64)
