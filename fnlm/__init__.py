"""fnlm: a pure-functional, JAX-style Transformer framework on torch.func.

Models are data (params are nested dicts of tensors); every layer is an ``init_X`` / ``X`` pair
of pure functions; randomness comes from explicit keys; ``torch.func`` and ``torch.compile`` do
the rest. See docs/math_to_code.md for the equation behind each function.
"""
from fnlm import data, models, optim, random, tree
from fnlm.attention import (
    attention_reference,
    causal_mask,
    init_multi_head_attention,
    multi_head_attention,
    padding_mask,
    scaled_dot_product_attention,
)
from fnlm.config import TransformerConfig
from fnlm.decoder import decoder, decoder_block, init_decoder, init_decoder_block
from fnlm.dropout import dropout
from fnlm.embedding import check_token_ids, embedding, init_embedding
from fnlm.encoder import encoder, encoder_block, init_encoder, init_encoder_block
from fnlm.feedforward import feed_forward, gelu, gelu_tanh, get_activation, init_feed_forward
from fnlm.linear import init_linear, linear
from fnlm.losses import accuracy, cross_entropy
from fnlm.norm import init_layer_norm, layer_norm, layer_norm_reference
from fnlm.positional import (
    init_learned_positional,
    init_relative_bias,
    learned_positional,
    relative_bias,
    relative_position_bucket,
    sinusoidal_encoding,
    sinusoidal_table,
)
from fnlm.models import (
    BertConfig,
    bert,
    bert_classifier,
    bert_mlm,
    classifier_loss,
    init_bert,
    init_bert_classifier,
    init_bert_mlm,
    load_bert,
    mask_tokens,
    mlm_loss,
    save_bert,
)
from fnlm.checkpoint import load_train_state, save_train_state
from fnlm.tokenizer import load_tokenizer
from fnlm.train import COMPILE_OPTIONS, compile_fn, make_eval_step, make_train_step
from fnlm.vmap_tricks import dp_aggregate, make_dp_sgd_step, make_ensemble_step, per_example_grad_norms, per_example_grads
from fnlm.transformer import decode, embed, encode, greedy_decode, init_transformer, transformer

__version__ = "0.1.0"
