"""Word pieces aligned with words and characters: the inputs of token classification and span
extraction (:mod:`fnlm.models._bert_heads`).

* :func:`encode_words` tokenizes pre-split words (``[CLS] pieces [SEP]``) and gives each piece its
  word index (``None`` for special tokens), as a fast tokenizer's ``word_ids()``;
  :func:`align_labels` then labels the first piece of each word and gives -100 to the others and
  to special tokens, the recipe of ``transformers``' token-classification examples.
* :func:`encode_windows` encodes ``[CLS] question [SEP] context [SEP]`` and splits a long context
  into overlapping windows (consecutive windows share ``stride`` context pieces, as a fast
  tokenizer's ``truncation='only_second', return_overflowing_tokens=True, stride=...``), with
  character offsets into the context (-1 elsewhere); :func:`span_positions` turns an answer's
  characters into the start/end pieces of each window ((0, 0), the [CLS] piece, where the window
  does not contain the whole answer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

PADDINGS = ("longest", "max_length")


def _check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def align_labels(
    word_ids: Sequence[int | None], word_labels: Sequence[int], *, label_all_pieces: bool = False
) -> list[int]:
    """Piece labels from word labels: ``word_labels[w]`` on the first piece of word ``w``, -100 on
    special tokens (``word_id None``) and on the other pieces of a word (or the word's label there
    too with ``label_all_pieces=True``)."""
    out: list[int] = []
    prev = None
    for w in word_ids:
        if w is None:
            out.append(-100)
        elif w != prev:
            if not 0 <= w < len(word_labels):
                raise ValueError(f"word id {w} has no label: word_labels has {len(word_labels)} entries")
            out.append(int(word_labels[w]))
        else:
            out.append(int(word_labels[w]) if label_all_pieces else -100)
        prev = w
    return out


def encode_words(
    tokenizer,
    words: Sequence[Sequence[str]],
    *,
    labels: Sequence[Sequence[int]] | None = None,
    max_len: int = 512,
    padding: str = "longest",
    label_all_pieces: bool = False,
) -> dict:
    """Padded ``input_ids``, ``attention_mask``, ``token_type_ids`` ``[B, L]`` of pre-split words
    (``[CLS] pieces [SEP]``, pieces cut to ``max_len - 2``), ``word_ids`` (a list per row, ``None``
    at special tokens and padding) and, with ``labels`` (one list of word labels per row),
    ``labels`` ``[B, L]`` from :func:`align_labels` (-100 at padding)."""
    _check_padding(padding)
    if isinstance(words, str) or not all(not isinstance(w, str) and all(isinstance(x, str) for x in w) for w in words):
        raise TypeError("words must be a sequence of rows, each a sequence of str words")
    if labels is not None and len(labels) != len(words):
        raise ValueError(f"labels has {len(labels)} rows but words has {len(words)}; they must match")
    if max_len < 2:
        raise ValueError(f"max_len={max_len} is too small: [CLS] and [SEP] take 2 positions")
    encs = (
        tokenizer.backend.encode_batch([list(w) for w in words], is_pretokenized=True, add_special_tokens=False)
        if words
        else []
    )
    rows = [
        ([tokenizer.cls_id, *e.ids[: max_len - 2], tokenizer.sep_id], [None, *e.word_ids[: max_len - 2], None])
        for e in encs
    ]
    width = max_len if padding == "max_length" else max((len(r) for r, _ in rows), default=0)
    n = len(rows)
    ids = torch.full((n, width), tokenizer.pad_id, dtype=torch.int64)
    mask = torch.zeros((n, width), dtype=torch.int64)
    word_ids = []
    for i, (r, w) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        word_ids.append(w + [None] * (width - len(w)))
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "word_ids": word_ids}
    if labels is not None:
        out["labels"] = torch.tensor(
            [align_labels(w, lab, label_all_pieces=label_all_pieces) for w, lab in zip(word_ids, labels)],
            dtype=torch.int64,
        ).reshape(n, width)
    return out


def _windows(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of windows of ``size`` pieces over ``n``, each starting ``size - stride``
    after the previous, until one reaches the end (the ``tokenizers`` library's rule)."""
    out: list[tuple[int, int]] = []
    for start in range(0, max(n, 1), size - stride):
        stop = min(start + size, n)
        out.append((start, stop))
        if stop == n:
            break
    return out


