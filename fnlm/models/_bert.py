"""BERT (Devlin et al. 2019) as pure functions, assembled from fnlm's core layers.

BERT's encoder layer *is* fnlm's post-LN encoder block (``cfg.norm_first=False``)::

    x = LayerNorm(x + Dropout(MultiHead(x, x, x)))
    x = LayerNorm(x + Dropout(act(x W1 + b1) W2 + b2))

so :func:`bert` only adds what is specific to BERT around :func:`fnlm.nn.encoder`:

* embeddings: ``x_t = Dropout(LN(E[w_t] + S[s_t] + P[t]))`` (word, segment/token-type and
  learned absolute position tables, no ``sqrt(d_model)`` scaling);
* the pooler: ``pooled = tanh(h_[CLS] W_p + b_p)`` on the first token;
* heads: sequence classification ``logits = Dropout(pooled) W_c + b_c``, masked-LM
  ``logits = LN(act(h W_t + b_t)) E^T + b`` (decoder tied to the word embeddings) and, for
  pretraining, next-sentence prediction ``logits = pooled W_s + b_s`` (2 classes).

Params are plain pytrees (layout in :func:`init_bert`); hyper-parameters live in the frozen,
hashable :class:`BertConfig`. :mod:`fnlm.models._bert_hf` maps Hugging Face checkpoints (and ``config.json``) onto
these trees and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from fnlm import random
from fnlm._checks import is_traced
from fnlm._memory import check_bound, check_eps
from fnlm.nn._config import TransformerConfig
from fnlm.nn._dropout import dropout
from fnlm.nn._embedding import check_token_ids, embedding, init_embedding
from fnlm.nn._encoder import encoder, init_encoder
from fnlm.nn._feedforward import get_activation
from fnlm.nn._linear import init_linear, linear
from fnlm.nn._losses import accuracy, cross_entropy
from fnlm.nn._norm import init_layer_norm, layer_norm
from fnlm.nn._positional import check_length, init_learned_positional, learned_positional
from fnlm.tree import Params

#: ``hidden_act`` values understood both by fnlm and by Hugging Face's ``ACT2FN``.
HF_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh")
#: ``head`` names: a bare encoder, sequence classification, masked language modelling, and
#: BERT's pretraining heads together (MLM + next-sentence prediction, ``BertForPreTraining``), and the
#: token-level heads of :mod:`fnlm.models._bert_heads` (``BertForTokenClassification``,
#: ``BertForQuestionAnswering``).
HEADS = ("none", "classifier", "mlm", "pretraining", "token_classifier", "span")

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "num_labels",
)
_BOUNDS = {
    "vocab_size": "vocab",
    "hidden_size": "width",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "intermediate_size": "width",
    "max_position_embeddings": "positions",
    "type_vocab_size": "vocab",
    "num_labels": "labels",
}
_FLOAT_FIELDS = ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters, named as in Hugging Face's ``config.json``. Defaults: BERT-base.

    ``classifier_dropout`` (``None``: use ``hidden_dropout_prob``) and ``id2label`` (label names,
    ``None``: ``LABEL_0 .. LABEL_{n-1}``) only matter for the classification head.
    ``fused_attention_dropout`` (fnlm's, not written to ``config.json``): attention dropout inside
    the fused kernel, masks from torch's global generator seeded per step from the key
    (:class:`fnlm.TransformerConfig`, ``make_train_step(seed_global_rng=True)``).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    num_labels: int = 2
    classifier_dropout: float | None = None
    id2label: tuple[str, ...] | None = None
    fused_attention_dropout: bool = False

    def __post_init__(self):
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {v!r}")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"BertConfig.{name} must be a number, got {v!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in HF_ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act must be one of {HF_ACTIVATIONS}, got {self.hidden_act!r}")
        check_eps("BertConfig", "layer_norm_eps", self.layer_norm_eps)
        for name, kind in _BOUNDS.items():
            check_bound("BertConfig", name, getattr(self, name), kind)
        if not self.initializer_range > 0:
            raise ValueError(f"BertConfig.initializer_range must be > 0, got {self.initializer_range}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {v}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"BertConfig.pad_token_id={self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        if self.id2label is not None:
            if not isinstance(self.id2label, tuple) or not all(isinstance(s, str) for s in self.id2label):
                raise ValueError(f"BertConfig.id2label must be a tuple of label names, got {self.id2label!r}")
            if len(self.id2label) != self.num_labels:
                raise ValueError(f"BertConfig.id2label has {len(self.id2label)} names but num_labels={self.num_labels}")
        # Built once here, so that apply functions (also under torch.compile) only read it.
        object.__setattr__(
            self,
            "_transformer_config",
            TransformerConfig(
                d_model=self.hidden_size,
                n_heads=self.num_attention_heads,
                d_ff=self.intermediate_size,
                n_layers=self.num_hidden_layers,
                dropout=self.hidden_dropout_prob,
                attention_dropout=self.attention_probs_dropout_prob,
                activation=self.hidden_act,
                norm_first=False,
                final_norm=False,
                layer_norm_eps=float(self.layer_norm_eps),
                max_len=self.max_position_embeddings,
                init_std=float(self.initializer_range),
                positional="learned",
                scale_embeddings=False,
                src_vocab_size=self.vocab_size,
                fused_attention_dropout=bool(self.fused_attention_dropout),
            ),
        )

    def transformer_config(self) -> TransformerConfig:
        """The equivalent :class:`fnlm.TransformerConfig` (post-LN, no final LN, BERT's init)."""
        return self._transformer_config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names: ``id2label`` or ``LABEL_0 .. LABEL_{num_labels-1}`` (HF's default)."""
        return self.id2label if self.id2label is not None else tuple(f"LABEL_{i}" for i in range(self.num_labels))


def _check_config(cfg: Any) -> BertConfig:
    if not isinstance(cfg, BertConfig):
        raise TypeError(f"cfg must be a BertConfig, got {type(cfg).__name__}")
    return cfg


# ----------------------------------------------------------------------------- init
def init_bert_embeddings(key: random.Key, cfg: BertConfig) -> Params:
    """``word [V, H]``, ``position [P, H]``, ``token_type [T, H]`` ~ ``N(0, initializer_range^2)``
    (the ``pad_token_id`` row of ``word`` zeroed, as HF), ``norm``: ``gamma = 1``, ``beta = 0``."""
    kw, kp, kt = random.split(key, 3)
    std = float(cfg.initializer_range)
    word = init_embedding(kw, cfg.vocab_size, cfg.hidden_size, std=std)
    if cfg.pad_token_id is not None:
        word["weight"] = word["weight"].index_fill(0, torch.tensor([cfg.pad_token_id]), 0.0)
    return {
        "word": word,
        "position": init_learned_positional(kp, cfg.max_position_embeddings, cfg.hidden_size, std=std),
        "token_type": init_embedding(kt, cfg.type_vocab_size, cfg.hidden_size, std=std),
        "norm": init_layer_norm(cfg.hidden_size),
    }


def init_bert(key: random.Key, cfg: BertConfig, *, pooler: bool = True) -> Params:
    """A bare BERT as Hugging Face initialises it: linears and embeddings ``N(0, initializer_range^2)``,
    biases 0, LayerNorm ``gamma = 1``, ``beta = 0``. Tree::

        {'embeddings': {'word': {'weight'}, 'position': {'weight'}, 'token_type': {'weight'},
                        'norm': {'gamma', 'beta'}},
         'encoder': {'layers': [fnlm encoder_block params] * num_hidden_layers},
         'pooler': {'weight' [H, H], 'bias' [H]}}      # absent with pooler=False
    """
    _check_config(cfg)
    ke, kenc, kp = random.split(key, 3)
    params: Params = {
        "embeddings": init_bert_embeddings(ke, cfg),
        "encoder": init_encoder(kenc, cfg.transformer_config()),
    }
    if pooler:
        params["pooler"] = init_linear(kp, cfg.hidden_size, cfg.hidden_size, std=float(cfg.initializer_range))
    return params


def init_classifier_head(key: random.Key, cfg: BertConfig, num_labels: int | None = None) -> Params:
    """``{'weight': [H, num_labels] ~ N(0, initializer_range^2), 'bias': zeros}``."""
    n = cfg.num_labels if num_labels is None else num_labels
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"num_labels must be a positive int, got {n!r}")
    return init_linear(key, cfg.hidden_size, n, std=float(cfg.initializer_range))


def init_mlm_head(key: random.Key, cfg: BertConfig) -> Params:
    """``{'transform': linear [H, H], 'norm': LN, 'bias': zeros [V]}``; the decoder matrix is the
    word embedding table (tied), so it is not stored here."""
    return {
        "transform": init_linear(key, cfg.hidden_size, cfg.hidden_size, std=float(cfg.initializer_range)),
        "norm": init_layer_norm(cfg.hidden_size),
        "bias": torch.zeros(cfg.vocab_size),
    }


def init_nsp_head(key: random.Key, cfg: BertConfig) -> Params:
    """Next-sentence prediction: ``{'weight': [H, 2] ~ N(0, initializer_range^2), 'bias': zeros [2]}``
    (HF's ``cls.seq_relationship``; class 0 = B follows A, 1 = B is a random sentence)."""
    return init_linear(key, cfg.hidden_size, 2, std=float(cfg.initializer_range))


def init_pretraining_heads(key: random.Key, cfg: BertConfig) -> Params:
    """``{'mlm': init_mlm_head(...), 'nsp': init_nsp_head(...)}``: the heads of ``BertForPreTraining``."""
    km, kn = random.split(key)
    return {"mlm": init_mlm_head(km, cfg), "nsp": init_nsp_head(kn, cfg)}


def init_bert_classifier(key: random.Key, cfg: BertConfig, num_labels: int | None = None) -> Params:
    """``{'bert': init_bert(...), 'classifier': {'weight' [H, C], 'bias' [C]}}``, ``C = num_labels``
    (default ``cfg.num_labels``), as ``BertForSequenceClassification``."""
    _check_config(cfg)
    kb, kc = random.split(key)
    return {"bert": init_bert(kb, cfg), "classifier": init_classifier_head(kc, cfg, num_labels)}


def init_bert_mlm(key: random.Key, cfg: BertConfig) -> Params:
    """``{'bert': init_bert(..., pooler=False), 'mlm': init_mlm_head(...)}``, as ``BertForMaskedLM``
    (which has no pooler)."""
    _check_config(cfg)
    kb, km = random.split(key)
    return {"bert": init_bert(kb, cfg, pooler=False), "mlm": init_mlm_head(km, cfg)}


def init_bert_pretraining(key: random.Key, cfg: BertConfig) -> Params:
    """``{'bert': init_bert(...) (with pooler), 'mlm': ..., 'nsp': ...}``, as ``BertForPreTraining``."""
    _check_config(cfg)
    kb, kh = random.split(key)
    return {"bert": init_bert(kb, cfg), **init_pretraining_heads(kh, cfg)}


# ----------------------------------------------------------------------------- apply
def _check_ids(input_ids: Any) -> None:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.ndim == 0:
        raise ValueError("input_ids must have shape [*batch, len], got a scalar")


def _check_same_shape(name: str, x: Any, input_ids: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.shape != input_ids.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, but input_ids has shape {tuple(input_ids.shape)}; they must be equal"
        )


def bert_embeddings(
    params: Params,
    input_ids: Tensor,
    cfg: BertConfig,
    *,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> Tensor:
    """``x_t = Dropout(LN(E[w_t] + S[s_t] + P[t]))``: ``[*batch, len] ids -> [*batch, len, H]``.

    ``s_t`` (``token_type_ids``) defaults to 0, as in HF.
    """
    _check_ids(input_ids)
    check_length(input_ids.shape[-1], cfg.max_position_embeddings, "input_ids sequence")
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    else:
        _check_same_shape("token_type_ids", token_type_ids, input_ids)
        check_token_ids(token_type_ids, cfg.type_vocab_size, "token_type_ids")
    x = embedding(params["word"], input_ids) + embedding(params["token_type"], token_type_ids)
    x = learned_positional(params["position"], x)
    x = layer_norm(params["norm"], x, cfg.layer_norm_eps)
    return dropout(x, cfg.hidden_dropout_prob, key=key, train=train)


def bert(
    params: Params,
    input_ids: Tensor,
    cfg: BertConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    pooled_only: bool = False,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    remat: str | list[str | None] | None = None,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, dict[str, tuple[Tensor, ...]]]:
    """``(last_hidden [*batch, len, H], pooled [*batch, H])``.

    ``h = Encoder(Embed(ids))`` with fnlm's post-LN blocks; ``pooled = tanh(h_0 W_p + b_p)`` on
    the first ([CLS]) token (``None`` if ``params`` has no pooler). ``pooled_only=True``: compute
    only what ``pooled`` needs, so the last layer runs for the [CLS] query alone (all tokens are
    still its keys and values) and ``last_hidden`` is ``[*batch, 1, H]``, the [CLS] row; same
    values, most of one layer's work saved (what a classifier wants). ``attention_mask``
    ``[*batch, len]`` (1/True = real token, 0 = padding) stops attention *to* padded keys; padded
    query positions are still computed (as in HF) and are just ignored downstream. A row with no
    real token at all (a batch-padding row) attends to every position, so its outputs stay finite
    (HF also gives finite, meaningless values there); give such rows weight 0 in the loss.

    ``output_hidden_states`` / ``output_attentions`` (as ``BertModel``'s): return
    ``(last_hidden, pooled, intermediates)`` with ``intermediates['hidden_states']`` the
    ``L + 1`` tensors ``[*batch, len, H]`` after the embeddings and after each layer, and
    ``intermediates['attentions']`` the ``L`` attention probabilities ``[*batch, heads, len, len]``
    (see :func:`fnlm.nn.encoder`). Not asked: the default path, unchanged.

    ``remat``: recompute the layers' activations in the backward pass, a policy for every layer
    (``'nothing'``, ``'matmuls'``) or one entry per layer (see :func:`fnlm.nn.encoder`).
    """
    _check_config(cfg)
    _check_ids(input_ids)
    capture = output_hidden_states or output_attentions
    if capture and pooled_only:
        raise ValueError(
            "pooled_only=True computes only the [CLS] row of the last layer; it cannot be "
            "combined with output_hidden_states / output_attentions"
        )
    mask = None
    if attention_mask is not None:
        _check_same_shape("attention_mask", attention_mask, input_ids)
        mask = attention_mask.bool()
        mask = mask | ~mask.any(-1, keepdim=True)  # all-padding rows: no -inf-only softmax (NaN)
    k_emb, k_enc = random.split_or_none(key, 2)
    x = bert_embeddings(params["embeddings"], input_ids, cfg, token_type_ids=token_type_ids, key=k_emb, train=train)
    h = encoder(
        params["encoder"],
        x,
        cfg.transformer_config(),
        key_padding_mask=mask,
        key=k_enc,
        train=train,
        last_queries=slice(0, 1) if pooled_only else None,
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
        remat=remat,
    )
    h, intermediates = h if capture else (h, None)
    pooled = torch.tanh(linear(params["pooler"], h[..., 0, :])) if "pooler" in params else None
    return (h, pooled, intermediates) if capture else (h, pooled)


def bert_classifier(
    params: Params,
    input_ids: Tensor,
    cfg: BertConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    pooled_only: bool = True,
    remat: str | list[str | None] | None = None,
) -> Tensor:
    """``logits = Dropout(pooled) W_c + b_c``: ``[*batch, num_labels]`` (``BertForSequenceClassification``;
    the dropout rate is ``classifier_dropout``, else ``hidden_dropout_prob``). Only the [CLS] row
    reaches the logits, so the last layer computes that row alone (``bert(..., pooled_only=True)``);
    ``pooled_only=False`` runs it at every position, as HF does: same logits, more work.
    ``remat``: as :func:`bert`'s."""
    k_bert, k_drop = random.split_or_none(key, 2)
    _, pooled = bert(
        params["bert"],
        input_ids,
        cfg,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        key=k_bert,
        train=train,
        pooled_only=pooled_only,
        remat=remat,
    )
    if pooled is None:
        raise ValueError("bert_classifier needs a pooler: params['bert'] has no 'pooler'")
    p = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
    return linear(params["classifier"], dropout(pooled, p, key=k_drop, train=train))


def bert_mlm(
    params: Params,
    input_ids: Tensor,
    cfg: BertConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> Tensor:
    """Masked-LM logits ``[*batch, len, V]``: ``t = LN(act(h W_t + b_t))``, ``logits = t E^T + b``
    with ``E`` the word embedding table (tied decoder, as ``BertForMaskedLM``)."""
    h, _ = bert(
        params["bert"],
        input_ids,
        cfg,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        key=key,
        train=train,
    )
    return _mlm_head(params, h, cfg)


def _mlm_head(params: Params, h: Tensor, cfg: BertConfig) -> Tensor:
    """``LN(act(h W_t + b_t)) E^T + b``, ``E`` = ``params['bert']``'s word embeddings."""
    head = params["mlm"]
    t = get_activation(cfg.hidden_act)(linear(head["transform"], h))
    t = layer_norm(head["norm"], t, cfg.layer_norm_eps)
    E = params["bert"]["embeddings"]["word"]["weight"]
    return linear({"weight": E.mT, "bias": head["bias"]}, t)


def bert_pretraining(
    params: Params,
    input_ids: Tensor,
    cfg: BertConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(mlm_logits [*batch, len, V], nsp_logits [*batch, 2])`` of ``BertForPreTraining``:
    the MLM head of :func:`bert_mlm` on every position, ``nsp = pooled W_s + b_s`` on the pooled
    [CLS] vector (no dropout, as HF). ``token_type_ids`` mark sentence B (1) in a pair."""
    if "pooler" not in params["bert"]:
        raise ValueError("bert_pretraining needs a pooler (NSP reads the pooled [CLS] vector): params['bert'] has none")
    h, pooled = bert(
        params["bert"],
        input_ids,
        cfg,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        key=key,
        train=train,
    )
    return _mlm_head(params, h, cfg), linear(params["nsp"], pooled)


# ----------------------------------------------------------------------------- losses
def _check_labels(labels: Any, n_classes: int, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {list(shape)} ({what})")
    if is_traced(labels) or labels.numel() == 0:
        return
    bad = (labels != -100) & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        raise ValueError(f"labels contain {int(labels[bad][0])}, outside [0, {n_classes}) (use -100 to ignore)")


def classifier_loss(
    params: Params,
    batch: Mapping[str, Tensor],
    cfg: BertConfig,
    *,
    key: random.Key | None = None,
    train: bool = False,
    remat: str | list[str | None] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(L, {'accuracy': acc})`` with ``L = sum_n w_n (-log softmax(z_n)[y_n]) / sum_n w_n``.

    ``batch``: ``input_ids``, ``attention_mask``, optional ``token_type_ids``, ``labels`` ``[B]``
    and optional ``weight`` ``[B]`` (0 for rows that only pad the batch). Works under
    ``torch.func.grad_and_value(..., has_aux=True)`` and ``torch.compile(fullgraph=True)``.
    ``remat``: recompute the encoder's activations in the backward pass (see :func:`bert`).
    """
    logits = bert_classifier(
        params,
        batch["input_ids"],
        cfg,
        attention_mask=batch.get("attention_mask"),
        token_type_ids=batch.get("token_type_ids"),
        key=key,
        train=train,
        remat=remat,
    )
    labels, weight = batch["labels"], batch.get("weight")
    _check_labels(labels, logits.shape[-1], logits.shape[:-1], "one per sequence")
    loss = cross_entropy(logits, labels, weight=weight)
    return loss, {"accuracy": accuracy(logits, labels, weight=weight)}


def mlm_loss(
    params: Params, batch: Mapping[str, Tensor], cfg: BertConfig, *, key: random.Key | None = None, train: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(L, {'accuracy': acc})``, ``L`` = mean cross-entropy over positions whose label is not -100.

    ``batch``: ``input_ids`` (already masked, see :func:`mask_tokens`), ``attention_mask``,
    optional ``token_type_ids``, ``labels`` ``[B, len]`` (original ids at masked positions, -100
    elsewhere).
    """
    logits = bert_mlm(
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
    loss = cross_entropy(logits, labels)
    return loss, {"accuracy": accuracy(logits, labels)}


def pretraining_loss(
    params: Params, batch: Mapping[str, Tensor], cfg: BertConfig, *, key: random.Key | None = None, train: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = L_MLM + L_NSP`` (``BertForPreTraining``'s loss): ``L_MLM`` the mean cross-entropy over
    positions whose ``labels`` are not -100, ``L_NSP`` the mean cross-entropy of
    ``next_sentence_label`` ``[B]`` (0 = B follows A, 1 = random B; -100 ignored).

    Aux: ``mlm_loss``, ``nsp_loss``, ``mlm_accuracy``, ``nsp_accuracy``.
    """
    mlm_logits, nsp_logits = bert_pretraining(
        params,
        batch["input_ids"],
        cfg,
        attention_mask=batch.get("attention_mask"),
        token_type_ids=batch.get("token_type_ids"),
        key=key,
        train=train,
    )
    labels, nsp_labels = batch["labels"], batch["next_sentence_label"]
    _check_labels(labels, mlm_logits.shape[-1], mlm_logits.shape[:-1], "one per token")
    _check_labels(nsp_labels, 2, nsp_logits.shape[:-1], "one per sequence pair")
    l_mlm, l_nsp = cross_entropy(mlm_logits, labels), cross_entropy(nsp_logits, nsp_labels)
    return l_mlm + l_nsp, {
        "mlm_loss": l_mlm,
        "nsp_loss": l_nsp,
        "mlm_accuracy": accuracy(mlm_logits, labels),
        "nsp_accuracy": accuracy(nsp_logits, nsp_labels),
    }


def mask_tokens(
    key: random.Key,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int] | Tensor = (),
    prob: float = 0.15,
    *,
    word_starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking (Devlin et al. 2019, §3.1), from an explicit key: ``(masked_ids, labels)``.

    Each real (``attention_mask`` = 1), non-special token is selected with probability ``prob``;
    ``labels`` holds the original id at selected positions and -100 elsewhere. Of the selected
    tokens 80% become ``mask_id``, 10% a uniformly random id in ``[0, vocab_size)``, 10% stay.

    Whole-word masking (``word_starts``: bool ``[*batch, len]``, True where a token begins a word,
    i.e. a WordPiece not starting with ``##``; see ``WordPieceTokenizer.word_starts``): each word
    is selected with probability ``prob`` and then all of its pieces are, or none (as HF's
    ``DataCollatorForWholeWordMask``; the 80/10/10 replacement stays per token).
    """
    _check_ids(input_ids)
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} is outside the vocabulary [0, {vocab_size})")
    shape, dev = input_ids.shape, input_ids.device
    special = torch.as_tensor(
        list(special_ids) if not isinstance(special_ids, Tensor) else special_ids, dtype=input_ids.dtype, device=dev
    ).reshape(-1)
    candidates = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        _check_same_shape("attention_mask", attention_mask, input_ids)
        candidates = candidates & attention_mask.bool()
    k_sel, k_mask, k_rand, k_word = random.split(key, 4)
    draw = random.bernoulli(k_sel, prob, shape, device=dev)
    if word_starts is not None:
        _check_same_shape("word_starts", word_starts, input_ids)
        # every token takes its word's draw: the draw at the last word start at or before it
        # (non-candidates start words of their own, so no word spans a special or padding token)
        starts = word_starts.bool() | ~candidates
        starts[..., 0] = True
        pos = torch.arange(shape[-1], device=dev).expand(shape)
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(-1).values
        draw = draw.gather(-1, first)
    selected = draw & candidates
    to_mask = random.bernoulli(k_mask, 0.8, shape, device=dev) & selected
    to_random = random.bernoulli(k_rand, 0.5, shape, device=dev) & selected & ~to_mask
    words = (random.bits(k_word, shape, device=dev) % vocab_size).to(input_ids.dtype)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(to_random, words, out)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    return out, labels
