"""fnlm: a pure-functional, JAX-style Transformer framework on torch.func.

Models are data (params are nested dicts of tensors); every layer is an ``init_X`` / ``X`` pair
of pure functions; randomness comes from explicit keys; ``torch.func`` and ``torch.compile`` do
the rest. See docs/math_to_code.md for the equation behind each function.

The package follows the architecture, bottom up:

* foundations: :mod:`fnlm.random` (explicit keys), :mod:`fnlm.tree` (pytrees);
* :mod:`fnlm.nn`: the layers (linear, embedding, norm, dropout, feed-forward, positional,
  attention, residual sub-layer, encoder, decoder);
* :mod:`fnlm.models`: the encoder–decoder Transformer, BERT, and their checkpoint mappings;
* :mod:`fnlm.optim` and :mod:`fnlm.train`: optimizers, the compiled step, checkpoints, ``vmap``
  tricks, data parallel;
* :mod:`fnlm.data` and :mod:`fnlm.io`: IMDb, batching, the tokenizer, safetensors, downloads.

The most used names are re-exported here (``fnlm.multi_head_attention``, ``fnlm.load_bert``).
"""
from fnlm import config, data, io, models, nn, optim, random, train, tree
from fnlm import metrics
from fnlm.data import load_tokenizer
from fnlm.models import (
    BertConfig,
    bert,
    bert_classifier,
    bert_mlm,
    bert_pretraining,
    classifier_loss,
    decode,
    embed,
    encode,
    greedy_decode,
    init_bert,
    init_bert_classifier,
    init_bert_mlm,
    init_transformer,
    load_bert,
    mask_tokens,
    mlm_loss,
    pretraining_loss,
    save_bert,
    sentence_embedding,
    transformer,
)
from fnlm.nn import (
    TransformerConfig,
    accuracy,
    attention_reference,
    causal_mask,
    check_token_ids,
    cross_entropy,
    decoder,
    decoder_block,
    dropout,
    embedding,
    encoder,
    encoder_block,
    feed_forward,
    gelu,
    gelu_tanh,
    get_activation,
    init_decoder,
    init_decoder_block,
    init_embedding,
    init_encoder,
    init_encoder_block,
    init_feed_forward,
    init_layer_norm,
    init_learned_positional,
    init_linear,
    init_multi_head_attention,
    init_relative_bias,
    layer_norm,
    layer_norm_reference,
    learned_positional,
    linear,
    multi_head_attention,
    padding_mask,
    relative_bias,
    relative_position_bucket,
    scaled_dot_product_attention,
    sinusoidal_encoding,
    sinusoidal_table,
)
from fnlm.train import (
    COMPILE_OPTIONS,
    compile_fn,
    distributed,
    dp_aggregate,
    load_train_state,
    make_dp_sgd_step,
    make_ensemble_step,
    make_eval_step,
    make_train_step,
    per_example_grad_norms,
    per_example_grads,
    save_train_state,
)

from fnlm.models import load_lora, save_lora
from fnlm.models import GPT2Config, generate, gpt2, init_gpt2, lm_loss, load_gpt2, save_gpt2
from fnlm.nn import LoraConfig, init_lora, merge_lora
from fnlm.train import with_frozen

__version__ = "0.1.0"

__all__ = [
    # subpackages
    "config", "data", "distributed", "io", "models", "nn", "optim", "random", "train", "tree",
    "metrics",
    # fnlm.nn
    "TransformerConfig", "accuracy", "attention_reference", "causal_mask", "check_token_ids", "cross_entropy",
    "decoder", "decoder_block", "dropout", "embedding", "encoder", "encoder_block", "feed_forward", "gelu",
    "gelu_tanh", "get_activation", "init_decoder", "init_decoder_block", "init_embedding", "init_encoder",
    "init_encoder_block", "init_feed_forward", "init_layer_norm", "init_learned_positional", "init_linear",
    "init_multi_head_attention", "init_relative_bias", "layer_norm", "layer_norm_reference", "learned_positional",
    "linear", "multi_head_attention", "padding_mask", "relative_bias", "relative_position_bucket",
    "scaled_dot_product_attention", "sinusoidal_encoding", "sinusoidal_table",
    # fnlm.models
    "GPT2Config", "generate", "gpt2", "init_gpt2", "lm_loss", "load_gpt2", "save_gpt2",
    "BertConfig", "bert", "bert_classifier", "bert_mlm", "classifier_loss", "decode", "embed", "encode",
    "greedy_decode", "init_bert", "init_bert_classifier", "init_bert_mlm", "init_transformer", "load_bert",
    "mask_tokens", "mlm_loss", "save_bert", "sentence_embedding", "transformer", "bert_pretraining",
    "pretraining_loss",
    # fnlm.train
    "COMPILE_OPTIONS", "compile_fn", "dp_aggregate", "load_train_state", "make_dp_sgd_step", "make_ensemble_step",
    "make_eval_step", "make_train_step", "per_example_grad_norms", "per_example_grads", "save_train_state",
    # fnlm.data
    "load_tokenizer",
    # fine-tuning that fits: LoRA adapters, frozen parameters
    "LoraConfig", "init_lora", "load_lora", "merge_lora", "save_lora", "with_frozen",
]
