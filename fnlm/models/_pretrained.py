"""Load a checkpoint for a given head and sequence length: a Hugging Face BERT-family directory
(BERT; RoBERTa and DistilBERT for ``head='classifier'``/``'none'``) or a peft LoRA adapter
directory, with the checks every script needs, in one call."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from fnlm import random
from fnlm.io._safetensors import CheckpointError, MissingHeadError, MissingPoolerError
from fnlm.models._auto import LOADERS, read_model_type
from fnlm.models._bert import BertConfig
from fnlm.models._bert_family import DistilBertConfig, RobertaConfig
from fnlm.models._lora_peft import CONFIG_FILE, load_lora
from fnlm.nn._lora import merge_lora
from fnlm.tree import Params

__all__ = ["Pretrained", "load_pretrained"]


class Pretrained(NamedTuple):
    """What :func:`load_pretrained` returns."""

    params: Params
    cfg: BertConfig | RobertaConfig | DistilBertConfig
    tokenizer: Any
    fresh_head: bool  # the head was missing and initialised from ``head_key``


def load_pretrained(
    path: str | os.PathLike,
    *,
    head: str = "none",
    num_labels: int | None = None,
    max_len: int | None = None,
    head_key: random.Key | None = None,
    pooler: bool | None | str = None,
    dtype=None,
    device="cpu",
) -> Pretrained:
    """``(params, cfg, tokenizer, fresh_head)`` of the checkpoint at ``path`` for ``head`` and sequences of ``max_len``.

    ``path``: a Hugging Face BERT directory (RoBERTa and DistilBERT ones too, for ``head='classifier'``
    or ``'none'``; ``pooler`` is then the checkpoint's), or a peft LoRA adapter directory (``adapter_config.json``):
    then its base model (``base_model_name_or_path``) is loaded as a classifier and the adapters and
    the saved classifier are merged in. A missing head is initialised from ``head_key`` when given
    (``fresh_head=True``), else :class:`~fnlm.io.MissingHeadError`. ``pooler``: as
    :func:`~fnlm.models.load_bert`, or ``"if_present"`` (loaded when the checkpoint has one). Errors:
    :class:`~fnlm.io.CheckpointError` (its subclasses) for the checkpoint, ``ValueError`` naming
    ``max_len`` when it is beyond the model's position table.
    """
    from fnlm.data import load_tokenizer  # fnlm.data imports fnlm.models: import here

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / CONFIG_FILE).is_file():
        return _load_adapter(path, head=head, max_len=max_len, dtype=dtype, device=device)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json, so not a Hugging Face checkpoint directory")
    if pooler not in (None, True, False, "if_present"):
        raise ValueError(f"pooler must be None, True, False or 'if_present', got {pooler!r}")

    model_type = read_model_type(path)
    if model_type != "bert" and head not in ("classifier", "none"):
        raise CheckpointError(
            f"{path / 'config.json'}: a {model_type} checkpoint loads with head='classifier' or "
            f"'none'; the {head!r} head is BERT's"
        )

    def attempt(with_pooler):
        kw = dict(head=head, num_labels=num_labels, dtype=dtype, device=device)
        if model_type == "bert":  # RoBERTa and DistilBERT load the checkpoint's pooler, if any
            kw["pooler"] = with_pooler
        load = LOADERS[model_type]
        try:
            return load(path, **kw), False
        except MissingHeadError:
            if head_key is None:
                raise
        return load(path, head_key=head_key, **kw), True

    if pooler == "if_present":
        try:
            (params, cfg), fresh = attempt(True)
        except MissingPoolerError:
            (params, cfg), fresh = attempt(False)
    else:
        (params, cfg), fresh = attempt(pooler)
    tokenizer = load_tokenizer(path)
    _check(path, cfg, tokenizer, max_len)
    return Pretrained(params, cfg, tokenizer, fresh)


def _check(path: Path, cfg: BertConfig | DistilBertConfig, tokenizer, max_len: int | None) -> None:
    longest = cfg.max_len if isinstance(cfg, RobertaConfig) else cfg.max_position_embeddings
    if max_len is not None and max_len > longest:
        offset = f", less RoBERTa's pad_token_id + 1 = {cfg.pad_token_id + 1}" if isinstance(cfg, RobertaConfig) else ""
        raise ValueError(
            f"--max-len {max_len} (max_len) is longer than the model's position table "
            f"(max_position_embeddings={cfg.max_position_embeddings} in {path / 'config.json'}{offset})"
        )
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but config.json says vocab_size={cfg.vocab_size}"
        )


def _load_adapter(path: Path, *, head: str, max_len, dtype, device) -> Pretrained:
    from fnlm.data import load_tokenizer

    if head != "classifier":
        raise CheckpointError(f"{path}: a LoRA adapter directory loads as head='classifier', not {head!r}")
    try:
        base = Path(json.loads((path / CONFIG_FILE).read_text()).get("base_model_name_or_path") or "")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    if not (base / "config.json").is_file():
        raise CheckpointError(
            f"{path}: its base model {str(base) or '(none named)'} (base_model_name_or_path in "
            f"{CONFIG_FILE}) is not a checkpoint directory here"
        )
    params, cfg, tokenizer, _ = load_pretrained(
        base, head="classifier", max_len=max_len, head_key=random.key(0), dtype=dtype, device=device
    )
    adapters, lora_cfg, cls = load_lora(path, params, cfg)
    if cls is None:
        raise CheckpointError(f"{path}: the adapter has no classifier (modules_to_save); it cannot classify")
    if (path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(path)
        _check(path, cfg, tokenizer, max_len)
    return Pretrained(merge_lora(dict(params, classifier=cls), adapters, lora_cfg), cfg, tokenizer, False)
