"""Models built from fnlm's core layers, with Hugging Face checkpoint mapping."""
from fnlm.models.bert import (
    BertConfig,
    bert,
    bert_classifier,
    bert_embeddings,
    bert_mlm,
    classifier_loss,
    init_bert,
    init_bert_classifier,
    init_bert_embeddings,
    init_bert_mlm,
    init_classifier_head,
    init_mlm_head,
    mask_tokens,
    mlm_loss,
)
from fnlm.models.bert_hf import load_bert, param_mapping, save_bert

__all__ = [
    "BertConfig",
    "bert",
    "bert_classifier",
    "bert_embeddings",
    "bert_mlm",
    "classifier_loss",
    "init_bert",
    "init_bert_classifier",
    "init_bert_embeddings",
    "init_bert_mlm",
    "init_classifier_head",
    "init_mlm_head",
    "load_bert",
    "mask_tokens",
    "mlm_loss",
    "param_mapping",
    "save_bert",
]
