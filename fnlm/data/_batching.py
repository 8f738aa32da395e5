"""Length-bucketed batching: little padding, and only a few distinct shapes.

Padding every review to 512 tokens wastes most of the compute on IMDb (the median review is
~230 word pieces). Padding each batch to *its own* longest sequence wastes little but gives
a new shape almost every step, and a compiled step recompiles for each new shape. The middle
way used here:

1. a few fixed sequence lengths, the *buckets* (:func:`bucket_lengths`, e.g. 64/128/256/512);
2. "sort within shuffled chunks": shuffle the examples (seeded), cut them into chunks of
   ``chunk_batches`` batches, sort each chunk by length, cut it into batches, then shuffle the
   order of all batches, so a batch holds examples of similar length but the sequence of
   batches is still random;
3. pad each batch to the smallest bucket that holds its longest sequence.

So at most ``len(buckets)`` shapes occur. The batch size is fixed too: the last, partial batch
is filled up to ``batch_size`` with dummy rows (``weight`` 0) rather than made smaller, unless
``drop_last=True`` drops it. Pass ``weight=batch["weight"]`` to :func:`fnlm.losses.cross_entropy`
and :func:`fnlm.losses.accuracy` so the dummy rows do not count.

A dummy row is ``pad_id`` everywhere with ``attention_mask`` 1 at position 0 only: a row whose
mask is all 0 would make every attention softmax of that row ``-inf``-only, i.e. NaN, and
``NaN * 0`` is still NaN in a weighted loss. In real rows, padding positions have mask 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def bucket_lengths(max_len: int, n: int = 4, *, multiple: int = 8) -> list[int]:
    """``n`` sequence lengths doubling up to ``max_len``: ``bucket_lengths(512) == [64, 128, 256, 512]``.

    The smaller ones are rounded up to a multiple of ``multiple`` (tensor-core friendly); the
    largest is ``max_len`` itself, so no bucket exceeds the model's positions. Duplicates and
    lengths below ``multiple`` are dropped, so fewer than ``n`` may come back for tiny
    ``max_len``.
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    out = []
    for k in range(n - 1, 0, -1):
        b = multiple * math.ceil(max_len / 2**k / multiple)
        if multiple <= b < max_len and b not in out:
            out.append(b)
    return out + [max_len]


def choose_buckets(
    lengths: Sequence[int],
    max_len: int,
    batch_size: int,
    *,
    epochs: int = 1,
    compile_cost: float = 30.0,
    max_buckets: int = 4,
) -> list[int]:
    """The buckets of :func:`bucket_lengths` (``max_len / 2**k``) that pay for their compilation.

    Each bucket is one more compiled step. Going from long buckets to short ones, a shorter
    bucket ``b`` is kept if the batches it would take over from the shortest bucket ``B`` kept so far
    save at least ``compile_cost`` full-length steps of compute (cost taken as proportional to
    length)::

        (examples of length <= b) / batch_size * epochs * (B - b) / max_len  >=  compile_cost

    ``compile_cost = 30``: compiling a MiniLM step on a 2-core CPU costs ~55–70 steps of its own
    length (256 tokens) with a cold compile cache and ~14 with a warm one (``benchmarks/``);
    30 sits between. So a 2,000-review run keeps one bucket and a 25,000-review run keeps three
    or four.
    """
    lengths = np.asarray(list(lengths))
    candidates = bucket_lengths(max_len, max_buckets)
    chosen = [max_len]
    for b in reversed(candidates[:-1]):
        n_batches = int((lengths <= b).sum()) / batch_size * epochs
        if n_batches * (chosen[0] - b) / max_len >= compile_cost:
            chosen.insert(0, b)
    return chosen


def _check_buckets(buckets) -> list[int]:
    b = list(buckets)
    if not b or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in b):
        raise ValueError(f"buckets must be a non-empty list of positive ints, got {buckets!r}")
    return sorted({int(x) for x in b})


