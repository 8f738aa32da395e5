"""fnlm.data: reading IMDb in its official layout, subsets, downloads, length-bucketed batches."""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from fnlm.data import (
    DatasetError,
    DownloadError,
    IMDb,
    bucket_lengths,
    choose_buckets,
    download_imdb,
    html_clean,
    load_imdb,
    load_imdb_splits,
    make_batches,
    padding_efficiency,
    subset,
)
from fnlm.data import _imdb as imdb_mod
from fnlm.nn import cross_entropy

# (split, sentiment, id, rating) -> text. Ids chosen so numeric and string order differ.
TINY = {
    ("train", "pos", 3, 9): "Loved it.<br /><br />Ten stars?",
    ("train", "pos", 10, 7): "Pretty good — café scenes, naïve plot.",
    ("train", "pos", 1, 8): "Great fun",
    ("train", "neg", 2, 1): "Awful.",
    ("train", "neg", 0, 4): "Meh 中文",
    ("test", "pos", 0, 10): "Masterpiece",
    ("test", "neg", 5, 2): "Boring",
    ("test", "neg", 4, 3): "Too long",
}
UNSUP = {("train", "unsup", 0, 0): "no label here"}


def expected(split):
    """Examples of ``split`` sorted by (label, id), derived from TINY directly."""
    rows = [(1 if s == "pos" else 0, i, r, t) for (sp, s, i, r), t in TINY.items() if sp == split]
    rows.sort(key=lambda x: (x[0], x[1]))
    return rows


def write_tree(root, reviews=None, extra=True):
    reviews = TINY if reviews is None else reviews
    base = root / "aclImdb"
    for (split, sent, i, r), text in {**reviews, **(UNSUP if extra else {})}.items():
        d = base / split / sent
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}_{r}.txt").write_text(text, encoding="utf-8")
    if extra:
        for split in ("train", "test"):
            (base / split / "urls_pos.txt").write_text("http://www.imdb.com/title/tt0000001/usercomments\n")
    return base


