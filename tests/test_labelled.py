"""fnlm.data.load_labelled_files: CSV / JSON Lines with any labels, one-line errors naming file and
line; label names travel into config.json so transformers' pipeline prints them."""

import json

import pytest

from fnlm import random
from fnlm.data import DatasetError, load_labelled_files


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def test_csv_string_labels_sorted_like_run_glue(tmp_path):
    tr = write_csv(
        tmp_path / "train.csv",
        ['"good, really",pos', "bad,neg", "meh,neu", "great,pos", "awful,neg", '"so-so\nindeed",neu'],
    )
    va = write_csv(tmp_path / "val.csv", ["fine,pos", "poor,neg"])
    splits, names = load_labelled_files(tr, va)
    assert names == ["neg", "neu", "pos"]  # sorted(set(labels)), as run_glue.py
    assert splits["train"] == (["good, really", "bad", "meh", "great", "awful", "so-so\nindeed"], [2, 0, 1, 2, 0, 1])
    assert splits["validation"] == (["fine", "poor"], [2, 0])
    assert set(splits) == {"train", "validation"}


def test_jsonl_integer_labels_sorted_numerically_and_extra_columns(tmp_path):
    recs = [{"review": f"t{i}", "stars": s, "id": i} for i, s in enumerate([10, 2, 10, 2, 9, 9])]
    tr = write_jsonl(tmp_path / "train.jsonl", recs)
    te = write_csv(tmp_path / "test.csv", ["x,9", "y,10"], header="review,stars")  # "10" == 10
    splits, names = load_labelled_files(tr, test_file=te, text_column="review", label_column="stars")
    assert names == ["2", "9", "10"]
    assert splits["train"][1] == [2, 0, 2, 0, 1, 1] and splits["test"] == (["x", "y"], [1, 2])


def test_json_array_file(tmp_path):
    tr = tmp_path / "train.json"
    tr.write_text(json.dumps([{"text": t, "label": l} for t, l in [("a", 1), ("b", 0), ("c", 1), ("d", 0)]]))
    assert load_labelled_files(tr) == ({"train": (["a", "b", "c", "d"], [1, 0, 1, 0])}, ["0", "1"])


@pytest.mark.parametrize(
    "case, expect",
    [
        ("empty_text", "train.csv: line 3: empty text in column 'text'"),
        ("missing_column", "train.csv: line 1: no column 'label'"),
        ("missing_key_jsonl", "train.jsonl: line 2: no column 'label'"),
        ("once", "train.csv: line 4: label 'neu' occurs only once"),
        ("unknown_val", "val.csv: line 3: label 'neu' does not occur in the training file"),
        ("not_utf8", "train.csv: line 3: not UTF-8"),
        ("bad_json", "train.jsonl: line 2: not a JSON object"),
    ],
)
def test_bad_files_give_one_line_naming_file_and_line(tmp_path, case, expect):
    ok = ["a,pos", "b,neg", "c,pos", "d,neg"]
    va = None
    if case == "empty_text":
        tr = write_csv(tmp_path / "train.csv", ["a,pos", '"  ",neg', "c,pos", "d,neg"])
    elif case == "missing_column":
        tr = write_csv(tmp_path / "train.csv", ok, header="text,sentiment")
    elif case == "missing_key_jsonl":
        tr = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1}, {"text": "b"}])
    elif case == "once":
        tr = write_csv(tmp_path / "train.csv", ["a,pos", "b,neg", "c,neu", "d,pos", "e,neg"])
    elif case == "unknown_val":
        tr = write_csv(tmp_path / "train.csv", ok)
        va = write_csv(tmp_path / "val.csv", ["x,pos", "y,neu"])
    elif case == "not_utf8":
        tr = tmp_path / "train.csv"
        tr.write_bytes("text,label\na,pos\ncaf\xe9,neg\nc,pos\nd,neg\n".encode("latin-1"))
    elif case == "bad_json":
        tr = tmp_path / "train.jsonl"
        tr.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        load_labelled_files(tr, va)
    msg = str(e.value)
    assert "\n" not in msg and expect in msg, msg


def test_label_names_reach_the_transformers_pipeline(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fnlm.models import BertConfig, init_bert_classifier, save_bert

    tr = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": t, "label": l}
            for t, l in [("a", "sad"), ("b", "happy"), ("c", "angry"), ("d", "sad"), ("e", "happy"), ("f", "angry")]
        ],
    )
    splits, names = load_labelled_files(tr)
    vocab = tmp_path / "tok"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]) + "\n")
    cfg = BertConfig(
        vocab_size=7,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=16,
        num_labels=len(names),
        id2label=tuple(names),
    )
    out = save_bert(init_bert_classifier(random.key(0), cfg), cfg, tmp_path / "model", tokenizer_dir=vocab)
    conf = json.loads((out / "config.json").read_text())
    assert conf["id2label"] == {"0": "angry", "1": "happy", "2": "sad"}
    assert conf["label2id"] == {"angry": 0, "happy": 1, "sad": 2}
    pipe = transformers.pipeline("text-classification", model=str(out), tokenizer=str(out), device="cpu", top_k=None)
    got = pipe("good bad")
    got = got[0] if isinstance(got[0], list) else got
    assert sorted(d["label"] for d in got) == ["angry", "happy", "sad"]


def test_imdb_stars_csv_and_tfidf_baseline(tmp_path):
    """benchmarks/imdb_stars_csv.py on a tiny aclImdb folder: the classes come from the file names;
    benchmarks/tfidf_baseline.py scores the CSVs with sklearn's accuracy and macro-F1."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def load(name):
        spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        return m

    words = {
        1: "awful terrible",
        2: "bad awful",
        3: "poor weak",
        4: "weak dull",
        7: "good nice",
        8: "nice fine",
        9: "great superb",
        10: "superb masterpiece",
    }
    for split in ("train", "test"):
        for i, r in enumerate([1, 2, 3, 4, 7, 8, 9, 10] * 3):
            d = tmp_path / "aclImdb" / split / ("pos" if r >= 7 else "neg")
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i}_{r}.txt").write_text(f"{words[r]} film<br />seen {i}", encoding="utf-8")
    out = load("imdb_stars_csv").main(["--data", str(tmp_path), "--out-dir", str(tmp_path / "csv")])
    splits, names = load_labelled_files(out["train"], test_file=out["test"])
    assert names == ["1-2", "3-4", "7-8", "9-10"]
    assert splits["train"][1].count(0) == 6 and "<br" not in splits["train"][0][0]
    texts, ids = splits["test"]
    assert all(
        names[k]
        == {
            "awful": "1-2",
            "bad": "1-2",
            "poor": "3-4",
            "weak": "3-4",
            "good": "7-8",
            "nice": "7-8",
            "great": "9-10",
            "superb": "9-10",
        }[t.split()[0]]
        for t, k in zip(texts, ids)
    )
    res = load("tfidf_baseline").main(["--train-file", str(out["train"]), "--test-file", str(out["test"])])
    assert res["test_size"] == 24 and 0 <= res["macro_f1"] <= 1 and 0.25 <= res["accuracy"] <= 1