def encode_windows(
    tokenizer,
    questions: Sequence[str],
    contexts: Sequence[str],
    *,
    max_len: int = 384,
    stride: int = 128,
    padding: str = "max_length",
) -> dict:
    """``[CLS] question [SEP] context-window [SEP]`` for every window of every (question, context).

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` ``[W, L]``, ``offsets``
    ``[W, L, 2]`` (character ``[start, end)`` of each context piece in its context, -1 for the
    question, special tokens and padding) and ``sample`` ``[W]`` (which pair a window belongs to).
    A window holds ``max_len - len(question) - 3`` context pieces; consecutive windows share
    ``stride`` of them, so every context piece is in at least one window.
    """
    _check_padding(padding)
    if len(questions) != len(contexts):
        raise ValueError(f"questions has {len(questions)} texts but contexts has {len(contexts)}; they must match")
    if not isinstance(stride, int) or stride < 0:
        raise ValueError(f"stride must be an int >= 0, got {stride!r}")
    bk = tokenizer.backend
    qs = bk.encode_batch(list(questions), add_special_tokens=False) if questions else []
    cs = bk.encode_batch(list(contexts), add_special_tokens=False) if contexts else []
    rows = []
    for s, (q, c) in enumerate(zip(qs, cs)):
        size = max_len - len(q.ids) - 3
        if size <= stride:
            raise ValueError(
                f"questions[{s}] has {len(q.ids)} pieces: with max_len={max_len} that leaves {size} "
                f"context pieces per window, not more than stride={stride}; raise max_len or lower stride"
            )
        for a, b in _windows(len(c.ids), size, stride):
            ids = [tokenizer.cls_id, *q.ids, tokenizer.sep_id, *c.ids[a:b], tokenizer.sep_id]
            offs = [(-1, -1)] * (len(q.ids) + 2) + [tuple(o) for o in c.offsets[a:b]] + [(-1, -1)]
            rows.append((s, ids, offs, len(q.ids) + 2))
    width = max_len if padding == "max_length" else max((len(r[1]) for r in rows), default=0)
    n = len(rows)
    out = {
        "input_ids": torch.full((n, width), tokenizer.pad_id, dtype=torch.int64),
        "attention_mask": torch.zeros((n, width), dtype=torch.int64),
        "token_type_ids": torch.zeros((n, width), dtype=torch.int64),
        "offsets": torch.full((n, width, 2), -1, dtype=torch.int64),
        "sample": torch.tensor([r[0] for r in rows], dtype=torch.int64),
    }
    for i, (_, ids, offs, b_start) in enumerate(rows):
        out["input_ids"][i, : len(ids)] = torch.tensor(ids)
        out["attention_mask"][i, : len(ids)] = 1
        out["token_type_ids"][i, b_start : len(ids)] = 1
        out["offsets"][i, : len(ids)] = torch.tensor(offs, dtype=torch.int64)
    return out


def span_positions(offsets: Tensor, answer_start: Tensor, answer_end: Tensor) -> tuple[Tensor, Tensor]:
    """``(start, end)`` pieces ``[W]`` of answers given as characters ``[answer_start, answer_end)``
    of each window's context: ``start`` the last context piece beginning at or before
    ``answer_start``, ``end`` the first ending at or after ``answer_end``; ``(0, 0)`` (the [CLS]
    piece) where the window's context does not contain the whole answer. ``offsets`` ``[W, L, 2]``
    from :func:`encode_windows` (index the answers by its ``sample``)."""
    if offsets.ndim != 3 or offsets.shape[-1] != 2:
        raise ValueError(f"offsets must have shape [W, L, 2], got {tuple(offsets.shape)}")
    a = torch.as_tensor(answer_start).reshape(-1, 1)
    b = torch.as_tensor(answer_end).reshape(-1, 1)
    if a.shape[0] != offsets.shape[0] or b.shape[0] != offsets.shape[0]:
        raise ValueError(f"answer_start / answer_end need one entry per window ({offsets.shape[0]})")
    ctx = offsets[..., 0] >= 0
    big = offsets.shape[1]
    pos = torch.arange(big).expand_as(ctx)
    first = torch.where(ctx, pos, big).min(-1).values
    last = torch.where(ctx, pos, -1).max(-1).values
    gather = lambda idx, k: offsets[..., k].gather(-1, idx.clamp(0, big - 1)[:, None])[:, 0]  # noqa: E731
    inside = ctx.any(-1) & (gather(first, 0) <= a[:, 0]) & (gather(last, 1) >= b[:, 0])
    start = torch.where(ctx & (offsets[..., 0] <= a), pos, -1).max(-1).values
    end = torch.where(ctx & (offsets[..., 1] >= b), pos, big).min(-1).values
    zero = torch.zeros_like(start)
    return torch.where(inside, start, zero), torch.where(inside, end, zero)
