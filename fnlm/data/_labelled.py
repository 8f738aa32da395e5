"""Labelled text from your own files: CSV with a header, or JSON Lines, one example a row.

:func:`load_labelled_files` reads a train file and optional validation/test files (as
``transformers``' ``run_glue.py`` takes ``--train_file``/``--validation_file``/``--test_file``)
into ``(texts, label_ids)`` per split plus the label names. Labels may be strings or integers;
the names are the distinct train labels sorted as ``run_glue.py`` sorts them (numerically when
every label is an integer, else as strings), and label id ``i`` is ``label_names[i]``. Every user
mistake is one :class:`~fnlm.data.DatasetError` line naming the file and the row (the line of
the file): an empty text, a missing column, a label seen only once in train, a validation/test
label train never saw, a file that is not UTF-8, a JSON line that does not parse.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

from fnlm.data._imdb import DatasetError

#: File suffixes read as CSV (``.tsv``: tab-separated) and as JSON Lines.
CSV_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
_INT = re.compile(r"[+-]?\d+")


def _text_of(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}: line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "re-save the file as UTF-8"
        ) from None


def _label_key(value, path: Path, line: int, column: str) -> str:
    """A label as a string key: integers (JSON ints, CSV digits) as their decimal form."""
    if isinstance(value, bool) or value is None or not isinstance(value, (int, str)):
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        raise DatasetError(
            f"{path}: line {line}: label column {column!r} must hold a string or an integer, got {value!r}"
        )
    if isinstance(value, int):
        return str(value)
    v = value.strip()
    if not v:
        raise DatasetError(f"{path}: line {line}: empty label in column {column!r}")
    return str(int(v)) if _INT.fullmatch(v) else v


def _rows(path: Path, text_column: str, label_column: str) -> list[tuple[int, str, str]]:
    """``(line, text, label key)`` for every example of ``path``."""
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + JSON_SUFFIXES:
        raise DatasetError(
            f"{path}: unknown file type {suffix or '(no suffix)'!r}: expected CSV "
            f"({', '.join(CSV_SUFFIXES)}) with a header or JSON Lines ({', '.join(JSON_SUFFIXES)})"
        )
    content = _text_of(path)
    out: list[tuple[int, str, str]] = []

    def add(line: int, rec: dict) -> None:
        for col in (text_column, label_column):
            if col not in rec:
                raise DatasetError(
                    f"{path}: line {line}: no column {col!r} (columns: {', '.join(map(str, rec))}); "
                    f"pass --text-column/--label-column"
                )
        text = rec[text_column]
        if not isinstance(text, str):
            raise DatasetError(f"{path}: line {line}: text column {text_column!r} must hold a string, got {text!r}")
        if not text.strip():
            raise DatasetError(f"{path}: line {line}: empty text in column {text_column!r}")
        out.append((line, text, _label_key(rec[label_column], path, line, label_column)))

    if suffix in CSV_SUFFIXES:
        reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path}: empty file: expected a header line naming the columns")
            header = [h.strip() for h in header]
            for col in (text_column, label_column):
                if col not in header:
                    raise DatasetError(
                        f"{path}: line 1: no column {col!r} in the header (columns: "
                        f"{', '.join(header)}); pass --text-column/--label-column"
                    )
            start = reader.line_num + 1
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    start = reader.line_num + 1
                    continue
                if len(row) != len(header):
                    raise DatasetError(f"{path}: line {start}: {len(row)} fields, the header has {len(header)}")
                add(start, dict(zip(header, row)))
                start = reader.line_num + 1
        except csv.Error as e:
            raise DatasetError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    elif suffix == ".json" and content.lstrip().startswith("["):  # one JSON array of objects
        try:
            records = json.loads(content)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        for i, rec in enumerate(records, 1):
            if not isinstance(rec, dict):
                raise DatasetError(f"{path}: record {i}: expected a JSON object, got {type(rec).__name__}")
            add(i, rec)
    else:
        for i, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    f"{path}: line {i}: not a JSON object ({e.msg}); expected JSON Lines, one object per line"
                ) from None
            if not isinstance(rec, dict):
                raise DatasetError(f"{path}: line {i}: expected a JSON object, got {type(rec).__name__}")
            add(i, rec)
    if not out:
        raise DatasetError(f"{path}: no examples")
    return out


def load_labelled_files(
    train_file: str | os.PathLike,
    validation_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    """``(splits, label_names)``: ``splits[name] = (texts, label_ids)`` for ``'train'`` and each
    given ``'validation'``/``'test'`` file; ``label_ids[j] = label_names.index(label of row j)``.

    Files: CSV with a header (``.csv``; ``.tsv`` tab-separated) or JSON Lines (``.json``,
    ``.jsonl``, ``.ndjson``; a ``.json`` file may also be one array of objects, rows then
    numbered by record), UTF-8, columns ``text_column`` and ``label_column`` (others are
    ignored). Labels: strings or integers (``"3"`` and ``3`` are the same label); names sorted
    numerically when all are integers, else as strings. Raises :class:`~fnlm.data.DatasetError`
    (one line naming the file and line) for the mistakes listed in the module docstring.
    """
    if not isinstance(text_column, str) or not isinstance(label_column, str):
        raise TypeError("text_column and label_column must be column names (str)")
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    rows = {split: (Path(f), _rows(Path(f), text_column, label_column)) for split, f in files.items() if f is not None}

    train_path, train_rows = rows["train"]
    counts = Counter(label for _, _, label in train_rows)
    if len(counts) < 2:
        raise DatasetError(
            f"{train_path}: only one label ({next(iter(counts))!r}) in column {label_column!r}: "
            "a classifier needs at least two"
        )
    once = [label for label, n in counts.items() if n == 1]
    if once:
        line = next(ln for ln, _, label in train_rows if label == once[0])
        raise DatasetError(
            f"{train_path}: line {line}: label {once[0]!r} occurs only once in the training file "
            f"({len(once)} label(s) occur once); merge or drop rare labels"
        )
    if all(_INT.fullmatch(k) for k in counts):
        names = sorted(counts, key=int)
    else:
        names = sorted(counts)
    ids = {name: i for i, name in enumerate(names)}

    splits: dict[str, tuple[list[str], list[int]]] = {}
    for split, (path, split_rows) in rows.items():
        for line, _, label in split_rows:
            if label not in ids:
                raise DatasetError(
                    f"{path}: line {line}: label {label!r} does not occur in the training file "
                    f"{train_path} (labels: {', '.join(names[:20])})"
                )
        splits[split] = ([t for _, t, _ in split_rows], [ids[label] for _, _, label in split_rows])
    return splits, names


def read_labelled_file(
    path: str | os.PathLike, *, text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of one labelled file (the formats of :func:`load_labelled_files`), each
    label as its name (``"3"`` for 3): for evaluating a model whose ``id2label`` gives the ids."""
    rows = _rows(Path(path), text_column, label_column)
    return [text for _, text, _ in rows], [label for _, _, label in rows]
