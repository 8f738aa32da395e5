"""length_sorted_batches / predict_in_order against a plain per-example loop in input order."""

import random

import pytest
import torch

from fnlm.data import length_sorted_batches, predict_in_order


def _ids(n, seed=0, max_len=40):
    rng = random.Random(seed)
    return [[rng.randrange(1, 100) for _ in range(rng.randrange(2, max_len + 1))] for _ in range(n)]


def _fn(input_ids, mask):  # per row: masked sum of ids and length; independent of padding and batch mates
    return torch.stack([(input_ids * mask).sum(-1), mask.sum(-1)], -1).float()


@pytest.mark.parametrize("buckets", [None, [16, 32, 48]])
@pytest.mark.parametrize("n,batch_size", [(1, 4), (13, 4), (20, 7), (8, 8)])
def test_predict_in_order_equals_unsorted_loop(n, batch_size, buckets):
    ids = _ids(n, seed=n)
    expected = torch.tensor([[float(sum(x)), float(len(x))] for x in ids])  # the loop, one example at a time
    out = predict_in_order(_fn, ids, batch_size=batch_size, buckets=buckets, pad_id=0)
    assert torch.equal(out, expected)
    seen = []
    got = predict_in_order(_fn, ids, batch_size=batch_size, buckets=buckets, pad_id=0, on_batch=seen.append)
    assert torch.equal(got, expected) and sum(seen) == n


@pytest.mark.parametrize("buckets", [None, [16, 32, 48]])
def test_batches_are_length_sorted_and_bucketed(buckets):
    ids = _ids(30, seed=3)
    all_idx = []
    for idx, input_ids, mask in length_sorted_batches(ids, batch_size=4, buckets=buckets, pad_id=7):
        real = idx >= 0
        longest = max(len(ids[i]) for i in idx[real].tolist())
        if buckets is None:
            assert input_ids.shape == (int(real.sum()), max(2, longest))
        else:
            assert input_ids.shape[0] == 4 and input_ids.shape[1] == min(b for b in buckets if b >= longest)
        for j, i in enumerate(idx.tolist()):
            if i >= 0:
                assert input_ids[j, : len(ids[i])].tolist() == ids[i] and int(mask[j].sum()) == len(ids[i])
                assert (input_ids[j, len(ids[i]) :] == 7).all()
        all_idx += idx[real].tolist()
    expected = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # a stable sort by length, as a loop
    assert all_idx == expected


def test_empty_and_bad_batch_size():
    assert predict_in_order(_fn, [], batch_size=4).numel() == 0
    with pytest.raises(ValueError, match="batch_size"):
        list(length_sorted_batches([[1, 2]], batch_size=0))
