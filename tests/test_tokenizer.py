"""fnlm.tokenizer against transformers' pure-Python BERT tokenizer (the reference).

In transformers >= 5 ``BertTokenizer`` is itself backed by the Rust ``tokenizers`` library, so
the independent reference is ``BertTokenizerLegacy`` (the original Python WordPiece); with
transformers 4 it is ``BertTokenizer``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fnlm.data import WordPieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
try:
    from transformers.models.bert import BertTokenizerLegacy as SlowBertTokenizer
except ImportError:  # transformers 4: BertTokenizer is the slow Python one
    from transformers import BertTokenizer as SlowBertTokenizer

TRICKY = [
    "Café naïve Ångström, résumé — façade",
    "Hello, world!!! (really?) -- 'single' \"double\" ... end.",
    "中文字符 and mixed中文text",
    "A great movie.<br /><br />Would watch again!",
    "emoji 😀👍🏽 and symbols ™ © ½ → ∞",
    "x" * 101,  # longer than max_input_chars_per_word=100 -> [UNK]
    "y" * 100,  # exactly 100 chars: still word-pieced
    "",
    "   \t\n  ",
    "literal specials: hello[SEP]world [CLS] [MASK]",
    "control\u0000chars\u200b and\u00a0nbsp\ufffd",
    "don't won't U.S.A. 3.14 $5,000 e-mail",
    "ＦＵＬＬＷＩＤＴＨ ｱｲｳ İstanbul straße ﬁne",
]
PAIRS = [
    ("How old are you?", "I am six."),
    ("Café", ""),
    ("", "only the second"),
    ("中文", "English <br /> text!"),
]

# A small *cased* vocabulary: upper and lower case forms are different tokens, accents kept.
CASED_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "Hello",
    "hello",
    "World",
    "world",
    "Café",
    "cafe",
    "café",
    "Caf",
    "##é",
    "na",
    "##ïve",
    "Å",
    "##ng",
    "##str",
    "##öm",
    "The",
    "the",
    "movie",
    "Movie",
    "was",
    "great",
    "GREAT",
    "!",
    ",",
    ".",
    "?",
    "'",
    "-",
    "<",
    ">",
    "/",
    "br",
    "中",
    "文",
    "##s",
    "##ing",
    "play",
    "a",
    "b",
    "c",
    "##a",
    "##b",
    "##c",
    "I",
    "i",
    "##I",
]


@pytest.fixture(scope="module")
def uncased(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def uncased_ref(minilm_dir):
    return SlowBertTokenizer(str(minilm_dir / "vocab.txt"), do_lower_case=True)


@pytest.fixture(scope="module")
def uncased_from_vocab(minilm_dir, tmp_path_factory):
    """The same tokenizer, built from vocab.txt alone (no tokenizer.json, no config)."""
    d = tmp_path_factory.mktemp("vocab_only")
    shutil.copy(minilm_dir / "vocab.txt", d / "vocab.txt")
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def cased_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cased")
    (d / "vocab.txt").write_text("".join(t + "\n" for t in CASED_VOCAB), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}), encoding="utf-8")
    return d


def _ref_ids(ref, text, pair=None, **kw):
    out = ref(text, pair, return_token_type_ids=True, **kw)
    return out["input_ids"], out["token_type_ids"]


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("which", ["tokenizer_json", "vocab_txt"])
@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_single_matches_reference(which, text, uncased, uncased_from_vocab, uncased_ref):
    tok = uncased if which == "tokenizer_json" else uncased_from_vocab
    ids, types = _ref_ids(uncased_ref, text)
    assert tok.encode_ids([text])[0] == ids
    enc = tok.encode([text])
    assert enc["input_ids"][0].tolist() == ids
    assert enc["attention_mask"][0].tolist() == [1] * len(ids)
    assert enc["token_type_ids"][0].tolist() == types == [0] * len(ids)


def test_special_cases_by_value(uncased, uncased_ref):
    """Spot checks stated independently of the reference."""
    cls, sep, unk = uncased_ref.cls_token_id, uncased_ref.sep_token_id, uncased_ref.unk_token_id
    assert uncased.encode_ids([""])[0] == [cls, sep]
    assert uncased.encode_ids(["  \t\n "])[0] == [cls, sep]
    assert uncased.encode_ids(["x" * 101])[0] == [cls, unk, sep]
    assert uncased.tokenize("Café naïve") == ["cafe", "naive"]  # uncased BERT strips accents
    assert uncased.tokenize("中文") == ["中", "文"]  # CJK characters become single tokens
    assert "<" in uncased.tokenize("a<br />b") and "br" in uncased.tokenize("a<br />b")


def test_batch_padding_longest_matches_reference(uncased, uncased_ref):
    ref = uncased_ref(TRICKY, padding="longest", return_token_type_ids=True)
    enc = uncased.encode(TRICKY, padding="longest")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert enc[k].dtype == torch.int64
        assert enc[k].tolist() == ref[k], k
    assert enc["input_ids"].shape == (len(TRICKY), max(sum(m) for m in ref["attention_mask"]))


def test_padding_max_length(uncased, uncased_ref):
    enc = uncased.encode(["short one", "a bit longer than the first"], max_len=16, padding="max_length")
    ref = uncased_ref(
        ["short one", "a bit longer than the first"], padding="max_length", max_length=16, return_token_type_ids=True
    )
    assert enc["input_ids"].shape == (2, 16)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert enc[k].tolist() == ref[k]
    assert (enc["input_ids"][enc["attention_mask"] == 0] == uncased_ref.pad_token_id).all()
    lists = uncased.encode(["short one"], max_len=16, padding="max_length", return_tensors=False)
    assert lists["input_ids"] == ref["input_ids"][:1]


def test_pairs_match_reference(uncased, uncased_ref):
    a, b = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    ref = uncased_ref(a, b, padding="longest", return_token_type_ids=True)
    enc = uncased.encode(a, b)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert enc[k].tolist() == ref[k], k
    assert 1 in enc["token_type_ids"][0].tolist()  # the second segment is type 1


@pytest.mark.parametrize(
    "na,nb,max_len",
    [(20, 3, 12), (3, 20, 12), (10, 10, 12), (10, 9, 12), (9, 10, 12), (30, 30, 13), (5, 5, 13), (2, 40, 8), (1, 1, 3)],
)
def test_pair_truncation_matches_longest_first(uncased, uncased_ref, na, nb, max_len):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    a = " ".join(words[i % len(words)] for i in range(na))
    b = " ".join(words[(i + 5) % len(words)] for i in range(nb))
    ids, types = _ref_ids(uncased_ref, a, b, truncation="longest_first", max_length=max_len)
    enc = uncased.encode([a], [b], max_len=max_len)
    assert enc["input_ids"][0].tolist() == ids
    assert enc["token_type_ids"][0].tolist() == types


def test_long_text_not_cut_by_tokenizer_json(uncased, uncased_ref):
    """The MiniLM tokenizer.json ships with truncation to 128 and padding; both must be off."""
    text = " ".join(["wonderful acting but a weak plot"] * 60)  # ~360 word pieces
    ids, _ = _ref_ids(uncased_ref, text, truncation=True, max_length=512)
    assert len(ids) > 300
    assert uncased.encode_ids([text], max_len=512)[0] == ids


# ----------------------------------------------------------------------------- cased vocab
CASED_TEXTS = [
    "Hello World!",
    "hello world",
    "The movie was GREAT, the Movie was great.",
    "Café café cafe",
    "naïve Ångström",
    "playing plays I i",
    "中文 <br /> abc",
    "",
    "xyz?",
]


@pytest.mark.parametrize("text", CASED_TEXTS)
def test_cased_vocab_matches_reference(cased_dir, text):
    ref = SlowBertTokenizer(str(cased_dir / "vocab.txt"), do_lower_case=False)
    for tok in (load_tokenizer(cased_dir), WordPieceTokenizer.from_vocab(cased_dir / "vocab.txt", lowercase=False)):
        assert not tok.do_lower_case
        assert tok.encode_ids([text])[0] == ref(text)["input_ids"]


def test_cased_keeps_case_and_accents(cased_dir):
    tok = load_tokenizer(cased_dir)
    v = {t: i for i, t in enumerate(CASED_VOCAB)}
    assert tok.tokenize("Hello hello") == ["Hello", "hello"]
    assert tok.encode_ids(["Café café"])[0] == [v["[CLS]"], v["Café"], v["café"], v["[SEP]"]]
    # the same vocabulary read as uncased lowercases and strips accents
    lower = WordPieceTokenizer.from_vocab(cased_dir / "vocab.txt", lowercase=True)
    assert lower.tokenize("Hello Café") == ["hello", "cafe"]


# ----------------------------------------------------------------------------- truncation
@pytest.fixture(scope="module")
def long_review():
    return " ".join(f"word{i} is here , and" for i in range(200))


def test_head_truncation_matches_reference(uncased, uncased_ref, long_review):
    for max_len in (2, 3, 17, 64, 511):
        ids, _ = _ref_ids(uncased_ref, long_review, truncation=True, max_length=max_len)
        assert uncased.encode_ids([long_review], max_len=max_len)[0] == ids
        assert len(ids) == max_len


@pytest.mark.parametrize("max_len,head", [(64, 16), (64, 0), (64, 62), (64, 100), (32, None), (512, None)])
def test_head_tail_truncation_keeps_first_and_last(uncased, uncased_ref, long_review, max_len, head):
    pieces = uncased_ref.encode(long_review, add_special_tokens=False)
    assert len(pieces) > 600
    budget = max_len - 2
    h = max_len // 4 if head is None else min(head, budget)
    expected = [uncased_ref.cls_token_id, *pieces[:h], *pieces[len(pieces) - (budget - h) :], uncased_ref.sep_token_id]
    got = uncased.encode_ids([long_review], max_len=max_len, truncation="head+tail", head_tokens=head)[0]
    assert got == expected
    assert len(got) == max_len


def test_head_tail_default_is_128_of_510(uncased, uncased_ref, long_review):
    pieces = uncased_ref.encode(long_review, add_special_tokens=False)
    got = uncased.encode_ids([long_review], max_len=512, truncation="head+tail")[0]
    assert got[1:129] == pieces[:128] and got[129:-1] == pieces[-382:]


ADVERSARIAL_LONG = [
    " ".join(["x" * 150] * 60),  # every word is [UNK]: 151 characters per word piece
    "start " + " " * 3000 + " ".join(f"tok{i}" for i in range(400)) + " " * 3000 + " end",
    "cafe\u0301 nai\u0308ve " * 300,  # combining accents (stripped by the uncased normalizer)
    "中文字符" * 800,  # no spaces at all
    "A\tB\nC\r\nD " * 400 + "[SEP] [MASK]" * 50,
    " ".join(["supercalifragilistic"] * 300) + " ." * 200,
    "short",
]


@pytest.mark.parametrize("which", ["tokenizer_json", "vocab_txt"])
def test_truncation_of_adversarial_long_texts(which, uncased, uncased_from_vocab, uncased_ref, long_review):
    """Long texts are tokenized only at their ends; the result must equal full tokenization."""
    tok = uncased if which == "tokenizer_json" else uncased_from_vocab
    texts = [long_review, *ADVERSARIAL_LONG]
    pieces = [uncased_ref.encode(t, add_special_tokens=False) for t in texts]
    cls, sep = uncased_ref.cls_token_id, uncased_ref.sep_token_id
    for max_len in (3, 8, 64, 130, 512):
        budget = max_len - 2
        for mode in ("head", "head+tail"):
            h = budget if mode == "head" else max_len // 4
            want = [
                [cls, *p, sep] if len(p) <= budget else [cls, *p[:h], *p[len(p) - (budget - h) :], sep] for p in pieces
            ]
            assert tok.encode_ids(texts, max_len=max_len, truncation=mode) == want, (max_len, mode)


def test_short_text_unaffected_by_truncation_mode(uncased):
    t = ["a short review"]
    assert uncased.encode_ids(t, 64, "head") == uncased.encode_ids(t, 64, "head+tail")


# ----------------------------------------------------------------------------- API
def test_special_ids_and_vocab_size(uncased, uncased_ref):
    assert uncased.vocab_size == len(uncased_ref.vocab) == 30522
    assert uncased.pad_id == uncased_ref.pad_token_id == 0
    assert uncased.cls_id == uncased_ref.cls_token_id == 101
    assert uncased.sep_id == uncased_ref.sep_token_id == 102
    assert uncased.mask_id == uncased_ref.mask_token_id == 103
    assert uncased.decode(uncased.encode_ids(["Hello, World!"])[0]) == "hello, world!"


def test_validation(uncased):
    with pytest.raises(ValueError, match="max_len"):
        uncased.encode(["hi"], max_len=1)
    with pytest.raises(ValueError, match="max_len"):
        uncased.encode_ids(["hi"], max_len=2, pairs=["there"])  # a pair needs 3 positions
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        uncased.encode(["fine", 3, "fine"])
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        uncased.encode(["fine"], [None])
    with pytest.raises(ValueError, match="pairs"):
        uncased.encode(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="truncation"):
        uncased.encode(["a"], truncation="tail")
    with pytest.raises(ValueError, match="padding"):
        uncased.encode(["a"], padding="max")
    with pytest.raises(FileNotFoundError):
        load_tokenizer("/nonexistent/tokenizer/dir")


def test_single_string_is_a_batch_of_one(uncased):
    assert uncased.encode("hello there")["input_ids"].tolist() == uncased.encode(["hello there"])["input_ids"].tolist()
    assert uncased.encode([])["input_ids"].shape == (0, 0)


def test_save_is_loadable_by_transformers(uncased, cased_dir, tmp_path):
    texts = ["Hello World! Café", "中文 <br /> MOVIE"]
    for name, tok in (("uncased", uncased), ("cased", load_tokenizer(cased_dir))):
        d = tok.save(tmp_path / name)
        ours = tok.encode(texts)["input_ids"].tolist()
        slow = SlowBertTokenizer.from_pretrained(str(d))
        auto = transformers.AutoTokenizer.from_pretrained(str(d))
        again = load_tokenizer(d)
        from_vocab = WordPieceTokenizer.from_vocab(d / "vocab.txt", lowercase=tok.do_lower_case)
        assert slow(texts, padding=True)["input_ids"] == ours, name
        assert auto(texts, padding=True)["input_ids"] == ours, name
        assert again.encode(texts)["input_ids"].tolist() == ours, name
        assert from_vocab.encode(texts)["input_ids"].tolist() == ours, name


# ----------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_encodes_all_imdb_train_reviews(uncased, uncased_ref, imdb_archive):
    from fnlm.data import load_imdb

    train = load_imdb(imdb_archive, "train")
    ids = uncased.encode_ids(train.texts, max_len=512, truncation="head+tail")
    assert len(ids) == len(train) == 24996
    assert all(r[0] == 101 and r[-1] == 102 and 2 < len(r) <= 512 for r in ids)
    # tokenizing only the ends of long reviews == tokenizing them in full, then cutting
    full = [e.ids for e in uncased.backend.encode_batch(train.texts, add_special_tokens=False)]
    for mode, h in (("head", 510), ("head+tail", 128)):
        got = ids if mode == "head+tail" else uncased.encode_ids(train.texts, max_len=512, truncation=mode)
        assert got == [[101, *p, 102] if len(p) <= 510 else [101, *p[:h], *p[len(p) - (510 - h) :], 102] for p in full]
    assert sum(len(p) > 510 for p in full) > 3000  # many reviews really are cut
    for i in range(0, len(train), 997):  # a spread-out sample against the slow reference
        ref = uncased_ref(train.texts[i], truncation=True, max_length=512)["input_ids"]
        head = uncased.encode_ids([train.texts[i]], max_len=512)[0]
        assert head == ref
        if len(ref) < 512:
            assert ids[i] == ref
