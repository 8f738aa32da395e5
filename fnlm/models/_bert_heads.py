"""BERT's token-level heads: token classification (sequence labelling) and span extraction
(extractive question answering), as ``BertForTokenClassification`` / ``BertForQuestionAnswering``.

* token classifier: ``logits_t = Dropout(h_t) W_c + b_c``, ``[*batch, len, C]``, one label per
  word piece; pieces labelled -100 (special tokens, padding, non-first pieces of a word; see
  :func:`fnlm.data.align_labels`) do not count in the loss.
* span head: ``[s_t, e_t] = h_t W_s + b_s`` (``W_s`` ``[H, 2]``, no dropout), start and end
  scores of every piece; the loss is ``(CE(s, start) + CE(e, end)) / 2``, and
  :func:`best_span` picks ``argmax_{i <= j < i + max_len, i, j in context} s_i + e_j``.

Trees: ``{'bert': init_bert(..., pooler=False), 'token_classifier': {'weight' [H, C], 'bias' [C]}}``
and ``{'bert': ..., 'span': {'weight' [H, 2], 'bias' [2]}}`` (neither HF class has a pooler).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from fnlm import random
from fnlm.models._bert import BertConfig, _check_config, _check_labels, bert, init_bert
from fnlm.nn._dropout import dropout
from fnlm.nn._linear import init_linear, linear
from fnlm.nn._losses import accuracy, cross_entropy
from fnlm.tree import Params


# ----------------------------------------------------------------------------- init
def init_token_classifier(key: random.Key, cfg: BertConfig, num_labels: int | None = None) -> Params:
    """``{'bert': init_bert(..., pooler=False), 'token_classifier': {'weight' [H, C] ~ N(0, initializer_range^2),
    'bias' zeros [C]}}``, ``C = num_labels`` (default ``cfg.num_labels``), as ``BertForTokenClassification``."""
    _check_config(cfg)
    n = cfg.num_labels if num_labels is None else num_labels
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"num_labels must be a positive int, got {n!r}")
    kb, kc = random.split(key)
    return {
        "bert": init_bert(kb, cfg, pooler=False),
        "token_classifier": init_linear(kc, cfg.hidden_size, n, std=float(cfg.initializer_range)),
    }


def init_span_head(key: random.Key, cfg: BertConfig) -> Params:
    """``{'bert': init_bert(..., pooler=False), 'span': {'weight' [H, 2], 'bias' zeros [2]}}``, as
    ``BertForQuestionAnswering`` (column 0 scores starts, column 1 ends)."""
    _check_config(cfg)
    kb, ks = random.split(key)
    return {
        "bert": init_bert(kb, cfg, pooler=False),
        "span": init_linear(ks, cfg.hidden_size, 2, std=float(cfg.initializer_range)),
    }


# ----------------------------------------------------------------------------- apply
def token_classifier(
    params: Params,
    input_ids: Tensor,
    cfg: BertConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> Tensor:
    """``logits_t = Dropout(h_t) W_c + b_c``: ``[*batch, len] ids -> [*batch, len, C]`` (dropout rate
    ``classifier_dropout``, else ``hidden_dropout_prob``, as ``BertForTokenClassification``)."""
    k_bert, k_drop = random.split_or_none(key, 2)
    h, _ = bert(
        params["bert"],
        input_ids,
        cfg,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        key=k_bert,
        train=train,
    )
    p = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
    return linear(params["token_classifier"], dropout(h, p, key=k_drop, train=train))


def span_logits(
    params: Params,
    input_ids: Tensor,
    cfg: BertConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(start [*batch, len], end [*batch, len])`` with ``[s_t, e_t] = h_t W_s + b_s`` (no dropout
    on ``h``, as ``BertForQuestionAnswering``)."""
    h, _ = bert(
        params["bert"],
        input_ids,
        cfg,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        key=key,
        train=train,
    )
    z = linear(params["span"], h)
    return z[..., 0], z[..., 1]


