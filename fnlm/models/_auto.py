"""One entry point for sequence classifiers of the BERT family, chosen by ``config.json``'s
``model_type`` (``bert``, ``roberta``, ``distilbert``): load, run, loss and save, so a fine-tuning
script handles all three with the same four calls."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from fnlm import random
from fnlm.io._safetensors import CheckpointError
from fnlm.models._bert import BertConfig, bert_classifier, classifier_loss
from fnlm.models._bert_family import (
    DistilBertConfig,
    RobertaConfig,
    distilbert_classifier,
    roberta_classifier,
    sequence_classifier_loss,
)
from fnlm.models._bert_family_hf import (
    distilbert_config_to_hf,
    load_distilbert,
    load_roberta,
    roberta_config_to_hf,
    save_distilbert,
    save_roberta,
)
from fnlm.models._bert_hf import bert_config_to_hf, load_bert, save_bert
from fnlm.tree import Params

#: ``model_type`` values :func:`load_classifier` understands.
MODEL_TYPES = ("bert", "roberta", "distilbert")
#: each ``model_type``'s loader (``path, *, head, num_labels, head_key, dtype, device``)
LOADERS = {"bert": load_bert, "roberta": load_roberta, "distilbert": load_distilbert}


def read_model_type(path: str | os.PathLike) -> str:
    """``model_type`` of the ``config.json`` in checkpoint directory ``path`` (``'bert'`` when absent)."""
    p = Path(path)
    cfg_path = (p if p.is_dir() else p.parent) / "config.json"
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no config.json found at {cfg_path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not a JSON config file ({e})") from None
    t = d.get("model_type", "bert")
    if t not in MODEL_TYPES:
        raise CheckpointError(f"{cfg_path}: model_type {t!r} is not supported; fnlm loads {', '.join(MODEL_TYPES)}")
    return t


def load_classifier(
    path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    head_key: random.Key | None = None,
    strict: bool = True,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Params, BertConfig | RobertaConfig | DistilBertConfig]:
    """``(params, cfg)`` of a sequence classifier from a BERT, RoBERTa or DistilBERT directory
    (:func:`load_bert` / :func:`load_roberta` / :func:`load_distilbert` with ``head='classifier'``);
    ``head_key`` initialises the head when the checkpoint has none, ``num_labels`` overrides the config's."""
    kw = dict(head="classifier", num_labels=num_labels, strict=strict, head_key=head_key, dtype=dtype, device=device)
    return LOADERS[read_model_type(path)](path, **kw)


def classifier_logits(
    params: Params,
    input_ids: Tensor,
    cfg: BertConfig | RobertaConfig | DistilBertConfig,
    *,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> Tensor:
    """``logits [*batch, C]`` of the classifier ``cfg`` describes (DistilBERT ignores ``token_type_ids``)."""
    if isinstance(cfg, RobertaConfig):
        return roberta_classifier(
            params, input_ids, cfg, attention_mask=attention_mask, token_type_ids=token_type_ids, key=key, train=train
        )
    if isinstance(cfg, DistilBertConfig):
        return distilbert_classifier(params, input_ids, cfg, attention_mask=attention_mask, key=key, train=train)
    return bert_classifier(
        params, input_ids, cfg, attention_mask=attention_mask, token_type_ids=token_type_ids, key=key, train=train
    )


def any_classifier_loss(
    params: Params,
    batch: Mapping[str, Tensor],
    cfg: BertConfig | RobertaConfig | DistilBertConfig,
    *,
    key: random.Key | None = None,
    train: bool = False,
    remat: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`classifier_loss` for BERT, :func:`sequence_classifier_loss` for RoBERTa/DistilBERT
    (``remat``: BERT's only; a ValueError for the others)."""
    if isinstance(cfg, (RobertaConfig, DistilBertConfig)):
        if remat is not None:
            raise ValueError(f"remat is implemented for BERT only, not {type(cfg).__name__}")
        return sequence_classifier_loss(params, batch, cfg, key=key, train=train)
    return classifier_loss(params, batch, cfg, key=key, train=train, remat=remat)


def classifier_config_to_hf(cfg: BertConfig | RobertaConfig | DistilBertConfig) -> dict:
    """The ``config.json`` dict of the sequence classifier ``cfg`` describes, as ``transformers`` reads it."""
    if isinstance(cfg, RobertaConfig):
        return roberta_config_to_hf(cfg, "classifier")
    if isinstance(cfg, DistilBertConfig):
        return distilbert_config_to_hf(cfg, "classifier")
    return bert_config_to_hf(cfg, "classifier")


def save_classifier(
    params: Params,
    cfg: BertConfig | RobertaConfig | DistilBertConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """:func:`save_bert` / :func:`save_roberta` / :func:`save_distilbert`, by the type of ``cfg``."""
    if isinstance(cfg, RobertaConfig):
        return save_roberta(params, cfg, out_dir, tokenizer_dir=tokenizer_dir)
    if isinstance(cfg, DistilBertConfig):
        return save_distilbert(params, cfg, out_dir, tokenizer_dir=tokenizer_dir)
    return save_bert(params, cfg, out_dir, tokenizer_dir=tokenizer_dir)
