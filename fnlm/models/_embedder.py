"""A compiled sentence embedder: ``(input_ids, attention_mask) -> [B, D]`` for ordered, bucketed batches."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from fnlm.models._bert import BertConfig
from fnlm.models._pooling import sentence_embedding
from fnlm.train._step import make_eval_step
from fnlm.tree import Params


def make_embedder(
    params: Params,
    cfg: BertConfig,
    *,
    pooling: str = "mean",
    layers: Sequence[int] | None = None,
    combine: str = "concat",
    normalize: bool = True,
    dtype: torch.dtype | None = None,
    compile: bool = True,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``embed(input_ids [B, L], attention_mask [B, L]) -> [B, D]`` float32 sentence embeddings
    (:func:`sentence_embedding`), gradient-free and compiled once per batch shape.

    ``dtype=torch.bfloat16`` runs the encoder under autocast and normalises in float32. ``layers``
    are checked here (a ``ValueError`` naming the bad index), not at the first batch.
    """
    if layers is not None:
        n = cfg.num_hidden_layers + 1
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(
                f"--layers: layer index {bad[0]} is out of range: the model has {n} hidden states "
                f"(embeddings + {n - 1} layers), valid indices {-n}..{n - 1}"
            )
    layers = None if layers is None else list(layers)

    def embed(p, input_ids, attention_mask):
        kw = dict(attention_mask=attention_mask, pooling=pooling, layers=layers, combine=combine)
        if dtype is None:
            return sentence_embedding(p, input_ids, cfg, normalize=normalize, **kw)
        with torch.autocast(input_ids.device.type, dtype=dtype):
            e = sentence_embedding(p, input_ids, cfg, normalize=False, **kw).float()
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e  # in float32

    step = make_eval_step(embed, compile=compile)
    return lambda input_ids, attention_mask: step(params, input_ids, attention_mask).float()
