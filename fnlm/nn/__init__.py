"""The layers of the Transformer, each an ``init_X(key, ...) -> params`` / ``X(params, ...)`` pair
of pure functions.

The modules are private (``_attention.py``, ``_encoder.py``, ...); every public name is
re-exported here, so ``fnlm.nn.encoder`` is the encoder *function* and never hides a module.
From the bottom up: linear maps and embeddings, normalisation and dropout, the feed-forward
network, positional encodings, attention, the residual sub-layer, and the encoder and decoder
stacks built from them.
"""

from fnlm.nn._attention import (
    attention_reference,
    causal_mask,
    init_multi_head_attention,
    multi_head_attention,
    padding_mask,
    scaled_dot_product_attention,
)
from fnlm.nn._config import TransformerConfig
from fnlm.nn._decoder import decoder, decoder_block, decoder_cached, init_decoder, init_decoder_block
from fnlm.nn._dropout import dropout
from fnlm.nn._dynamic_int8 import dynamic_int8_matmul, int8_linear
from fnlm.nn._embedding import check_token_ids, embedding, init_embedding
from fnlm.nn._encoder import encoder, encoder_block, init_encoder, init_encoder_block
from fnlm.nn._feedforward import ACTIVATIONS, feed_forward, gelu, gelu_tanh, get_activation, init_feed_forward
from fnlm.nn._kv_cache import (
    cache_capacity,
    cache_mask,
    cache_positions,
    cache_slots,
    cached_attention,
    cached_cross_attention,
    cross_kv,
    init_kv_cache,
)
from fnlm.nn._linear import init_linear, linear
from fnlm.nn._lora import LoraConfig, init_lora, lora_targets, merge_lora
from fnlm.nn._losses import accuracy, cross_entropy
from fnlm.nn._norm import init_layer_norm, layer_norm, layer_norm_reference
from fnlm.nn._positional import (
    check_length,
    init_learned_positional,
    init_relative_bias,
    learned_positional,
    relative_bias,
    relative_position_bucket,
    sinusoidal_encoding,
    sinusoidal_table,
)
from fnlm.nn._quantize import dequantize_int8, quantize_int8, quantize_weight, with_int8_weights
from fnlm.nn._remat import remat
from fnlm.nn._sublayer import init_stack, sublayer

__all__ = [
    "dequantize_int8",
    "quantize_int8",
    "quantize_weight",
    "with_int8_weights",
    "dynamic_int8_matmul",
    "int8_linear",
    "LoraConfig",
    "lora_targets",
    "merge_lora",
    "remat",
    "cache_capacity",
    "cache_mask",
    "cache_positions",
    "cache_slots",
    "cached_attention",
    "cached_cross_attention",
    "cross_kv",
    "decoder_cached",
    "init_kv_cache",
    "ACTIVATIONS",
    "TransformerConfig",
    "accuracy",
    "attention_reference",
    "causal_mask",
    "check_length",
    "check_token_ids",
    "cross_entropy",
    "decoder",
    "decoder_block",
    "dropout",
    "embedding",
    "encoder",
    "encoder_block",
    "feed_forward",
    "gelu",
    "gelu_tanh",
    "get_activation",
    "init_decoder",
    "init_decoder_block",
    "init_embedding",
    "init_encoder",
    "init_encoder_block",
    "init_feed_forward",
    "init_layer_norm",
    "init_learned_positional",
    "init_linear",
    "init_lora",
    "init_multi_head_attention",
    "init_relative_bias",
    "init_stack",
    "layer_norm",
    "layer_norm_reference",
    "learned_positional",
    "linear",
    "multi_head_attention",
    "padding_mask",
    "relative_bias",
    "relative_position_bucket",
    "scaled_dot_product_attention",
    "sinusoidal_encoding",
    "sinusoidal_table",
    "sublayer",
]