def make_batches(
    token_ids: Sequence[Sequence[int]],
    labels: Sequence[int] | None,
    batch_size: int,
    buckets: Sequence[int],
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    pad_id: int = 0,
    drop_last: bool = False,
    chunk_batches: int = 50,
) -> list[dict[str, torch.Tensor]]:
    """Batches of one epoch over ``token_ids`` (unpadded, e.g. from ``tokenizer.encode_ids``).

    Each batch is a dict of ``[batch_size, L]`` int64 tensors ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (zeros), ``[batch_size]`` int64 ``labels`` (0 where ``labels`` is None
    or the row is a dummy) and ``index`` (position of the row's example in ``token_ids``, -1
    for dummy rows), and float32 ``weight`` (1 real, 0 dummy). ``L`` is the smallest bucket
    >= the batch's longest sequence. Deterministic given ``(seed, epoch)``; with
    ``shuffle=False`` the examples keep their order (then batches are neither sorted nor
    shuffled, which is what evaluation wants). See the module docstring for the algorithm.
    """
    n = len(token_ids)
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries but token_ids has {n}; they must match")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(chunk_batches, int) or chunk_batches < 1:
        raise ValueError(f"chunk_batches must be an int >= 1, got {chunk_batches!r}")
    bk = _check_buckets(buckets)
    lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=n)
    if n and lengths.max() > bk[-1]:
        i = int(lengths.argmax())
        raise ValueError(
            f"token_ids[{i}] has {lengths[i]} tokens, more than the largest bucket "
            f"{bk[-1]}; truncate to max_len when encoding"
        )
    if n and lengths.min() < 1:
        i = int(lengths.argmin())
        raise ValueError(f"token_ids[{i}] is empty; every sequence needs at least [CLS] [SEP]")

    if shuffle:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF])
        order = rng.permutation(n)
        chunk = chunk_batches * batch_size
        parts = []
        for s in range(0, n, chunk):
            c = order[s : s + chunk]
            parts.append(c[np.argsort(lengths[c], kind="stable")])
        order = np.concatenate(parts) if parts else order
    else:
        order = np.arange(n)
    groups = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    if shuffle:
        groups = [groups[i] for i in rng.permutation(len(groups))]

    label_arr = np.asarray(labels, dtype=np.int64) if labels is not None else np.zeros(n, dtype=np.int64)
    batches = []
    for g in groups:
        longest = int(lengths[g].max())
        width = next(b for b in bk if b >= longest)
        ids = np.full((batch_size, width), pad_id, dtype=np.int64)
        mask = np.zeros((batch_size, width), dtype=np.int64)
        for r, i in enumerate(g):
            ids[r, : lengths[i]] = token_ids[i]
            mask[r, : lengths[i]] = 1
        k = len(g)
        mask[k:, 0] = 1  # dummy rows attend to one position only (see the module docstring)
        lab = np.zeros(batch_size, dtype=np.int64)
        lab[:k] = label_arr[g]
        index = np.full(batch_size, -1, dtype=np.int64)
        index[:k] = g
        weight = np.zeros(batch_size, dtype=np.float32)
        weight[:k] = 1.0
        batches.append(
            {
                "input_ids": torch.from_numpy(ids),
                "attention_mask": torch.from_numpy(mask),
                "token_type_ids": torch.zeros((batch_size, width), dtype=torch.int64),
                "labels": torch.from_numpy(lab),
                "index": torch.from_numpy(index),
                "weight": torch.from_numpy(weight),
            }
        )
    return batches


def padding_efficiency(batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Real tokens / all token positions computed on, over ``batches`` (1.0 = no padding).

    Dummy rows (``weight`` 0) count as positions but not as real tokens.
    """
    real = total = 0
    for b in batches:
        m = b["attention_mask"]
        w = b.get("weight")
        real += int((m * (w[:, None] > 0)).sum()) if w is not None else int(m.sum())
        total += m.numel()
    return real / total if total else 1.0
