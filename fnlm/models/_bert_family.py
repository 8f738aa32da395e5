"""RoBERTa (Liu et al. 2019) and DistilBERT (Sanh et al. 2019): BERT's encoder with other
embeddings and heads, as pure functions. Both run :func:`fnlm.nn.encoder` with BERT's post-LN
blocks; only what differs is written here:

* RoBERTa: positions ``p_t = pad + sum_{s<=t} [w_s != pad]`` for real tokens, ``pad`` for
  padding (fairseq's offset by the padding index, so the table has ``max_len + pad + 1`` rows);
  one token type; classifier ``logits = W_o Dropout(tanh(W_d Dropout(h_<s>) + b_d)) + b_o``
  (``RobertaClassificationHead``, no pooler).
* DistilBERT: ``x_t = Dropout(LN(E[w_t] + P[t]))`` with no token types (``P`` learned, or the
  fixed sinusoidal table ``P[t, 2i] = sin(t / 10000^(2i/d))``, ``P[t, 2i+1] = cos(...)`` when
  ``sinusoidal_pos_embds``; freeze it with :func:`fnlm.train.freeze` to keep it fixed); no pooler;
  classifier ``logits = W_c Dropout(ReLU(W_p h_[CLS] + b_p)) + b_c``.

:mod:`fnlm.models._bert_family_hf` maps Hugging Face checkpoints of both onto these trees and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from fnlm import random
from fnlm.models._bert import HF_ACTIVATIONS, BertConfig, _check_labels, init_bert_embeddings
from fnlm.nn._dropout import dropout
from fnlm.nn._embedding import check_token_ids, embedding, init_embedding
from fnlm.nn._encoder import encoder, init_encoder
from fnlm.nn._linear import init_linear, linear
from fnlm.nn._losses import accuracy, cross_entropy
from fnlm.nn._norm import init_layer_norm, layer_norm
from fnlm.nn._positional import check_length
from fnlm.tree import Params


# ----------------------------------------------------------------------------- RoBERTa
@dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """RoBERTa hyper-parameters: :class:`BertConfig`'s fields with ``RobertaConfig``'s defaults
    (``pad_token_id=1``, ``vocab_size=50265``); ``max_position_embeddings`` counts the
    ``pad_token_id + 1`` offset rows (514 for 512 tokens)."""

    vocab_size: int = 50265
    pad_token_id: int | None = 1

    def __post_init__(self):
        super().__post_init__()
        if self.pad_token_id is None:
            raise ValueError("RobertaConfig.pad_token_id must be set: RoBERTa's positions are offset by it")

    @property
    def max_len(self) -> int:
        """The longest input: ``max_position_embeddings - pad_token_id - 1``."""
        return self.max_position_embeddings - self.pad_token_id - 1


def roberta_position_ids(input_ids: Tensor, pad_token_id: int) -> Tensor:
    """``p_t = pad + (number of non-pad tokens up to t)`` for real tokens, ``pad`` for padding (HF's
    ``create_position_ids_from_input_ids``)."""
    real = (input_ids != pad_token_id).long()
    return torch.cumsum(real, dim=-1) * real + pad_token_id


def init_roberta(key: random.Key, cfg: RobertaConfig, *, pooler: bool = True) -> Params:
    """The tree of :func:`fnlm.models.init_bert` (``embeddings``, ``encoder``, ``pooler``): same shapes,
    the position table's padding row zeroed as HF's ``padding_idx``."""
    ke, kenc, kp = random.split(key, 3)
    emb = init_bert_embeddings(ke, cfg)
    emb["position"]["weight"] = emb["position"]["weight"].index_fill(0, torch.tensor([cfg.pad_token_id]), 0.0)
    params: Params = {"embeddings": emb, "encoder": init_encoder(kenc, cfg.transformer_config())}
    if pooler:
        params["pooler"] = init_linear(kp, cfg.hidden_size, cfg.hidden_size, std=float(cfg.initializer_range))
    return params


def init_roberta_classifier(key: random.Key, cfg: RobertaConfig, num_labels: int | None = None) -> Params:
    """``{'roberta': init_roberta(..., pooler=False), 'classifier': {'dense': [H, H], 'out_proj': [H, C]}}``."""
    kb, kd, ko = random.split(key, 3)
    n = cfg.num_labels if num_labels is None else num_labels
    std = float(cfg.initializer_range)
    return {
        "roberta": init_roberta(kb, cfg, pooler=False),
        "classifier": {
            "dense": init_linear(kd, cfg.hidden_size, cfg.hidden_size, std=std),
            "out_proj": init_linear(ko, cfg.hidden_size, n, std=std),
        },
    }


def _mask(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, but input_ids has shape "
            f"{tuple(input_ids.shape)}; they must be equal"
        )
    m = attention_mask.bool()
    return m | ~m.any(-1, keepdim=True)  # all-padding rows: no -inf-only softmax (NaN)


def roberta(
    params: Params,
    input_ids: Tensor,
    cfg: RobertaConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    pooled_only: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``(last_hidden [*batch, len, H], pooled [*batch, H] or None)``, as ``RobertaModel``:
    ``x_t = Dropout(LN(E[w_t] + S[s_t] + P[p_t]))`` with the offset positions of
    :func:`roberta_position_ids`, then BERT's encoder (``pooled_only``: as :func:`fnlm.models.bert`)."""
    check_length(input_ids.shape[-1], cfg.max_len, "input_ids sequence")
    emb = params["embeddings"]
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    else:
        check_token_ids(token_type_ids, cfg.type_vocab_size, "token_type_ids")
    pos = roberta_position_ids(input_ids, cfg.pad_token_id)
    x = (
        embedding(emb["word"], input_ids)
        + embedding(emb["token_type"], token_type_ids)
        + emb["position"]["weight"][pos]
    )
    k_emb, k_enc = random.split_or_none(key, 2)
    x = dropout(layer_norm(emb["norm"], x, cfg.layer_norm_eps), cfg.hidden_dropout_prob, key=k_emb, train=train)
    h = encoder(
        params["encoder"],
        x,
        cfg.transformer_config(),
        key_padding_mask=_mask(attention_mask, input_ids),
        key=k_enc,
        train=train,
        last_queries=slice(0, 1) if pooled_only else None,
    )
    pooled = torch.tanh(linear(params["pooler"], h[..., 0, :])) if "pooler" in params else None
    return h, pooled


