"""The Transformer decoder: masked self-attention, encoder–decoder attention, FFN (§3.1)."""
from __future__ import annotations

from torch import Tensor

from fnlm.tree import Params
from fnlm import random
from fnlm.nn._attention import init_multi_head_attention, multi_head_attention
from fnlm.nn._config import TransformerConfig
from fnlm.nn._feedforward import feed_forward, init_feed_forward
from fnlm.nn._norm import init_layer_norm, layer_norm
from fnlm.nn._sublayer import init_stack, sublayer
from fnlm.nn._positional import init_relative_bias, relative_bias


def init_decoder_block(key: random.Key, cfg: TransformerConfig) -> Params:
    k_self, k_cross, k_ffn = random.split(key, 3)
    return {
        "self_attn": init_multi_head_attention(k_self, cfg.d_model, cfg.n_heads, std=cfg.init_std),
        "norm1": init_layer_norm(cfg.d_model),
        "cross_attn": init_multi_head_attention(k_cross, cfg.d_model, cfg.n_heads, std=cfg.init_std),
        "norm2": init_layer_norm(cfg.d_model),
        "ffn": init_feed_forward(k_ffn, cfg.d_model, cfg.d_ff, std=cfg.init_std),
        "norm3": init_layer_norm(cfg.d_model),
    }


def decoder_block(
    params: Params,
    y: Tensor,
    memory: Tensor,
    cfg: TransformerConfig,
    *,
    tgt_padding_mask: Tensor | None = None,
    memory_padding_mask: Tensor | None = None,
    self_bias: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> Tensor:
    """One decoder layer, ``y: [*batch, len_t, d_model]``, ``memory: [*batch, len_s, d_model]``.

    Post-LN::

        y = LayerNorm(y + Dropout(MultiHead(y, y, y, causal)))       # masked self-attention
        y = LayerNorm(y + Dropout(MultiHead(y, memory, memory)))     # encoder–decoder attention
        y = LayerNorm(y + Dropout(FFN(y)))

    The causal mask (position ``i`` sees ``j <= i``) keeps predictions auto-regressive.
    """
    ks = random.split_or_none(key, 5)
    residual = dict(norm_first=cfg.norm_first, eps=cfg.layer_norm_eps, rate=cfg.dropout, train=train)

    def self_attention(h):
        return multi_head_attention(params["self_attn"], h, causal=True, key_padding_mask=tgt_padding_mask,
                                    bias=self_bias, dropout=cfg.attention_dropout, key=ks[0], train=train)

    def cross_attention(h):
        return multi_head_attention(params["cross_attn"], h, memory, key_padding_mask=memory_padding_mask,
                                    dropout=cfg.attention_dropout, key=ks[1], train=train)

    def ffn(h):
        return feed_forward(params["ffn"], h, cfg.activation)

    sublayers = [(self_attention, "norm1", ks[2]), (cross_attention, "norm2", ks[3]), (ffn, "norm3", ks[4])]
    for f, norm, k in sublayers:
        y = sublayer(params[norm], y, f, key=k, **residual)
    return y


def init_decoder(key: random.Key, cfg: TransformerConfig) -> Params:
    k_layers, k_bias = random.split(key)
    params: Params = {"layers": init_stack(k_layers, cfg.decoder_layers, lambda k: init_decoder_block(k, cfg))}
    if cfg.use_final_norm:
        params["norm"] = init_layer_norm(cfg.d_model)
    if cfg.positional == "relative":
        params["relative_bias"] = init_relative_bias(k_bias, cfg.n_heads, cfg.relative_buckets)
    return params


def decoder(
    params: Params,
    y: Tensor,
    memory: Tensor,
    cfg: TransformerConfig,
    *,
    tgt_padding_mask: Tensor | None = None,
    memory_padding_mask: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
) -> Tensor:
    """``N`` decoder blocks over the encoder's ``memory`` (then a final LayerNorm for pre-LN)."""
    self_bias = None
    if "relative_bias" in params:
        n = y.shape[-2]
        self_bias = relative_bias(params["relative_bias"], n, n, bidirectional=False,
                                  max_distance=cfg.relative_max_distance)
    for layer, k in zip(params["layers"], random.split_or_none(key, len(params["layers"]))):
        y = decoder_block(layer, y, memory, cfg, tgt_padding_mask=tgt_padding_mask,
                          memory_padding_mask=memory_padding_mask, self_bias=self_bias, key=k, train=train)
    if "norm" in params:
        y = layer_norm(params["norm"], y, cfg.layer_norm_eps)
    return y
