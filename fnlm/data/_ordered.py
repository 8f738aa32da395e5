"""Ordered batched prediction: sort by length, batch, pad to a bucket, run, put the results back in input order.

Sorting by length puts similar lengths together, so little padding is computed; the results are
scattered back so row ``i`` of the output belongs to ``token_ids[i]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from fnlm.data._batching import make_batches

__all__ = ["length_sorted_batches", "predict_in_order"]


def length_sorted_batches(
    token_ids: Sequence[Sequence[int]], *, batch_size: int, buckets: Sequence[int] | None = None, pad_id: int = 0
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(indices [B], input_ids [B, L], attention_mask [B, L])`` over ``token_ids`` sorted by length.

    ``indices[j]`` is the position in ``token_ids`` of row ``j``. With ``buckets``, batches come from
    :func:`make_batches`: ``B = batch_size`` always (dummy rows have index -1 and mask 0) and ``L`` is the
    smallest bucket >= the batch's longest sequence, so a compiled function sees few shapes. With
    ``buckets=None``, ``B`` is the number of rows left (at most ``batch_size``) and ``L = max(2, longest)``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))  # stable: ties keep input order
    if buckets is not None:
        order_t = torch.tensor(order, dtype=torch.long)
        for b in make_batches([token_ids[i] for i in order], None, batch_size, buckets, shuffle=False, pad_id=pad_id):
            real = b["index"] >= 0
            idx = torch.full_like(b["index"], -1)
            idx[real] = order_t[b["index"][real]]
            yield idx, b["input_ids"], b["attention_mask"]
        return
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        width = max(2, max(len(token_ids[i]) for i in rows))
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            input_ids[j, : len(token_ids[i])] = torch.as_tensor(token_ids[i], dtype=torch.long)
            mask[j, : len(token_ids[i])] = 1
        yield torch.tensor(rows, dtype=torch.long), input_ids, mask


def predict_in_order(
    fn: Callable[[Tensor, Tensor], Tensor],
    token_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    buckets: Sequence[int] | None = None,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """``out[i] = fn(input_ids, attention_mask)[row of token_ids[i]]``: ``[N, ...]`` results in input order.

    Runs ``fn`` (``[B, L]`` ids and mask -> ``[B, ...]``) over :func:`length_sorted_batches` and scatters
    the real rows back; ``on_batch(n_real_rows)`` is called after each batch (e.g. a progress bar).
    The output has ``fn``'s dtype; with no texts it is ``torch.empty(0)``.
    """
    out: Tensor | None = None
    for idx, input_ids, mask in length_sorted_batches(token_ids, batch_size=batch_size, buckets=buckets, pad_id=pad_id):
        y = fn(input_ids, mask)
        real = idx >= 0
        if out is None:
            out = torch.empty(len(token_ids), *y.shape[1:], dtype=y.dtype, device=y.device)
        out[idx[real].to(y.device)] = y[real.to(y.device)]
        if on_batch is not None:
            on_batch(int(real.sum()))
    return out if out is not None else torch.empty(0)