def roberta_classifier(
    params: Params,
    input_ids: Tensor,
    cfg: RobertaConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> Tensor:
    """``logits [*batch, C] = W_o Dropout(tanh(W_d Dropout(h_<s>) + b_d)) + b_o``
    (``RobertaForSequenceClassification``; rate ``classifier_dropout``, else ``hidden_dropout_prob``)."""
    k_body, k1, k2 = random.split_or_none(key, 3)
    h, _ = roberta(
        params["roberta"],
        input_ids,
        cfg,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        key=k_body,
        train=train,
        pooled_only=True,
    )
    p = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
    head = params["classifier"]
    x = torch.tanh(linear(head["dense"], dropout(h[..., 0, :], p, key=k1, train=train)))
    return linear(head["out_proj"], dropout(x, p, key=k2, train=train))


# ----------------------------------------------------------------------------- DistilBERT
@dataclass(frozen=True)
class DistilBertConfig:
    """DistilBERT hyper-parameters, named as in Hugging Face's ``config.json``. Defaults: distilbert-base."""

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    qa_dropout: float = 0.1
    seq_classif_dropout: float = 0.2
    pad_token_id: int | None = 0
    num_labels: int = 2
    id2label: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.activation not in HF_ACTIVATIONS:
            raise ValueError(f"DistilBertConfig.activation must be one of {HF_ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.seq_classif_dropout < 1.0:
            raise ValueError(f"DistilBertConfig.seq_classif_dropout must be in [0, 1), got {self.seq_classif_dropout}")
        object.__setattr__(
            self,
            "_bert",
            BertConfig(
                vocab_size=self.vocab_size,
                hidden_size=self.dim,
                num_hidden_layers=self.n_layers,
                num_attention_heads=self.n_heads,
                intermediate_size=self.hidden_dim,
                max_position_embeddings=self.max_position_embeddings,
                type_vocab_size=1,
                layer_norm_eps=1e-12,
                hidden_act=self.activation,
                hidden_dropout_prob=float(self.dropout),
                attention_probs_dropout_prob=float(self.attention_dropout),
                initializer_range=float(self.initializer_range),
                pad_token_id=self.pad_token_id,
                num_labels=self.num_labels,
                id2label=self.id2label,
            ),
        )

    def bert_config(self) -> BertConfig:
        """The :class:`BertConfig` of the same encoder (BERT's names; DistilBERT's LayerNorm eps 1e-12)."""
        return self._bert

    @property
    def labels(self) -> tuple[str, ...]:
        return self._bert.labels


def distilbert_sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """HF's ``create_sinusoidal_embeddings``: ``P[t, j] = sin/cos(t / 10000^(2 floor(j/2) / dim))``
    (sin on even ``j``, cos on odd), computed in float64 and stored as float32."""
    t = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = t / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    out = torch.empty(n_positions, dim, dtype=torch.float64)
    out[:, 0::2] = torch.sin(angle[:, 0::2])
    out[:, 1::2] = torch.cos(angle[:, 1::2])
    return out.float()


def init_distilbert(key: random.Key, cfg: DistilBertConfig) -> Params:
    """``{'embeddings': {'word', 'position', 'norm'}, 'encoder': {'layers': [...]}}``: no token types, no pooler."""
    kw, kp, kenc = random.split(key, 3)
    std = float(cfg.initializer_range)
    word = init_embedding(kw, cfg.vocab_size, cfg.dim, std=std)
    if cfg.pad_token_id is not None:
        word["weight"] = word["weight"].index_fill(0, torch.tensor([cfg.pad_token_id]), 0.0)
    position = (
        {"weight": distilbert_sinusoidal_table(cfg.max_position_embeddings, cfg.dim)}
        if cfg.sinusoidal_pos_embds
        else init_embedding(kp, cfg.max_position_embeddings, cfg.dim, std=std)
    )
    return {
        "embeddings": {"word": word, "position": position, "norm": init_layer_norm(cfg.dim)},
        "encoder": init_encoder(kenc, cfg.bert_config().transformer_config()),
    }


def init_distilbert_classifier(key: random.Key, cfg: DistilBertConfig, num_labels: int | None = None) -> Params:
    """``{'distilbert': init_distilbert(...), 'pre_classifier': [dim, dim], 'classifier': [dim, C]}``."""
    kb, kp, kc = random.split(key, 3)
    n = cfg.num_labels if num_labels is None else num_labels
    std = float(cfg.initializer_range)
    return {
        "distilbert": init_distilbert(kb, cfg),
        "pre_classifier": init_linear(kp, cfg.dim, cfg.dim, std=std),
        "classifier": init_linear(kc, cfg.dim, n, std=std),
    }


def distilbert(
    params: Params,
    input_ids: Tensor,
    cfg: DistilBertConfig,
    *,
    attention_mask: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    pooled_only: bool = False,
) -> Tensor:
    """``last_hidden [*batch, len, dim]`` of ``DistilBertModel``: ``Dropout(LN(E[w_t] + P[t]))`` then
    BERT's encoder (``pooled_only``: only the first row of the last layer, ``[*batch, 1, dim]``)."""
    check_length(input_ids.shape[-1], cfg.max_position_embeddings, "input_ids sequence")
    emb = params["embeddings"]
    x = embedding(emb["word"], input_ids) + emb["position"]["weight"][: input_ids.shape[-1]]
    k_emb, k_enc = random.split_or_none(key, 2)
    x = dropout(layer_norm(emb["norm"], x, 1e-12), cfg.dropout, key=k_emb, train=train)
    return encoder(
        params["encoder"],
        x,
        cfg.bert_config().transformer_config(),
        key_padding_mask=_mask(attention_mask, input_ids),
        key=k_enc,
        train=train,
        last_queries=slice(0, 1) if pooled_only else None,
    )


def distilbert_classifier(
    params: Params,
    input_ids: Tensor,
    cfg: DistilBertConfig,
    *,
    attention_mask: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> Tensor:
    """``logits [*batch, C] = W_c Dropout(ReLU(W_p h_[CLS] + b_p)) + b_c`` (``DistilBertForSequenceClassification``,
    rate ``seq_classif_dropout``)."""
    k_body, k_drop = random.split_or_none(key, 2)
    h = distilbert(
        params["distilbert"], input_ids, cfg, attention_mask=attention_mask, key=k_body, train=train, pooled_only=True
    )
    x = torch.relu(linear(params["pre_classifier"], h[..., 0, :]))
    return linear(params["classifier"], dropout(x, cfg.seq_classif_dropout, key=k_drop, train=train))


# ----------------------------------------------------------------------------- losses
def sequence_classifier_loss(
    params: Params,
    batch: Mapping[str, Tensor],
    cfg: RobertaConfig | DistilBertConfig,
    *,
    key: random.Key | None = None,
    train: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(L, {'accuracy'})`` as :func:`fnlm.models.classifier_loss`, for a RoBERTa or DistilBERT classifier
    (chosen by ``cfg``'s type); ``batch``: ``input_ids``, ``attention_mask``, ``labels``, optional ``weight``."""
    if isinstance(cfg, RobertaConfig):
        logits = roberta_classifier(
            params,
            batch["input_ids"],
            cfg,
            attention_mask=batch.get("attention_mask"),
            token_type_ids=batch.get("token_type_ids"),
            key=key,
            train=train,
        )
    elif isinstance(cfg, DistilBertConfig):
        logits = distilbert_classifier(
            params, batch["input_ids"], cfg, attention_mask=batch.get("attention_mask"), key=key, train=train
        )
    else:
        raise TypeError(f"cfg must be a RobertaConfig or a DistilBertConfig, got {type(cfg).__name__}")
    labels, weight = batch["labels"], batch.get("weight")
    _check_labels(labels, logits.shape[-1], logits.shape[:-1], "one per sequence")
    return cross_entropy(logits, labels, weight=weight), {"accuracy": accuracy(logits, labels, weight=weight)}
