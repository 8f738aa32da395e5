"""Models built from :mod:`fnlm.nn`: the encoder–decoder Transformer and BERT (with its Hugging
Face checkpoint mapping). Each model is a private module of maths (``_bert.py``) beside one of
checkpoint I/O (``_bert_hf.py``); every public name is re-exported here."""
from fnlm.models._bert import (
    BertConfig,
    bert,
    bert_classifier,
    bert_embeddings,
    bert_mlm,
    bert_pretraining,
    classifier_loss,
    init_bert,
    init_bert_classifier,
    init_bert_embeddings,
    init_bert_mlm,
    init_bert_pretraining,
    init_classifier_head,
    init_mlm_head,
    init_nsp_head,
    init_pretraining_heads,
    mask_tokens,
    mlm_loss,
    pretraining_loss,
)
from fnlm._memory import CONFIG_BOUNDS, ConfigMemoryError
from fnlm.models._bert_heads import (
    best_span,
    decode_span,
    init_span_head,
    init_token_classifier,
    span_logits,
    span_loss,
    token_classifier,
    token_classifier_loss,
)
from fnlm.models._export import (
    TamperedPackageError,
    TextClassifier,
    UntrustedPackageError,
    export_classifier,
    export_classifier_program,
    load_classifier_package,
    package_status,
    text_classifier,
)
from fnlm.models._packed import bert_classifier_packed, packed_attention_mask, packed_classifier_loss
from fnlm.models._lora_peft import load_lora, read_lora_config, save_lora
from fnlm.models._pretrained import Pretrained, load_pretrained
from fnlm.models._auto import (any_classifier_loss, classifier_logits, load_classifier, read_model_type,
                               save_classifier)
from fnlm.models._bert_family import (
    DistilBertConfig,
    RobertaConfig,
    distilbert,
    distilbert_classifier,
    init_distilbert,
    init_distilbert_classifier,
    init_roberta,
    init_roberta_classifier,
    roberta,
    roberta_classifier,
    roberta_position_ids,
    sequence_classifier_loss,
)
from fnlm.models._bert_family_hf import (
    distilbert_config_from_hf,
    distilbert_config_to_hf,
    load_distilbert,
    load_roberta,
    roberta_config_from_hf,
    roberta_config_to_hf,
    save_distilbert,
    save_roberta,
)
from fnlm.models._bert_hf import (
    bert_config_from_hf,
    bert_config_to_hf,
    load_bert,
    param_mapping,
    read_bert_config,
    save_bert,
)
from fnlm.models._generate import filter_logits, generate, left_pad, sample_logits
from fnlm.models._gpt2 import (
    GPT2Config,
    decode_step,
    gpt2,
    gpt2_block,
    gpt2_cached,
    gpt2_hidden,
    init_gpt2,
    init_gpt2_block,
    init_gpt2_cache,
    lm_head,
    lm_loss,
    prefill,
)
from fnlm.models._gpt2_hf import gpt2_config_from_hf, gpt2_config_to_hf, load_gpt2, read_gpt2_config, save_gpt2
from fnlm.models._matvec import input_axes_innermost, matvec_layout, matvec_pass
from fnlm.models._pooling import COMBINES, POOLINGS, combine_layers, pool, sentence_embedding
from fnlm.models._embedder import make_embedder
from fnlm.models._attention_maps import attention_maps, cls_summary
from fnlm.models._probe import fit_linear_probe, linear_probe_logits
from fnlm.models._transformer import (
    decode,
    decode_cached,
    embed,
    encode,
    greedy_decode,
    init_decoder_cache,
    init_transformer,
    transformer,
)

__all__ = [
    "any_classifier_loss", "classifier_logits", "load_classifier", "read_model_type", "save_classifier",
    "DistilBertConfig", "RobertaConfig", "distilbert", "distilbert_classifier", "distilbert_config_from_hf",
    "distilbert_config_to_hf", "init_distilbert", "init_distilbert_classifier", "init_roberta",
    "init_roberta_classifier", "load_distilbert", "load_roberta", "roberta", "roberta_classifier",
    "roberta_config_from_hf", "roberta_config_to_hf", "roberta_position_ids", "save_distilbert", "save_roberta",
    "sequence_classifier_loss",
    "best_span", "decode_span", "init_span_head", "init_token_classifier", "span_logits", "span_loss",
    "token_classifier", "token_classifier_loss",
    "bert_classifier_packed", "packed_attention_mask", "packed_classifier_loss",
    "TextClassifier", "export_classifier", "export_classifier_program", "load_classifier_package", "text_classifier",
    "TamperedPackageError", "UntrustedPackageError", "package_status", "CONFIG_BOUNDS", "ConfigMemoryError",
    "load_lora", "read_lora_config", "save_lora",
    "Pretrained", "load_pretrained",
    "GPT2Config", "decode_step", "filter_logits", "generate", "gpt2", "gpt2_block", "gpt2_cached",
    "gpt2_config_from_hf", "gpt2_config_to_hf", "gpt2_hidden", "init_gpt2", "init_gpt2_block", "init_gpt2_cache",
    "left_pad", "lm_head", "lm_loss", "load_gpt2", "prefill", "read_gpt2_config", "sample_logits", "save_gpt2",
    "decode_cached", "init_decoder_cache", "input_axes_innermost", "matvec_layout", "matvec_pass",
    "COMBINES", "POOLINGS", "combine_layers", "pool", "sentence_embedding", "make_embedder", "attention_maps", "cls_summary",
    "fit_linear_probe", "linear_probe_logits",
    "bert_pretraining", "init_bert_pretraining", "init_nsp_head", "init_pretraining_heads", "pretraining_loss",
    "BertConfig", "bert", "bert_classifier", "bert_config_from_hf", "bert_config_to_hf", "bert_embeddings",
    "bert_mlm", "classifier_loss", "decode", "embed", "encode", "greedy_decode", "init_bert",
    "init_bert_classifier", "init_bert_embeddings", "init_bert_mlm", "init_classifier_head", "init_mlm_head",
    "init_transformer", "load_bert", "mask_tokens", "mlm_loss", "param_mapping", "read_bert_config", "save_bert", "transformer",
]
