"""The Transformer decoder: masked self-attention, encoder–decoder attention, FFN (§3.1)."""

from __future__ import annotations

from torch import Tensor

from fnlm import random
from fnlm.nn._attention import init_multi_head_attention, multi_head_attention, padding_mask
from fnlm.nn._config import TransformerConfig
from fnlm.nn._feedforward import feed_forward, init_feed_forward
from fnlm.nn._kv_cache import cache_capacity, cache_mask, cache_slots, cached_attention, cached_cross_attention
from fnlm.nn._norm import init_layer_norm, layer_norm
from fnlm.nn._positional import init_relative_bias, relative_bias
from fnlm.nn._remat import layer_policies
from fnlm.nn._remat import remat as rematerialise
from fnlm.nn._sublayer import init_stack, sublayer
from fnlm.tree import Params


def init_decoder_block(key: random.Key, cfg: TransformerConfig) -> Params:
    """``{self_attn, norm1, cross_attn, norm2, ffn, norm3}``: the three sub-layers and their LayerNorms."""
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
    memory: Tensor | None,
    cfg: TransformerConfig,
    *,
    tgt_padding_mask: Tensor | None = None,
    memory_padding_mask: Tensor | None = None,
    self_bias: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    cache: Params | None = None,
    slots: Tensor | None = None,
    self_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Params]:
    """One decoder layer, ``y: [*batch, len_t, d_model]``, ``memory: [*batch, len_s, d_model]``.

    Post-LN::

        y = LayerNorm(y + Dropout(MultiHead(y, y, y, causal)))       # masked self-attention
        y = LayerNorm(y + Dropout(MultiHead(y, memory, memory)))     # encoder–decoder attention
        y = LayerNorm(y + Dropout(FFN(y)))

    The causal mask (position ``i`` sees ``j <= i``) keeps predictions auto-regressive.

    Decoding with a KV cache (:mod:`fnlm.nn._kv_cache`): ``y`` holds the new tokens only and
    ``cache = {"self": {"k", "v"}, "cross": {"k", "v"}}`` is this layer's cache (self-attention
    K/V preallocated, the memory's K/V from :func:`fnlm.nn.cross_kv`; ``memory`` is not used).
    The new K/V go into ``slots``, the self-attention mask is ``self_mask``
    (:func:`fnlm.nn.cache_mask`), and the result is ``(y, {"self": updated, "cross": same})``.
    """
    ks = random.split_or_none(key, 5)
    residual = dict(norm_first=cfg.norm_first, eps=cfg.layer_norm_eps, rate=cfg.dropout, train=train)
    new_self: list[Params] = []

    def self_attention(h):
        if cache is not None:
            out, layer = cached_attention(params["self_attn"], h, cache["self"], slots, self_mask, bias=self_bias)
            new_self.append(layer)
            return out
        return multi_head_attention(
            params["self_attn"],
            h,
            causal=True,
            key_padding_mask=tgt_padding_mask,
            bias=self_bias,
            dropout=cfg.attention_dropout,
            key=ks[0],
            train=train,
            impl="sdpa" if cfg.fused_attention_dropout else "auto",
        )

    def cross_attention(h):
        if cache is not None:
            mask = None if memory_padding_mask is None else padding_mask(memory_padding_mask)
            return cached_cross_attention(params["cross_attn"], h, cache["cross"], mask)
        return multi_head_attention(
            params["cross_attn"],
            h,
            memory,
            key_padding_mask=memory_padding_mask,
            dropout=cfg.attention_dropout,
            key=ks[1],
            train=train,
            impl="sdpa" if cfg.fused_attention_dropout else "auto",
        )

    def ffn(h):
        return feed_forward(params["ffn"], h, cfg.activation)

    sublayers = [(self_attention, "norm1", ks[2]), (cross_attention, "norm2", ks[3]), (ffn, "norm3", ks[4])]
    for f, norm, k in sublayers:
        y = sublayer(params[norm], y, f, key=k, **residual)
    return y if cache is None else (y, {"self": new_self[0], "cross": cache["cross"]})


def init_decoder(key: random.Key, cfg: TransformerConfig) -> Params:
    """``{'layers': [block] * n_decoder_layers, 'norm'?: final LayerNorm, 'relative_bias'?: T5 table}``."""
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
    remat: str | list[str | None] | None = None,
) -> Tensor:
    """``N`` decoder blocks over the encoder's ``memory`` (then a final LayerNorm for pre-LN).
    ``remat``: recompute the blocks' activations in the backward pass (:func:`fnlm.nn.remat`),
    one policy for every block or one entry (``None`` or a policy) per block."""
    self_bias = None
    if "relative_bias" in params:
        n = y.shape[-2]
        self_bias = relative_bias(
            params["relative_bias"], n, n, bidirectional=False, max_distance=cfg.relative_max_distance
        )
    layers = params["layers"]
    for layer, k, policy in zip(layers, random.split_or_none(key, len(layers)), layer_policies(remat, len(layers))):
        block = decoder_block if policy is None else rematerialise(decoder_block, policy)
        y = block(
            layer,
            y,
            memory,
            cfg,
            tgt_padding_mask=tgt_padding_mask,
            memory_padding_mask=memory_padding_mask,
            self_bias=self_bias,
            key=k,
            train=train,
        )
    if "norm" in params:
        y = layer_norm(params["norm"], y, cfg.layer_norm_eps)
    return y


def decoder_cached(
    params: Params,
    y: Tensor,
    cache: Params,
    cfg: TransformerConfig,
    *,
    memory_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Params]:
    """:func:`decoder` for new tokens ``y: [batch, n_new, d_model]`` only, attending to the cached
    past: ``cache`` from :func:`fnlm.models.init_decoder_cache` (per layer self K/V, plus the
    memory's ``"cross"`` K/V computed once). Returns ``(outputs, new cache)``; equals
    :func:`decoder` on the whole prefix at these positions."""
    n_new = y.shape[-2]
    slots, mask = cache_slots(cache, n_new), cache_mask(cache, n_new)
    self_bias = None
    if "relative_bias" in params:
        self_bias = relative_bias(
            params["relative_bias"],
            n_new,
            cache_capacity(cache),
            bidirectional=False,
            max_distance=cfg.relative_max_distance,
            offset_q=cache["pos"],
        )
    layers = []
    for layer, self_kv, cross in zip(params["layers"], cache["layers"], cache["cross"]):
        y, new = decoder_block(
            layer,
            y,
            None,
            cfg,
            memory_padding_mask=memory_padding_mask,
            self_bias=self_bias,
            cache={"self": self_kv, "cross": cross},
            slots=slots,
            self_mask=mask,
        )
        layers.append(new["self"])
    if "norm" in params:
        y = layer_norm(params["norm"], y, cfg.layer_norm_eps)
    return y, {**cache, "layers": layers, "pos": cache["pos"] + n_new}