def write_tar(path, root, *, prefix="", reverse=True, mode="w:gz"):
    """A tar archive of the files under ``root`` (members in reverse order: the reader must sort)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if reverse:
        files = files[::-1]
    with tarfile.open(path, mode) as tf:
        for p in files:
            tf.add(p, arcname=prefix + str(p.relative_to(root)))
    return path


def as_rows(ds: IMDb):
    return list(zip(ds.labels, ds.ids, ds.ratings, ds.texts))


@pytest.fixture
def tiny_dir(tmp_path):
    write_tree(tmp_path / "tree")
    return tmp_path / "tree"


@pytest.fixture
def tiny_tar(tmp_path, tiny_dir):
    return write_tar(tmp_path / "tiny.tar.gz", tiny_dir)


# ----------------------------------------------------------------------------- tiny layout
@pytest.mark.parametrize("split", ["train", "test"])
def test_tiny_folder_and_archive_agree_with_what_was_written(tiny_dir, tiny_tar, tmp_path, split):
    want = [(lab, i, r, t) for lab, i, r, t in expected(split)]
    sources = [
        tiny_dir,
        tiny_dir / "aclImdb",
        tiny_tar,
        write_tar(tmp_path / "dot.tar.gz", tiny_dir, prefix="./", reverse=False),
        write_tar(tmp_path / "plain.tar", tiny_dir, mode="w"),
    ]
    for src in sources:
        ds = load_imdb(src, split)
        assert as_rows(ds) == want, src
        assert list(ds) == [(t, lab) for lab, _, _, t in want]  # behaves like list[(text, label)]
        assert ds.split == split


def test_tiny_counts_labels_order(tiny_tar):
    train = load_imdb(tiny_tar, "train")
    assert len(train) == 5 and train.counts() == {0: 2, 1: 3}
    assert train.ids == [0, 2, 1, 3, 10]  # neg sorted by id, then pos sorted numerically
    assert train.labels == [0, 0, 1, 1, 1]
    assert "no label here" not in train.texts  # unsup skipped
    assert train[4] == ("Pretty good — café scenes, naïve plot.", 1)
    both = load_imdb_splits(tiny_tar)
    assert as_rows(both["train"]) == as_rows(train) and len(both["test"]) == 3


def test_html_clean():
    assert html_clean("Loved it.<br /><br />Ten stars?") == "Loved it.  Ten stars?"
    assert html_clean("a<br/>b<BR>c<br  />d") == "a b c d"
    assert html_clean("no tags") == "no tags"


# ----------------------------------------------------------------------------- errors
def test_missing_path(tmp_path):
    p = tmp_path / "nope.tar.gz"
    with pytest.raises(DatasetError, match="does not exist") as e:
        load_imdb(p)
    assert str(p) in str(e.value)


def test_foreign_file(tmp_path):
    p = tmp_path / "notes.tar.gz"
    p.write_text("this is just a text file that someone renamed\n" * 50)
    with pytest.raises(DatasetError, match="not a tar.gz archive") as e:
        load_imdb(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("keep", [0.002, 0.3, 0.6, 0.9, -4, "crc"])
def test_truncated_archive(tmp_path, keep):
    """Cut at a fraction of the bytes, or only the gzip trailer (-4), or a flipped CRC byte."""
    rng = np.random.default_rng(0)
    words = np.array("good bad plot actor scene film boring great awful music".split())
    reviews = {
        ("train", s, i, 8 if s == "pos" else 2): " ".join(rng.choice(words, 400))
        for s in ("pos", "neg")
        for i in range(20)
    }
    reviews[("test", "pos", 0, 9)] = "x"
    reviews[("test", "neg", 0, 1)] = "y"
    write_tree(tmp_path / "t", reviews)
    full = write_tar(tmp_path / "full.tar.gz", tmp_path / "t")
    data = full.read_bytes()
    assert len(load_imdb(full, "train")) == 40  # the intact archive is fine
    cut = tmp_path / "cut.tar.gz"
    if keep == "crc":
        bad = bytearray(data)
        bad[-6] ^= 0xFF
        cut.write_bytes(bytes(bad))
    else:
        cut.write_bytes(data[:keep] if isinstance(keep, int) else data[: max(4, int(len(data) * keep))])
    with pytest.raises(DatasetError, match="truncated or corrupt") as e:
        load_imdb(cut, "train")
    assert str(cut) in str(e.value)


def test_wrong_layout_archive(tmp_path):
    (tmp_path / "x" / "reviews").mkdir(parents=True)
    (tmp_path / "x" / "reviews" / "a.txt").write_text("hello")
    p = write_tar(tmp_path / "other.tar.gz", tmp_path / "x")
    with pytest.raises(DatasetError, match="IMDb layout") as e:
        load_imdb(p)
    msg = str(e.value)
    assert str(p) in msg and "reviews/a.txt" in msg and "aclImdb/train/pos" in msg


def test_wrong_layout_folder(tmp_path):
    write_tree(tmp_path / "half", {k: v for k, v in TINY.items() if k[1] == "pos"}, extra=False)
    with pytest.raises(DatasetError, match="aclImdb/train/neg") as e:
        load_imdb(tmp_path / "half", "train")
    assert str(tmp_path / "half") in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="found nothing"):
        load_imdb(empty)


def test_badly_named_review(tmp_path):
    write_tree(tmp_path / "t")
    (tmp_path / "t" / "aclImdb" / "train" / "pos" / "review.txt").write_text("?")
    with pytest.raises(DatasetError, match="review.txt"):
        load_imdb(tmp_path / "t")


def test_bad_split(tiny_tar):
    with pytest.raises(ValueError, match="unsup"):
        load_imdb(tiny_tar, "unsup")


# ----------------------------------------------------------------------------- real archive
@pytest.fixture(scope="module")
def real(imdb_archive):
    return load_imdb_splits(imdb_archive)


def test_real_archive_counts_and_labels(real):
    train, test = real["train"], real["test"]
    assert train.counts() == {0: 12498, 1: 12498}
    assert test.counts() == {0: 12500, 1: 12496}
    for ds in (train, test):
        lab, rat = np.array(ds.labels), np.array(ds.ratings)
        assert ((rat >= 7) == (lab == 1)).all() and ((rat <= 4) == (lab == 0)).all()  # README's rule
        keys = list(zip(ds.labels, ds.ids))
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        assert all(isinstance(t, str) and t.strip() for t in ds.texts)
    # documented exclusions (replaced reviews) are absent; their neighbours are present
    pos_train = set(
        zip(np.array(train.ids)[np.array(train.labels) == 1], np.array(train.ratings)[np.array(train.labels) == 1])
    )
    assert (0, 9) not in pos_train and (7, 7) not in pos_train
    assert sum("<br />" in t for t in train.texts) > 10000  # raw text, tags kept


# ----------------------------------------------------------------------------- subset
def test_subset_balanced_deterministic(tiny_tar):
    data = [(f"t{i}", i % 2) for i in range(100)] + [(f"extra{i}", 0) for i in range(50)]
    a = subset(data, 20, seed=1)
    assert a == subset(data, 20, seed=1)
    assert a != subset(data, 20, seed=2)
    assert Counter(lab for _, lab in a) == {0: 10, 1: 10}
    assert len(set(a)) == 20 and set(a) <= set(data)
    assert [data.index(x) for x in a] == sorted(data.index(x) for x in a)  # original order kept
    assert Counter(lab for _, lab in subset(data, 7, seed=0)) == {0: 4, 1: 3}
    with pytest.raises(ValueError):
        subset(data, 151, seed=0)
    with pytest.raises(ValueError, match="label 1"):
        subset(data, 120, seed=0)  # only 50 positives
    ds = subset(load_imdb(tiny_tar), 4, seed=0)
    assert isinstance(ds, IMDb) and ds.counts() == {0: 2, 1: 2}


# ----------------------------------------------------------------------------- download
def test_download_offline_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(imdb_mod, "IMDB_URL", "http://127.0.0.1:9/aclImdb_v1.tar.gz")
    with pytest.raises(DownloadError, match="--data PATH") as e:
        download_imdb(tmp_path)
    assert "offline" in str(e.value) and "127.0.0.1:9" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_download_checks_sha256_and_caches(tmp_path, tiny_tar):
    url = tiny_tar.as_uri()  # file:// is served by urllib like any URL
    digest = hashlib.sha256(tiny_tar.read_bytes()).hexdigest()
    with pytest.raises(DownloadError, match="sha256"):
        download_imdb(tmp_path / "c1", url=url, sha256="0" * 64)
    assert os.listdir(tmp_path / "c1") == []  # no partial or wrong file left
    got = download_imdb(tmp_path / "c2", url=url, sha256=digest)
    assert got.read_bytes() == tiny_tar.read_bytes()
    assert as_rows(load_imdb(got)) == as_rows(load_imdb(tiny_tar))
    tiny_tar.unlink()  # cached: a second call does not download again
    assert download_imdb(tmp_path / "c2", url=url, sha256=digest) == got


def test_official_checksum_constant():
    assert imdb_mod.IMDB_SHA256 == "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
    assert imdb_mod.IMDB_URL == "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"


# ----------------------------------------------------------------------------- batching
def test_bucket_lengths():
    assert bucket_lengths(512) == [64, 128, 256, 512]
    assert bucket_lengths(256, n=3) == [64, 128, 256]
    for max_len in (8, 100, 300, 384, 510, 512):
        for n in (1, 2, 4, 6):
            b = bucket_lengths(max_len, n)
            assert b[-1] == max_len and b == sorted(set(b)) and len(b) <= n
            assert all(x % 8 == 0 for x in b[:-1])


def skewed(n=1000, seed=0, max_len=256):
    """Unique sequences with long-tailed lengths: [CLS] i-marker ... [SEP]."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.0, 0.8, n).astype(int), 3, max_len)
    seqs = [[101, 1000 + i] + [5 + (i * 7 + j) % 90 for j in range(L - 3)] + [102] for i, L in enumerate(lengths)]
    labels = [int(rng.integers(0, 2)) for _ in range(n)]
    return seqs, labels


