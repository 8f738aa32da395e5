"""The Transformer encoder: N identical blocks of self-attention and feed-forward (§3.1)."""

from __future__ import annotations

from torch import Tensor

from fnlm import random
from fnlm.nn._attention import init_multi_head_attention, multi_head_attention
from fnlm.nn._config import TransformerConfig
from fnlm.nn._feedforward import feed_forward, init_feed_forward
from fnlm.nn._norm import init_layer_norm, layer_norm
from fnlm.nn._positional import init_relative_bias, relative_bias
from fnlm.nn._remat import layer_policies
from fnlm.nn._remat import remat as rematerialise
from fnlm.nn._sublayer import init_stack, sublayer
from fnlm.tree import Params


def init_encoder_block(key: random.Key, cfg: TransformerConfig) -> Params:
    """``{attn, norm1, ffn, norm2}``: self-attention, feed-forward and their two LayerNorms."""
    k_attn, k_ffn = random.split(key)
    return {
        "attn": init_multi_head_attention(k_attn, cfg.d_model, cfg.n_heads, std=cfg.init_std),
        "norm1": init_layer_norm(cfg.d_model),
        "ffn": init_feed_forward(k_ffn, cfg.d_model, cfg.d_ff, std=cfg.init_std),
        "norm2": init_layer_norm(cfg.d_model),
    }


