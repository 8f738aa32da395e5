"""Pooling token vectors into one vector per sequence, and BERT sentence embeddings.

``pool(h, m, 'mean')`` is sentence-transformers' mean pooling, ``sum_t m_t h_t / sum_t m_t``;
:func:`sentence_embedding` is what ``SentenceTransformer(...).encode(..., normalize_embeddings=True)``
computes for all-MiniLM-L6-v2 (BERT, mean pooling over real tokens, L2 normalisation).
Feature extraction from other layers goes through :func:`combine_layers` on the hidden states
that ``bert(..., output_hidden_states=True)`` returns.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fnlm.models._bert import BertConfig, bert
from fnlm.tree import Params

#: ``how`` values of :func:`pool`.
POOLINGS = ("cls", "mean", "max")
#: ``combine`` values of :func:`combine_layers`.
COMBINES = ("concat", "mean")


def pool(h: Tensor, attention_mask: Tensor | None = None, how: str = "mean") -> Tensor:
    """``[*batch, len, d] -> [*batch, d]``: ``cls`` = ``h_0``; ``mean`` = ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``;
    ``max`` = ``max_{t: m_t = 1} h_t`` (per feature).

    ``attention_mask`` ``[*batch, len]`` (1 = real token, 0 = padding; ``None``: all real):
    padding never enters ``mean`` or ``max`` (as sentence-transformers' ``Pooling``; a row with no
    real token gives 0 for ``mean`` and the most negative float for ``max``).
    """
    if how not in POOLINGS:
        raise ValueError(f"unknown pooling {how!r}: expected one of {POOLINGS}")
    if not isinstance(h, Tensor) or h.ndim < 2:
        raise ValueError(f"h must be a tensor [*batch, len, d], got {getattr(h, 'shape', type(h).__name__)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected [*batch, len] = "
            f"{list(h.shape[:-1])} (the hidden states' leading axes)"
        )
    if how == "cls":
        return h[..., 0, :]
    if attention_mask is None:
        return h.mean(-2) if how == "mean" else h.amax(-2)
    m = attention_mask.to(h.dtype).unsqueeze(-1)  # [*batch, len, 1]
    if how == "mean":
        return (h * m).sum(-2) / m.sum(-2).clamp(min=1e-9)
    return h.masked_fill(m == 0, torch.finfo(h.dtype).min).amax(-2)


def combine_layers(hidden_states: Sequence[Tensor], layers: Sequence[int] = (-1,), combine: str = "concat") -> Tensor:
    """Token features from several layers: ``concat`` ``[*batch, len, k d]`` or ``mean``
    ``[*batch, len, d]`` of ``hidden_states[i]`` for ``i`` in ``layers``.

    ``hidden_states``: the ``L + 1`` states of ``bert(..., output_hidden_states=True)`` (index 0:
    the embeddings, ``-1``: the last layer); ``layers=range(-k, 0)``: the last ``k`` layers.
    """
    if combine not in COMBINES:
        raise ValueError(f"unknown layer combination {combine!r}: expected one of {COMBINES}")
    n = len(hidden_states)
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one hidden state")
    bad = [i for i in layers if not isinstance(i, int) or not -n <= i < n]
    if bad:
        raise ValueError(
            f"layer index {bad[0]!r} is out of range: there are {n} hidden states "
            f"(embeddings + {n - 1} layers), valid indices {-n}..{n - 1}"
        )
    chosen = [hidden_states[i] for i in layers]
    return torch.cat(chosen, -1) if combine == "concat" else torch.stack(chosen).mean(0)


def sentence_embedding(
    params: Params,
    input_ids: Tensor,
    cfg: BertConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    pooling: str = "mean",
    layers: Sequence[int] | None = None,
    combine: str = "concat",
    normalize: bool = True,
) -> Tensor:
    """``e = p / ||p||_2`` with ``p = pool(BERT(ids), mask, 'mean')``: ``[*batch, len] -> [*batch, H]``.

    The defaults are sentence-transformers' all-MiniLM-L6-v2 (``encode(...,
    normalize_embeddings=True)``). ``pooling``: ``'cls'``, ``'mean'`` or ``'max'``;
    ``layers``: pool :func:`combine_layers` of these hidden states instead of the last one
    (e.g. ``range(-4, 0)`` with ``combine='concat'`` gives ``[*batch, 4 H]``);
    ``normalize=False`` skips the L2 normalisation. ``params``: a bare BERT tree (the pooler, if
    any, is not used).
    """
    if pooling not in POOLINGS:  # before the forward pass
        raise ValueError(f"unknown pooling {pooling!r}: expected one of {POOLINGS}")
    if layers is None:
        h, _ = bert(params, input_ids, cfg, attention_mask=attention_mask, token_type_ids=token_type_ids)
    else:
        _, _, inter = bert(
            params,
            input_ids,
            cfg,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=True,
        )
        h = combine_layers(inter["hidden_states"], layers, combine)
    e = pool(h, attention_mask, pooling)
    return torch.nn.functional.normalize(e, p=2.0, dim=-1) if normalize else e