# ----------------------------------------------------------------------------- losses
def token_classifier_loss(
    params: Params, batch: Mapping[str, Tensor], cfg: BertConfig, *, key: random.Key | None = None, train: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(L, {'accuracy': acc})``, ``L`` = mean cross-entropy over pieces whose label is not -100.

    ``batch``: ``input_ids``, ``attention_mask``, optional ``token_type_ids``, ``labels``
    ``[B, len]`` (:func:`fnlm.data.align_labels`: first piece of each word labelled, special
    tokens / other pieces / padding -100), as ``BertForTokenClassification``'s loss.
    """
    logits = token_classifier(
        params,
        batch["input_ids"],
        cfg,
        attention_mask=batch.get("attention_mask"),
        token_type_ids=batch.get("token_type_ids"),
        key=key,
        train=train,
    )
    labels = batch["labels"]
    _check_labels(labels, logits.shape[-1], logits.shape[:-1], "one per token")
    return cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}


def span_loss(
    params: Params, batch: Mapping[str, Tensor], cfg: BertConfig, *, key: random.Key | None = None, train: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = (CE(start_logits, start) + CE(end_logits, end)) / 2`` over the batch, as
    ``BertForQuestionAnswering``: positions are clamped to ``[0, len]`` and ``len`` (outside the
    window) is ignored. A window without the answer is labelled ``(0, 0)``, the [CLS] piece.

    ``batch``: ``input_ids``, ``attention_mask``, optional ``token_type_ids``,
    ``start_positions`` and ``end_positions`` ``[B]`` (:func:`fnlm.data.span_positions`).
    Aux: ``start_accuracy``, ``end_accuracy``.
    """
    start, end = span_logits(
        params,
        batch["input_ids"],
        cfg,
        attention_mask=batch.get("attention_mask"),
        token_type_ids=batch.get("token_type_ids"),
        key=key,
        train=train,
    )
    n = start.shape[-1]
    out = []
    for name, z in (("start_positions", start), ("end_positions", end)):
        pos = batch[name]
        if not isinstance(pos, Tensor) or pos.dtype.is_floating_point or pos.shape != z.shape[:-1]:
            raise ValueError(
                f"{name} must be an integer tensor of shape {list(z.shape[:-1])}, got "
                f"{getattr(pos, 'dtype', type(pos).__name__)} {tuple(getattr(pos, 'shape', ()))}"
            )
        pos = pos.clamp(0, n)
        out.append(torch.where(pos == n, torch.full_like(pos, -100), pos))
    l_start, l_end = cross_entropy(start, out[0]), cross_entropy(end, out[1])
    return (l_start + l_end) / 2, {"start_accuracy": accuracy(start, out[0]), "end_accuracy": accuracy(end, out[1])}


# ----------------------------------------------------------------------------- decoding
def best_span(
    start_logits: Tensor, end_logits: Tensor, context_mask: Tensor, max_answer_length: int = 30
) -> tuple[Tensor, Tensor, Tensor]:
    """``(i, j, s_i + e_j)`` maximising ``s_i + e_j`` over valid spans: ``[*batch, len] -> [*batch]`` x3.

    Valid: ``i <= j``, ``j - i + 1 <= max_answer_length`` pieces (HF's ``run_qa`` rule) and both
    ends inside the context (``context_mask`` True, e.g. ``offsets[..., 0] >= 0`` from
    :func:`fnlm.data.encode_windows`). A row with no valid span gets ``(0, 0, -inf)``.
    Exhaustive over the ``len x max_answer_length`` band, so no n-best cut-off is needed.
    """
    if not isinstance(max_answer_length, int) or max_answer_length < 1:
        raise ValueError(f"max_answer_length must be a positive int, got {max_answer_length!r}")
    if start_logits.shape != end_logits.shape or context_mask.shape != start_logits.shape:
        raise ValueError(
            f"start_logits {tuple(start_logits.shape)}, end_logits {tuple(end_logits.shape)} and "
            f"context_mask {tuple(context_mask.shape)} must have the same shape [*batch, len]"
        )
    n = start_logits.shape[-1]
    i = torch.arange(n, device=start_logits.device)
    ok = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < max_answer_length)  # [i, j]
    m = context_mask.bool()
    ok = ok & m[..., :, None] & m[..., None, :]
    score = start_logits.float()[..., :, None] + end_logits.float()[..., None, :]
    score = score.masked_fill(~ok, float("-inf"))
    best, flat = score.flatten(-2).max(-1)
    s, e = flat // n, flat % n
    none = torch.isneginf(best)
    return s.masked_fill(none, 0), e.masked_fill(none, 0), best


def decode_span(
    start_logits: Tensor, end_logits: Tensor, offsets: Tensor, context: str, max_answer_length: int = 30
) -> tuple[str, float]:
    """The best answer text of one window: ``context[offsets[i, 0]:offsets[j, 1]]`` for
    :func:`best_span`'s ``(i, j)``, and its score. ``offsets`` ``[len, 2]`` character offsets into
    ``context``, ``-1`` for pieces outside it (question, special tokens, padding)."""
    if start_logits.ndim != 1 or offsets.shape != (start_logits.shape[0], 2):
        raise ValueError(
            f"decode_span works on one window: logits [len], offsets [len, 2]; got "
            f"{tuple(start_logits.shape)} and {tuple(offsets.shape)}"
        )
    i, j, score = best_span(start_logits, end_logits, offsets[:, 0] >= 0, max_answer_length)
    if torch.isneginf(score):
        return "", float("-inf")
    return context[int(offsets[i, 0]) : int(offsets[j, 1])], float(score)
