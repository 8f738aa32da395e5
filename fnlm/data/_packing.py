"""Packed sequences (MosaicBERT's unpadding idea): several sequences share one row, so almost no
matrix product runs on padding.

Sequences are placed into rows of at most ``row_len`` tokens, first-fit on the sequences sorted
longest first (first-fit decreasing bin packing). Each row carries, besides the token ids:

* ``position_ids``: ``0 .. n_i - 1`` within each sequence (every sequence starts at position 0,
  as if it were alone), 0 on padding;
* ``sequence_ids``: ``1 .. k`` for the row's sequences in order, 0 on padding; attention is allowed
  only where the two ids are equal (:func:`fnlm.models.packed_attention_mask`), which is the
  block-diagonal mask that keeps the sequences apart.

and the batch says where each sequence's first token (its [CLS]) is: ``cls_index [N, 2]`` =
``(row, position)``, in the order the sequences were given, with ``labels [N]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: the sequence indices of each row, every row's lengths summing to
    ``<= row_len`` (deterministic: ties keep the given order)."""
    if not isinstance(row_len, int) or row_len < 1:
        raise ValueError(f"row_len must be a positive int, got {row_len!r}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= row_len:
            raise ValueError(f"sequence {i} has {n} tokens; packing needs 1 <= length <= row_len={row_len}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def pack_sequences(
    token_ids: Sequence[Sequence[int]],
    labels: Sequence[int] | None = None,
    *,
    row_len: int = 512,
    pad_id: int = 0,
    multiple: int = 8,
    rows: list[list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """One packed batch of all ``token_ids`` (unpadded, each starting with [CLS]).

    Returns int64 ``input_ids``, ``position_ids``, ``sequence_ids``, ``attention_mask`` (1 on
    real tokens, so :func:`fnlm.data.padding_efficiency` applies) ``[R, L]`` (``L``: the
    longest row rounded up to ``multiple``, at most ``row_len``), ``cls_index [N, 2]`` and
    ``labels [N]`` (0 when ``labels`` is None). ``rows``: a packing to use instead of
    :func:`pack_rows`'s (lists of sequence indices).
    """
    n = len(token_ids)
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} sequences")
    lengths = [len(s) for s in token_ids]
    rows = pack_rows(lengths, row_len) if rows is None else rows
    if sorted(i for r in rows for i in r) != list(range(n)):
        raise ValueError("rows must hold every sequence index exactly once")
    used = max((sum(lengths[i] for i in r) for r in rows), default=1)
    if used > row_len:
        raise ValueError(f"a row holds {used} tokens, more than row_len={row_len}")
    width = min(row_len, -(-used // multiple) * multiple)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    sequence_ids = torch.zeros(len(rows), width, dtype=torch.long)
    cls_index = torch.zeros(n, 2, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for k, i in enumerate(members):
            m = lengths[i]
            input_ids[r, start : start + m] = torch.as_tensor(token_ids[i], dtype=torch.long)
            position_ids[r, start : start + m] = torch.arange(m)
            sequence_ids[r, start : start + m] = k + 1
            cls_index[i] = torch.tensor([r, start])
            start += m
    label_list = list(labels) if labels is not None else [0] * n
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "sequence_ids": sequence_ids,
        "attention_mask": (sequence_ids > 0).long(),
        "cls_index": cls_index,
        "labels": torch.as_tensor(label_list, dtype=torch.long),
    }
