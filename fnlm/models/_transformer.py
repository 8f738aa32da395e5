"""The encoder–decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fnlm import random
from fnlm.nn._config import TransformerConfig
from fnlm.nn._decoder import decoder, decoder_cached, init_decoder
from fnlm.nn._dropout import dropout
from fnlm.nn._embedding import embedding, init_embedding
from fnlm.nn._encoder import encoder, init_encoder
from fnlm.nn._kv_cache import cache_positions, cross_kv, init_kv_cache
from fnlm.nn._linear import init_linear, linear
from fnlm.nn._positional import (
    check_length,
    init_learned_positional,
    learned_positional,
    sinusoidal_encoding,
    sinusoidal_table,
)
from fnlm.tree import Params


def init_transformer(key: random.Key, cfg: TransformerConfig) -> Params:
    """Source and target embeddings, encoder, decoder and the output projection to ``tgt_vocab_size``."""
    if cfg.src_vocab_size <= 0 or cfg.tgt_vocab_size <= 0:
        raise ValueError("TransformerConfig needs src_vocab_size and tgt_vocab_size for a full model")
    k = random.split(key, 7)
    params: Params = {
        "src_embed": init_embedding(k[0], cfg.src_vocab_size, cfg.d_model),
        "tgt_embed": init_embedding(k[1], cfg.tgt_vocab_size, cfg.d_model),
        "encoder": init_encoder(k[2], cfg),
        "decoder": init_decoder(k[3], cfg),
    }
    if cfg.positional == "learned":
        params["src_pos"] = init_learned_positional(k[4], cfg.max_len, cfg.d_model)
        params["tgt_pos"] = init_learned_positional(k[5], cfg.max_len, cfg.d_model)
    if not cfg.tie_output:
        params["out"] = init_linear(k[6], cfg.d_model, cfg.tgt_vocab_size, std=cfg.init_std)
    return params


def embed(
    params: Params,
    ids: Tensor,
    cfg: TransformerConfig,
    side: str,
    *,
    key: random.Key | None = None,
    train: bool = False,
    positions: Tensor | None = None,
) -> Tensor:
    """``x_t = Dropout(E[ids_t] * sqrt(d_model) + PE_t)`` for ``side`` in {'src', 'tgt'} (§3.4, §3.5).

    With relative positions nothing is added here: the bias enters the attention logits.
    ``positions``: the position ``t`` of each id (same shape as ``ids``; default ``0 .. len-1``),
    e.g. the slots of new tokens when decoding with a KV cache.
    """
    check_length(ids.shape[-1], cfg.max_len, f"{side} sequence")
    x = embedding(params[f"{side}_embed"], ids)
    if cfg.scale_embeddings:
        x = x * math.sqrt(cfg.d_model)
    if positions is not None and cfg.positional == "sinusoidal":
        x = x + sinusoidal_table(cfg.max_len, cfg.d_model, dtype=x.dtype, device=x.device)[positions]
    elif positions is not None and cfg.positional == "learned":
        x = x + params[f"{side}_pos"]["weight"][positions]
    elif cfg.positional == "sinusoidal":
        x = sinusoidal_encoding(x)
    elif cfg.positional == "learned":
        x = learned_positional(params[f"{side}_pos"], x)
    return dropout(x, cfg.dropout, key=key, train=train)


def encode(
    params: Params,
    src: Tensor,
    cfg: TransformerConfig,
    *,
    src_padding_mask: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    remat: str | list[str | None] | None = None,
) -> Tensor:
    """``memory = Encoder(Embed(src))``: ``src: [*batch, len_s]`` ids -> ``[*batch, len_s, d_model]``."""
    k_emb, k_enc = random.split_or_none(key, 2)
    x = embed(params, src, cfg, "src", key=k_emb, train=train)
    return encoder(params["encoder"], x, cfg, key_padding_mask=src_padding_mask, key=k_enc, train=train, remat=remat)


def decode(
    params: Params,
    tgt: Tensor,
    memory: Tensor,
    cfg: TransformerConfig,
    *,
    tgt_padding_mask: Tensor | None = None,
    memory_padding_mask: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    remat: str | list[str | None] | None = None,
) -> Tensor:
    """Logits over the target vocabulary, ``Decoder(Embed(tgt), memory) W_out``: ``[*batch, len_t, tgt_vocab]``."""
    k_emb, k_dec = random.split_or_none(key, 2)
    y = embed(params, tgt, cfg, "tgt", key=k_emb, train=train)
    y = decoder(
        params["decoder"],
        y,
        memory,
        cfg,
        tgt_padding_mask=tgt_padding_mask,
        memory_padding_mask=memory_padding_mask,
        key=k_dec,
        train=train,
        remat=remat,
    )
    if cfg.tie_output:
        return y @ params["tgt_embed"]["weight"].T
    return linear(params["out"], y)


def transformer(
    params: Params,
    src: Tensor,
    tgt: Tensor,
    cfg: TransformerConfig,
    *,
    src_padding_mask: Tensor | None = None,
    tgt_padding_mask: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    remat: str | list[str | None] | None = None,
) -> Tensor:
    """Teacher-forced forward pass: ``logits[t] = p(y_{t+1} | y_{<=t}, src)``, shape ``[*batch, len_t, tgt_vocab]``.
    ``remat``: recompute the blocks' activations in the backward pass, the same policy (or per-layer
    list) for the encoder's and the decoder's blocks (:func:`fnlm.nn.remat`)."""
    k_enc, k_dec = random.split_or_none(key, 2)
    memory = encode(params, src, cfg, src_padding_mask=src_padding_mask, key=k_enc, train=train, remat=remat)
    return decode(
        params,
        tgt,
        memory,
        cfg,
        tgt_padding_mask=tgt_padding_mask,
        memory_padding_mask=src_padding_mask,
        key=k_dec,
        train=train,
        remat=remat,
    )


def init_decoder_cache(params: Params, memory: Tensor, cfg: TransformerConfig, max_len: int) -> Params:
    """A KV cache for decoding up to ``max_len`` target tokens against ``memory: [batch, len_s, d_model]``:
    empty self-attention K/V per layer (:func:`fnlm.nn.init_kv_cache`) plus ``"cross"``, each
    layer's ``K = memory W^K, V = memory W^V``, computed here once."""
    check_length(max_len, cfg.max_len, "target")
    layers = params["decoder"]["layers"]
    cache = init_kv_cache(
        len(layers), memory.shape[0], cfg.n_heads, max_len, cfg.d_k, dtype=memory.dtype, device=memory.device
    )
    cache["cross"] = [cross_kv(layer["cross_attn"], memory) for layer in layers]
    return cache