def encoder_block(
    params: Params,
    x: Tensor,
    cfg: TransformerConfig,
    *,
    key_padding_mask: Tensor | None = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    queries: slice | None = None,
    return_attention: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """One encoder layer, ``x: [*batch, len, d_model] -> same``.

    Post-LN (paper, BERT)::

        x = LayerNorm(x + Dropout(MultiHead(x, x, x)))
        x = LayerNorm(x + Dropout(FFN(x)))

    Pre-LN (``cfg.norm_first``): ``x = x + Dropout(Sublayer(LayerNorm(x)))`` for both sub-layers.

    ``queries``: compute the outputs at these positions only (``slice(0, 1)``: the [CLS] token),
    ``[*batch, len(queries), d_model]``. Every position is still a key and value, so the rows
    computed are exactly those of the full block; the others' attention and FFN are skipped.

    ``return_attention=True``: ``(x, P)`` with ``P: [*batch, n_heads, len_q, len]`` the
    self-attention probabilities this block used (computed with the reference formula, see
    :func:`~fnlm.nn.multi_head_attention`'s ``return_probs``).
    """
    k_attn, k_drop1, k_drop2 = random.split_or_none(key, 3)
    residual = dict(norm_first=cfg.norm_first, eps=cfg.layer_norm_eps, rate=cfg.dropout, train=train)
    if queries is not None:
        if not isinstance(queries, slice):
            raise TypeError(f"queries must be a slice of positions (e.g. slice(0, 1)), got {type(queries).__name__}")
        mask, bias = _rows(mask, queries, x), _rows(bias, queries, x)

    def rows(h):  # the positions whose outputs are computed
        return h if queries is None else h[..., queries, :]

    probs = []  # filled by self_attention when return_attention

    def self_attention(h):
        y = multi_head_attention(
            params["attn"],
            rows(h),
            h,
            key_padding_mask=key_padding_mask,
            mask=mask,
            bias=bias,
            dropout=cfg.attention_dropout,
            key=k_attn,
            train=train,
            return_probs=return_attention,
            impl="sdpa" if cfg.fused_attention_dropout else "auto",
        )
        if return_attention:
            y, p = y
            probs.append(p)
        return y

    def ffn(h):
        return feed_forward(params["ffn"], h, cfg.activation)

    x = sublayer(params["norm1"], x, self_attention, key=k_drop1, residual=rows(x), **residual)
    x = sublayer(params["norm2"], x, ffn, key=k_drop2, **residual)
    return (x, probs[0]) if return_attention else x


def _rows(m: Tensor | None, queries: slice, x: Tensor) -> Tensor | None:
    """The query rows of a mask or bias ``[..., len_q, len_k]`` (kept as is if it broadcasts over them)."""
    if m is None or m.ndim < 2 or m.shape[-2] == 1:
        return m
    if m.shape[-2] != x.shape[-2]:
        raise ValueError(f"mask/bias has {m.shape[-2]} query rows but the input has {x.shape[-2]} positions")
    return m[..., queries, :]


def init_encoder(key: random.Key, cfg: TransformerConfig) -> Params:
    """``{'layers': [block] * n_layers, 'norm'?: final LayerNorm, 'relative_bias'?: T5 table}``."""
    k_layers, k_bias = random.split(key)
    params: Params = {"layers": init_stack(k_layers, cfg.n_layers, lambda k: init_encoder_block(k, cfg))}
    if cfg.use_final_norm:
        params["norm"] = init_layer_norm(cfg.d_model)
    if cfg.positional == "relative":
        params["relative_bias"] = init_relative_bias(k_bias, cfg.n_heads, cfg.relative_buckets)
    return params


def encoder(
    params: Params,
    x: Tensor,
    cfg: TransformerConfig,
    *,
    key_padding_mask: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    last_queries: slice | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    remat: str | list[str | None] | None = None,
) -> Tensor | tuple[Tensor, dict[str, tuple[Tensor, ...]]]:
    """``N`` encoder blocks (then a final LayerNorm for pre-LN stacks). With
    ``cfg.positional == 'relative'``, one T5 relative bias is shared by all layers.

    ``last_queries``: the positions whose final outputs are wanted, e.g. ``slice(0, 1)`` when only
    the [CLS] vector is read (a classifier). The last block then computes just those rows (see
    :func:`encoder_block`'s ``queries``): same values, most of one block's work saved.

    Intermediates, the pure way (as Flax's ``capture_intermediates``, no hooks): with
    ``output_hidden_states`` and/or ``output_attentions`` the result is ``(x, intermediates)``,
    ``intermediates = {'hidden_states': (x_0, ..., x_N), 'attentions': (P_1, ..., P_N)}`` (only
    the keys asked for), ``x_0`` the input and ``x_i`` block ``i``'s output (before a final
    LayerNorm), ``P_i: [*batch, n_heads, len, len]`` block ``i``'s attention probabilities. When
    neither is asked for nothing extra is computed or kept (the fused attention kernel runs).

    ``remat``: recompute blocks' activations in the backward pass (:func:`fnlm.nn.remat`): a
    policy (``'nothing'``, ``'matmuls'``) for every block, or a list with one entry per block
    (``None`` = keep that block's activations). Same values and gradients, less memory.
    """
    bias = None
    if "relative_bias" in params:
        n = x.shape[-2]
        bias = relative_bias(params["relative_bias"], n, n, bidirectional=True, max_distance=cfg.relative_max_distance)
    layers = params["layers"]
    hidden, attentions = [x], []
    policies = layer_policies(remat, len(layers))
    if output_attentions and any(policies):
        raise ValueError("remat and output_attentions do not combine (a remat block returns one tensor)")
    for i, (layer, k) in enumerate(zip(layers, random.split_or_none(key, len(layers)))):
        queries = last_queries if i == len(layers) - 1 else None
        block = encoder_block if policies[i] is None else rematerialise(encoder_block, policies[i])
        x = block(
            layer,
            x,
            cfg,
            key_padding_mask=key_padding_mask,
            bias=bias,
            key=k,
            train=train,
            queries=queries,
            return_attention=output_attentions,
        )
        if output_attentions:
            x, p = x
            attentions.append(p)
        if output_hidden_states:
            hidden.append(x)
    if "norm" in params:
        x = layer_norm(params["norm"], x, cfg.layer_norm_eps)
    if not (output_hidden_states or output_attentions):
        return x
    intermediates = {}
    if output_hidden_states:
        intermediates["hidden_states"] = tuple(hidden)
    if output_attentions:
        intermediates["attentions"] = tuple(attentions)
    return x, intermediates
