"""DataParallel.shard / .loss without a process group: the mean over N workers of the scaled worker
losses and gradients equals torch's global-batch loss and gradient, for a mean over masked tokens
(one weight) and for a sum of two means over different things (MLM tokens + NSP pairs, a weight per
term), including shards that hold no masked token or no pair."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad_and_value

import fnlm
from fnlm import random
from fnlm.train import DataParallel

B, T, D, V = 4, 5, 3, 7


def problem():
    g = torch.Generator().manual_seed(0)
    params = {"tok": torch.randn(D, V, generator=g), "pair": torch.randn(D, 2, generator=g)}
    x = torch.randn(B, T, D, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.6] = -100
    labels[2:] = -100  # worker 1 of 2: no masked token at all
    labels[0, 0] = 3
    pair = torch.tensor([1, -100, 0, 1])  # worker 0: one pair, worker 1: two
    return params, {"x": x, "labels": labels, "pair_label": pair}


def two_term_loss(p, batch, key):
    tok = batch["x"] @ p["tok"]
    pair = batch["x"][:, 0] @ p["pair"]
    lt, lp = fnlm.cross_entropy(tok, batch["labels"]), fnlm.cross_entropy(pair, batch["pair_label"])
    return lt + lp, {
        "tok_loss": lt,
        "pair_loss": lp,
        "tok_accuracy": fnlm.accuracy(tok, batch["labels"]),
        "pair_accuracy": fnlm.accuracy(pair, batch["pair_label"]),
    }


def reference(p, batch, pairs: bool):
    """torch's global-batch loss (mean over masked tokens [+ mean over pairs]) and its gradient."""
    p = {k: v.clone().requires_grad_() for k, v in p.items()}
    loss = F.cross_entropy((batch["x"] @ p["tok"]).reshape(-1, V), batch["labels"].reshape(-1), ignore_index=-100)
    if pairs:
        loss = loss + F.cross_entropy(batch["x"][:, 0] @ p["pair"], batch["pair_label"], ignore_index=-100)
    loss.backward()
    return loss.detach(), {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in p.items()}


def over_workers(loss_fn, params, batch, weight, n=2):
    """The mean over ``n`` workers of each one's scaled loss, aux and gradient (what all_reduce_mean gives)."""
    losses, auxes, grads = [], [], []
    for r in range(n):
        dp = DataParallel(r, n, torch.device("cpu"), None)
        shard = dp.shard(batch, weight=weight)
        fn = dp.loss(loss_fn)
        g, (loss, aux) = grad_and_value(lambda p, fn=fn, shard=shard: fn(p, shard, random.key(0)), has_aux=True)(params)
        losses.append(loss)
        auxes.append(aux)
        grads.append(g)
    mean = lambda xs: sum(xs) / n  # noqa: E731
    return (
        mean(losses),
        {k: mean([a[k] for a in auxes]) for k in auxes[0]},
        {k: mean([g[k] for g in grads]) for k in grads[0]},
    )


def test_one_weight_per_masked_token_gives_the_global_mean():
    params, batch = problem()
    batch = {"x": batch["x"], "labels": batch["labels"], "n_masked": (batch["labels"] != -100).sum(-1)}

    def loss_fn(p, b, key):
        logits = b["x"] @ p["tok"]
        return fnlm.cross_entropy(logits, b["labels"]), {"accuracy": fnlm.accuracy(logits, b["labels"])}

    ref_loss, ref_grads = reference(params, batch, pairs=False)
    loss, aux, grads = over_workers(loss_fn, params, batch, "n_masked")
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=0)
    valid = batch["labels"] != -100
    acc = ((batch["x"] @ params["tok"]).argmax(-1) == batch["labels"])[valid].float().mean()
    torch.testing.assert_close(aux["accuracy"], acc, atol=1e-6, rtol=0)


def test_a_weight_per_term_gives_the_sum_of_global_means():
    params, batch = problem()
    batch |= {"mlm_w": (batch["labels"] != -100).sum(-1), "nsp_w": (batch["pair_label"] != -100).long()}
    ref_loss, ref_grads = reference(params, batch, pairs=True)
    loss, aux, grads = over_workers(two_term_loss, params, batch, {"tok": "mlm_w", "pair": "nsp_w"})
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=0)
    ref_pair = F.cross_entropy(batch["x"][:, 0] @ params["pair"], batch["pair_label"], ignore_index=-100)
    torch.testing.assert_close(aux["pair_loss"], ref_pair, atol=1e-6, rtol=0)
    torch.testing.assert_close(aux["tok_loss"] + aux["pair_loss"], ref_loss, atol=1e-6, rtol=0)


def test_one_worker_is_a_no_op_and_unnamed_aux_is_an_error():
    params, batch = problem()
    dp = DataParallel(0, 1, torch.device("cpu"), None)
    assert dp.shard(batch, weight={"tok": "labels"}) is batch and dp.loss(two_term_loss) is two_term_loss
    dp = DataParallel(0, 2, torch.device("cpu"), None)
    batch |= {"mlm_w": (batch["labels"] != -100).sum(-1)}
    shard = dp.shard(batch, weight={"tok": "mlm_w"})
    with pytest.raises(ValueError, match="'pair_loss' belongs to none of the terms"):
        dp.loss(two_term_loss)(params, shard, random.key(0))