def decode_cached(
    params: Params, tgt: Tensor, cache: Params, cfg: TransformerConfig, *, memory_padding_mask: Tensor | None = None
) -> tuple[Tensor, Params]:
    """:func:`decode` for new target tokens ``tgt: [batch, n_new]`` given the cached prefix:
    ``(logits [batch, n_new, tgt_vocab], new cache)``."""
    positions = cache_positions(cache, tgt.shape[-1])
    y = embed(params, tgt, cfg, "tgt", positions=positions)
    y, cache = decoder_cached(params["decoder"], y, cache, cfg, memory_padding_mask=memory_padding_mask)
    logits = y @ params["tgt_embed"]["weight"].T if cfg.tie_output else linear(params["out"], y)
    return logits, cache


def greedy_decode(
    params: Params,
    src: Tensor,
    cfg: TransformerConfig,
    *,
    bos_id: int,
    max_len: int,
    src_padding_mask: Tensor | None = None,
) -> Tensor:
    """Auto-regressive greedy decoding: ``y_{t+1} = argmax p(. | y_{<=t}, src)``; returns ``[batch, max_len]``
    ids starting with ``bos_id``. The encoder runs once; each step feeds only the newest token
    through the decoder, with the self-attention K/V of the prefix and the memory's cross K/V
    in a KV cache (:func:`init_decoder_cache`, :func:`decode_cached`)."""
    if src.ndim != 2:
        raise ValueError(f"src must be [batch, len_s] token ids, got shape {tuple(src.shape)}")
    memory = encode(params, src, cfg, src_padding_mask=src_padding_mask)
    cache = init_decoder_cache(params, memory, cfg, max_len)
    ys = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
    for _ in range(max_len - 1):
        logits, cache = decode_cached(params, ys[:, -1:], cache, cfg, memory_padding_mask=src_padding_mask)
        ys = torch.cat([ys, logits[:, -1, :].argmax(-1, keepdim=True)], dim=-1)
    return ys
