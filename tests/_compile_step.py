"""A small regression step for tests/test_compile_cache.py with everything a real step has:
grad_and_value, clipping, AdamW with a schedule (the lr lives in the optimizer state), a dropout
key. A module of its own so that a saved graph can name its loss function and a subprocess can import it."""

import torch

from fnlm import optim, random
from fnlm.train import CompileCache, make_train_step


def loss_fn(p, batch, key):
    """Mean squared error of a one-hidden-layer network with dropout."""
    h = torch.tanh(batch["x"] @ p["w1"] + p["b1"])
    keep = (random.uniform(key, h.shape) > 0.1).float()
    pred = (h * keep / 0.9) @ p["w2"]
    loss = ((pred.squeeze(-1) - batch["y"]) ** 2).mean()
    return loss, {"mse": loss}


def setup(cache_dir, background=False):
    """``(params, opt_state, batches, step)``; ``cache_dir=None``: the eager step."""
    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(8, 16, generator=g) * 0.3,
        "b1": torch.zeros(16),
        "w2": torch.randn(16, 1, generator=g) * 0.3,
    }
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.inject_hyperparams(optim.adamw)(lr=optim.linear_warmup_linear_decay(1e-2, 2, 20), weight_decay=0.01),
    )
    batches = [{"x": torch.randn(4, 8, generator=g), "y": torch.randn(4, generator=g)} for _ in range(6)]
    cache = None if cache_dir is None else CompileCache(cache_dir, key="regression v1", background=background)
    step = make_train_step(loss_fn, opt, cache=cache, compile=cache is not None)
    return params, opt.init(params), batches, step