def real_rows(batch):
    """(tokens, label) of each non-dummy row, read from the tensors via the attention mask."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        if batch["weight"][r] == 0:
            continue
        m = batch["attention_mask"][r].bool()
        out.append((tuple(batch["input_ids"][r][m].tolist()), int(batch["labels"][r])))
    return out


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_example_once_per_epoch(drop_last):
    seqs, labels = skewed(1003)
    buckets = bucket_lengths(256)
    batches = make_batches(
        seqs, labels, 32, buckets, shuffle=True, seed=3, pad_id=0, drop_last=drop_last, chunk_batches=5
    )
    rows = [row for b in batches for row in real_rows(b)]
    want = Counter((tuple(s), lab) for s, lab in zip(seqs, labels))
    got = Counter(rows)
    if drop_last:
        assert len(rows) == 1003 - 1003 % 32 and not (got - want)  # a subset, no repeats
        assert all(b["weight"].min() == 1 for b in batches)
    else:
        assert got == want
    for b in batches:
        B, L = b["input_ids"].shape
        assert B == 32 and L in buckets
        for k in ("input_ids", "attention_mask", "token_type_ids", "labels", "index"):
            assert b[k].dtype == torch.int64
        m = b["attention_mask"]
        real = b["weight"] > 0
        lens = m[real].sum(1)
        assert L == min(x for x in buckets if x >= lens.max())  # the smallest bucket that fits
        assert (m[real].cumsum(1).max(1).values == lens).all() and (m[real][:, :1] == 1).all()  # mask is a prefix
        assert (b["input_ids"][m == 0] == 0).all()  # padding positions hold pad_id
        assert (b["token_type_ids"] == 0).all()
        idx = b["index"][real]
        assert [seqs[i] for i in idx.tolist()] == [list(t) for t, _ in real_rows(b)]


def test_dummy_rows_pad_the_last_batch_and_are_ignored_by_the_loss():
    seqs, labels = skewed(70)
    batches = make_batches(seqs, labels, 32, [64, 128, 256], seed=0, pad_id=0)
    assert len(batches) == 3 and sum(int(b["weight"].sum()) for b in batches) == 70
    last = next(b for b in batches if b["weight"].min() == 0)
    dummy = last["weight"] == 0
    assert int(dummy.sum()) == 32 * 3 - 70
    assert (last["index"][dummy] == -1).all() and (last["input_ids"][dummy] == 0).all()
    assert (last["attention_mask"][dummy].sum(1) == 1).all()  # one position, so no all-masked softmax
    logits = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    logits[dummy] = 1e4  # whatever dummy rows predict must not matter
    manual = torch.nn.functional.cross_entropy(logits[~dummy], last["labels"][~dummy])
    torch.testing.assert_close(cross_entropy(logits, last["labels"], weight=last["weight"]), manual)


def test_deterministic_by_seed_and_epoch():
    seqs, labels = skewed(300)
    mk = lambda **kw: make_batches(seqs, labels, 16, [32, 64, 128, 256], pad_id=0, **kw)  # noqa: E731
    a, b = mk(seed=7), mk(seed=7)
    assert len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    order = lambda bs: torch.cat([x["index"] for x in bs]).tolist()  # noqa: E731
    assert order(mk(seed=8)) != order(a) and order(mk(seed=7, epoch=1)) != order(a)
    plain = mk(shuffle=False)
    assert [i for i in order(plain) if i >= 0] == list(range(300))


def test_bucketing_beats_naive_padding_on_skewed_lengths():
    seqs, labels = skewed(2000, max_len=512)
    lengths = np.array([len(s) for s in seqs])
    naive = lengths.sum() / (len(seqs) * 512)
    sorted_b = make_batches(seqs, labels, 32, bucket_lengths(512), seed=0, pad_id=0, chunk_batches=50)
    random_b = make_batches(seqs, labels, 32, bucket_lengths(512), seed=0, pad_id=0, chunk_batches=1)
    eff = padding_efficiency(sorted_b)
    total = sum(b["input_ids"].numel() for b in sorted_b)
    assert eff == pytest.approx(lengths.sum() / total)  # independent count: real tokens / positions
    assert eff > padding_efficiency(random_b) > naive
    assert eff > 2 * naive
    assert len({b["input_ids"].shape[1] for b in sorted_b}) <= 4  # few shapes -> few recompiles


def test_batching_errors():
    with pytest.raises(ValueError, match=r"token_ids\[1\].*300"):
        make_batches([[1, 2], [1] * 300], [0, 1], 2, [64, 128])
    with pytest.raises(ValueError, match="labels"):
        make_batches([[1, 2]], [0, 1], 2, [64])
    with pytest.raises(ValueError, match="buckets"):
        make_batches([[1, 2]], [0], 2, [])
    assert make_batches([], [], 4, [8]) == []


def test_choose_buckets_keeps_a_bucket_only_when_it_pays_for_its_compilation():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(np.log(230), 0.6, 25_000).astype(int) + 2, 512)  # IMDb-like
    # a small run: too few short batches to pay for compiling a second step
    assert choose_buckets(lengths[:2000], 256, 16) == [256]
    # the full dataset at 512 tokens for 3 epochs: shorter buckets pay off
    many = choose_buckets(lengths, 512, 16, epochs=3)
    assert many[-1] == 512 and len(many) >= 3 and many == sorted(many)
    assert set(many) <= set(bucket_lengths(512, 4))
    # the rule itself: 128 is kept exactly when the 256-batches it takes over save >= compile_cost steps
    lens = [100] * 16 * 60 + [250] * 160  # 60 batches fit 128: 60 * (256 - 128) / 256 = 30 steps saved
    assert choose_buckets(lens, 256, 16, compile_cost=30) == [128, 256]
    assert choose_buckets(lens, 256, 16, compile_cost=31) == [256]
    assert choose_buckets(lens, 256, 16, compile_cost=31, epochs=2) == [128, 256]
