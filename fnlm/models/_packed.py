"""BERT on packed rows (MosaicBERT's unpadding): several sequences per row, kept apart.

For a row holding sequences ``1 .. k`` (``sequence_ids`` ``s_t``, 0 on padding) with positions
restarting at 0 in each (``position_ids`` ``p_t``), :func:`bert_classifier_packed` computes::

    x_t = Dropout(LN(E[w_t] + S[0] + P[p_t]))
    h   = Encoder(x) with attention allowed only where s_i == s_j     (block-diagonal mask)
    logits_n = Dropout(tanh(h_[CLS of n] W_p + b_p)) W_c + b_c        (each sequence's [CLS])

which is exactly :func:`fnlm.models.bert_classifier` of each sequence run alone (tests/test_packing.py
checks it within 1e-5), but with no matrix product on padding between sequences. The attention
itself still runs over whole rows (SDPA with a boolean mask; the masked-out blocks are computed and
discarded), so packing pays where the linear maps dominate, i.e. rows not much longer than d_model.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from fnlm import random
from fnlm.models._bert import BertConfig, _check_config, _check_labels
from fnlm.nn._dropout import dropout
from fnlm.nn._embedding import embedding
from fnlm.nn._encoder import encoder_block
from fnlm.nn._linear import linear
from fnlm.nn._losses import accuracy, cross_entropy
from fnlm.nn._norm import layer_norm
from fnlm.nn._positional import check_length
from fnlm.tree import Params


def packed_attention_mask(sequence_ids: Tensor) -> Tensor:
    """``M[b, i, j] = (s_bi == s_bj)``: ``[B, L] -> [B, 1, L, L]`` boolean (True = may attend),
    block-diagonal over the row's sequences; padding (id 0) attends only to padding, so no
    softmax row is empty."""
    return (sequence_ids[..., :, None] == sequence_ids[..., None, :])[..., None, :, :]


def bert_classifier_packed(
    params: Params,
    batch: Mapping[str, Tensor],
    cfg: BertConfig,
    *,
    key: random.Key | None = None,
    train: bool = False,
) -> Tensor:
    """Logits ``[N, num_labels]`` for the ``N`` sequences of a packed batch (see
    :func:`fnlm.data.pack_sequences`: ``input_ids``, ``position_ids``, ``sequence_ids`` ``[B, L]``,
    ``cls_index [N, 2]``), in ``cls_index`` order. Same parameters as ``bert_classifier``."""
    _check_config(cfg)
    ids, pos, seq = batch["input_ids"], batch["position_ids"], batch["sequence_ids"]
    if not (ids.ndim == 2 and ids.shape == pos.shape == seq.shape):
        raise ValueError(
            f"input_ids {tuple(ids.shape)}, position_ids {tuple(pos.shape)} and sequence_ids "
            f"{tuple(seq.shape)} must all be [rows, len]"
        )
    check_length(ids.shape[-1], cfg.max_position_embeddings, "packed row")
    p, tcfg = params["bert"], cfg.transformer_config()
    k_emb, k_enc, k_drop = random.split_or_none(key, 3)
    emb = p["embeddings"]
    x = (
        embedding(emb["word"], ids)
        + embedding(emb["token_type"], torch.zeros_like(ids))
        + embedding(emb["position"], pos)
    )
    x = dropout(layer_norm(emb["norm"], x, cfg.layer_norm_eps), cfg.hidden_dropout_prob, key=k_emb, train=train)
    mask = packed_attention_mask(seq)
    layers = p["encoder"]["layers"]
    for layer, k in zip(layers, random.split_or_none(k_enc, len(layers))):
        x = encoder_block(layer, x, tcfg, mask=mask, key=k, train=train)
    cls = x[batch["cls_index"][:, 0], batch["cls_index"][:, 1]]  # [N, H]
    pooled = torch.tanh(linear(p["pooler"], cls))
    rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
    return linear(params["classifier"], dropout(pooled, rate, key=k_drop, train=train))


def packed_classifier_loss(
    params: Params, batch: Mapping[str, Tensor], cfg: BertConfig, *, key: random.Key | None = None, train: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(mean cross-entropy over the N packed sequences, {'accuracy'})``: :func:`fnlm.models.classifier_loss`
    for a packed batch (``labels [N]``, optional ``weight [N]``)."""
    logits = bert_classifier_packed(params, batch, cfg, key=key, train=train)
    labels, weight = batch["labels"], batch.get("weight")
    _check_labels(labels, logits.shape[-1], logits.shape[:-1], "one per packed sequence")
    return cross_entropy(logits, labels, weight=weight), {"accuracy": accuracy(logits, labels, weight=weight)}
