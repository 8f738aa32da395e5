"""The residual sub-layer around attention and feed-forward, and a stack of identical blocks.

The Annotated Transformer's ``SublayerConnection`` and ``clones``, as pure functions. Every block
of every model (encoder, decoder, BERT, GPT-2) is written with :func:`sublayer`, so the two
residual orders exist in one place only.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from fnlm import random
from fnlm.nn._dropout import dropout
from fnlm.nn._norm import layer_norm
from fnlm.tree import Params


def sublayer(
    norm: Params,
    x: Tensor,
    f: Callable[[Tensor], Tensor],
    *,
    norm_first: bool,
    eps: float,
    rate: float,
    key: random.Key | None = None,
    train: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """Post-LN ``LayerNorm(x + Dropout(f(x)))`` (paper §3.1, BERT) or pre-LN
    ``x + Dropout(f(LayerNorm(x)))`` (GPT-2, Xiong et al. 2020), ``x: [*batch, len, d_model]``.

    ``residual``: the tensor added back, when it is not ``x`` itself (an encoder block that
    computes only some query rows adds back those rows: ``f`` sees every position, the sum has
    the residual's shape).
    """
    r = x if residual is None else residual
    if norm_first:
        return r + dropout(f(layer_norm(norm, x, eps)), rate, key=key, train=train)
    return layer_norm(norm, r + dropout(f(x), rate, key=key, train=train), eps)


def init_stack(key: random.Key, n: int, init_block: Callable[[random.Key], Params]) -> list[Params]:
    """``n`` independently initialised blocks, ``[init_block(k_1), ..., init_block(k_n)]``
    (the Annotated Transformer's ``clones``, but each with its own key)."""
    if n < 0:
        raise ValueError(f"a stack needs n >= 0 blocks, got {n}")
    return [init_block(k) for k in random.split(key, n)] if n else []
