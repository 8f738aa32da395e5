"""GPT-2 (Radford et al. 2019) as pure functions: a decoder-only, pre-LN Transformer language model.

::

    h_0 = Dropout(E[w_t] + P[t])                                   token + learned position tables
    a   = h + Dropout(MultiHead(LN_1(h), causal))                  for each of the n_layer blocks
    h'  = a + Dropout(GELU_tanh(LN_2(a) W_fc + b_fc) W_proj + b_proj)
    logits = LN_f(h_L) E^T                                         LM head tied to the token table

and the next-token loss ``L = -(1/N) sum_{t: w_{t+1} real} log softmax(logits_t)[w_{t+1}]``.
Blocks are :func:`fnlm.nn.sublayer` with ``norm_first=True``; attention is
:func:`fnlm.nn.multi_head_attention` with ``causal=True`` (the fused causal SDPA kernel when
there is neither padding nor attention dropout). Decoding with a KV cache (:mod:`fnlm.nn._kv_cache`)
runs the same blocks on the new tokens only: :func:`prefill` and :func:`decode_step`.
:mod:`fnlm.models._gpt2_hf` maps Hugging Face GPT-2 checkpoints onto these trees and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fnlm import random
from fnlm._memory import check_bound, check_eps
from fnlm.nn._attention import init_multi_head_attention, multi_head_attention
from fnlm.nn._dropout import dropout
from fnlm.nn._embedding import embedding, init_embedding
from fnlm.nn._feedforward import feed_forward, init_feed_forward
from fnlm.nn._kv_cache import cache_capacity, cache_mask, cache_positions, cache_slots, cached_attention, init_kv_cache
from fnlm.nn._losses import cross_entropy
from fnlm.nn._norm import init_layer_norm, layer_norm
from fnlm.nn._positional import check_length
from fnlm.nn._remat import layer_policies
from fnlm.nn._remat import remat as rematerialise
from fnlm.nn._sublayer import init_stack, sublayer
from fnlm.tree import Params

#: ``activation_function`` values GPT-2 checkpoints use (all the tanh approximation of GELU) plus exact GELU/ReLU.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyper-parameters, named as in Hugging Face's ``config.json``. Defaults: GPT-2 small (124M).

    ``n_inner``: the MLP width (``None``: ``4 * n_embd``). Dropouts: ``embd_pdrop`` on the
    embeddings, ``resid_pdrop`` on each sub-layer output, ``attn_pdrop`` on attention probabilities.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {v!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ValueError(f"GPT2Config.n_inner must be a positive integer or None, got {self.n_inner!r}")
        for name, kind in (
            ("vocab_size", "vocab"),
            ("n_positions", "positions"),
            ("n_embd", "width"),
            ("n_layer", "layers"),
            ("n_head", "heads"),
        ) + ((("n_inner", "width"),) if self.n_inner else ()):
            check_bound("GPT2Config", name, getattr(self, name), kind)
        check_eps("GPT2Config", "layer_norm_epsilon", self.layer_norm_epsilon)
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPT2Config: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation_function not in GPT2_ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation_function={self.activation_function!r} is not supported; "
                f"choose one of {GPT2_ACTIVATIONS}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def d_ff(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @property
    def d_k(self) -> int:
        return self.n_embd // self.n_head


# ----------------------------------------------------------------------------- init
def init_gpt2_block(key: random.Key, cfg: GPT2Config) -> Params:
    """``{norm1, attn, norm2, ffn}``; weights ``N(0, 0.02^2)``, the two projections back into the
    residual stream (``W^O``, ``W_proj``) ``N(0, (0.02 / sqrt(2 n_layer))^2)`` (GPT-2 paper §2.3)."""
    k_attn, k_ffn = random.split(key)
    std = cfg.initializer_range
    attn = init_multi_head_attention(k_attn, cfg.n_embd, cfg.n_head, std=std)
    ffn = init_feed_forward(k_ffn, cfg.n_embd, cfg.d_ff, std=std)
    scale = 1.0 / math.sqrt(2 * cfg.n_layer)
    attn = {**attn, "o": {**attn["o"], "weight": attn["o"]["weight"] * scale}}
    ffn = {**ffn, "w2": {**ffn["w2"], "weight": ffn["w2"]["weight"] * scale}}
    return {"norm1": init_layer_norm(cfg.n_embd), "attn": attn, "norm2": init_layer_norm(cfg.n_embd), "ffn": ffn}


def init_gpt2(key: random.Key, cfg: GPT2Config) -> Params:
    """``{tok_embed: E [vocab, d], pos_embed: P [n_positions, d], layers: [block] * n_layer, norm: LN_f}``."""
    k_tok, k_pos, k_layers = random.split(key, 3)
    std = cfg.initializer_range
    return {
        "tok_embed": init_embedding(k_tok, cfg.vocab_size, cfg.n_embd, std=std),
        "pos_embed": init_embedding(k_pos, cfg.n_positions, cfg.n_embd, std=std),
        "layers": init_stack(k_layers, cfg.n_layer, lambda k: init_gpt2_block(k, cfg)),
        "norm": init_layer_norm(cfg.n_embd),
    }


# ----------------------------------------------------------------------------- forward
def gpt2_block(
    params: Params,
    x: Tensor,
    cfg: GPT2Config,
    *,
    key_padding_mask: Tensor | None = None,
    cache: Params | None = None,
    slots: Tensor | None = None,
    mask: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    inplace: bool = False,
) -> tuple[Tensor, Params | None]:
    """One pre-LN block, ``x: [batch, len, d] -> ([batch, len, d], layer cache)``::

        x = x + Dropout(MultiHead(LN_1(x), causal))
        x = x + Dropout(FFN(LN_2(x)))

    With ``cache`` (one layer of :func:`fnlm.nn.init_kv_cache`), ``x`` holds the new tokens only:
    their K/V go into ``slots`` and they attend under ``mask`` (:func:`fnlm.nn.cache_mask`);
    the updated layer cache is returned (else ``None``); ``inplace``: see
    :func:`fnlm.nn.cached_attention`.
    """
    k_attn, k_drop1, k_drop2 = random.split_or_none(key, 3)
    residual = dict(norm_first=True, eps=cfg.layer_norm_epsilon, rate=cfg.resid_pdrop, train=train)
    new_cache: list[Params] = []

    def self_attention(h):
        if cache is None:
            return multi_head_attention(
                params["attn"],
                h,
                causal=True,
                key_padding_mask=key_padding_mask,
                dropout=cfg.attn_pdrop,
                key=k_attn,
                train=train,
            )
        y, layer = cached_attention(params["attn"], h, cache, slots, mask, inplace=inplace)
        new_cache.append(layer)
        return y

    def ffn(h):
        return feed_forward(params["ffn"], h, cfg.activation_function)

    x = sublayer(params["norm1"], x, self_attention, key=k_drop1, **residual)
    x = sublayer(params["norm2"], x, ffn, key=k_drop2, **residual)
    return x, (new_cache[0] if new_cache else None)


def gpt2_hidden(
    params: Params,
    ids: Tensor,
    cfg: GPT2Config,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    remat: str | list[str | None] | None = None,
) -> Tensor:
    """``LN_f(h_L)``: ``ids: [batch, len]`` -> ``[batch, len, n_embd]``.

    ``attention_mask: [batch, len]`` (1 = real token, 0 = padding): padded keys get no
    attention. ``position_ids: [batch, len]`` (default ``0 .. len-1``; left-padded rows want
    ``cumsum(mask) - 1``, as Hugging Face ``generate`` passes). ``remat``: recompute the blocks'
    activations in the backward pass (:func:`fnlm.nn.remat`), one policy for every block or a
    list with one entry (``None`` or a policy) per block.
    """
    if ids.ndim != 2:
        raise ValueError(f"ids must be [batch, len] token ids, got shape {tuple(ids.shape)}")
    check_length(ids.shape[-1], cfg.n_positions, "GPT-2 input")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ids' {tuple(ids.shape)}")
    if position_ids is None:
        position_ids = torch.arange(ids.shape[-1], device=ids.device)[None, :]
    k_emb, k_layers = random.split_or_none(key, 2)
    x = embedding(params["tok_embed"], ids) + embedding(params["pos_embed"], position_ids)
    x = dropout(x, cfg.embd_pdrop, key=k_emb, train=train)
    layers = params["layers"]
    for layer, k, policy in zip(
        layers, random.split_or_none(k_layers, len(layers)), layer_policies(remat, len(layers))
    ):
        block = _block_output if policy is None else rematerialise(_block_output, policy)
        x = block(layer, x, cfg, key_padding_mask=attention_mask, key=k, train=train)
    return layer_norm(params["norm"], x, cfg.layer_norm_epsilon)


def _block_output(layer: Params, x: Tensor, cfg: GPT2Config, **kw) -> Tensor:
    """:func:`gpt2_block`'s output without a cache (one tensor, what :func:`fnlm.nn.remat` wraps)."""
    return gpt2_block(layer, x, cfg, **kw)[0]


def lm_head(params: Params, h: Tensor) -> Tensor:
    """``logits = h E^T`` (tied to the token embedding): ``[..., d] -> [..., vocab]``."""
    return h @ params["tok_embed"]["weight"].T


def gpt2(params: Params, ids: Tensor, cfg: GPT2Config, **kw) -> Tensor:
    """Next-token logits ``[batch, len, vocab]``: ``logits_t`` scores ``w_{t+1}`` given ``w_{<=t}``
    (keywords as :func:`gpt2_hidden`)."""
    return lm_head(params, gpt2_hidden(params, ids, cfg, **kw))


def lm_loss(
    params: Params,
    ids: Tensor,
    cfg: GPT2Config,
    *,
    attention_mask: Tensor | None = None,
    key: random.Key | None = None,
    train: bool = False,
    remat: str | list[str | None] | None = None,
) -> Tensor:
    """``L = -(1/N) sum_t log p(w_{t+1} | w_{<=t})`` over targets ``w_{t+1}`` that are real tokens
    (``attention_mask`` 1); ``ids: [batch, len]``, so a window of ``n_positions + 1`` tokens
    trains every position. The model reads ``ids[:, :-1]`` (the last token is only a target).
    Equals HF's loss with ``labels = ids`` (``-100`` at padding). ``remat``: as :func:`gpt2_hidden`'s."""
    inputs, labels = ids[:, :-1], ids[:, 1:]
    mask = None if attention_mask is None else attention_mask[:, :-1]
    logits = gpt2(params, inputs, cfg, attention_mask=mask, key=key, train=train, remat=remat)
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, 1:] == 0, -100)
    return cross_entropy(logits, labels)


# ----------------------------------------------------------------------------- KV-cache decoding
def init_gpt2_cache(
    cfg: GPT2Config,
    batch: int,
    max_len: int,
    *,
    start: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Params:
    """An empty KV cache (:func:`fnlm.nn.init_kv_cache`) for ``batch`` rows of up to ``max_len``
    tokens (prompt + generated), ``max_len <= n_positions``."""
    if max_len > cfg.n_positions:
        raise ValueError(
            f"a cache of {max_len} tokens is longer than the position table (n_positions={cfg.n_positions})"
        )
    return init_kv_cache(cfg.n_layer, batch, cfg.n_head, max_len, cfg.d_k, start=start, dtype=dtype, device=device)


def gpt2_cached(
    params: Params, ids: Tensor, cache: Params, cfg: GPT2Config, *, inplace: bool = False
) -> tuple[Tensor, Params]:
    """Run new tokens ``ids: [batch, n_new]`` (slots ``pos .. pos+n_new-1``) through the model,
    attending to everything cached: ``(logits [batch, n_new, vocab], new cache)``.

    Equals :func:`gpt2` on the whole sequence at these positions (position ids ``slot - start``).
    ``inplace=True``: K/V are written into ``cache``'s tensors (see :func:`fnlm.nn.cached_attention`);
    the default leaves ``cache`` untouched.
    """
    n_new = ids.shape[-1]
    slots = cache_slots(cache, n_new)
    mask = cache_mask(cache, n_new)
    x = embedding(params["tok_embed"], ids) + embedding(params["pos_embed"], cache_positions(cache, n_new))
    layers = []
    for layer, layer_cache in zip(params["layers"], cache["layers"]):
        x, layer_cache = gpt2_block(layer, x, cfg, cache=layer_cache, slots=slots, mask=mask, inplace=inplace)
        layers.append(layer_cache)
    h = layer_norm(params["norm"], x, cfg.layer_norm_epsilon)
    return lm_head(params, h), {**cache, "layers": layers, "pos": cache["pos"] + n_new}


def prefill(
    params: Params, cache: Params, ids: Tensor, cfg: GPT2Config, *, inplace: bool = False
) -> tuple[Tensor, Params]:
    """The prompt ``ids: [batch, len]`` (left-padded; ``cache["start"]`` marks each row's first
    real token) into an empty cache: ``(logits of the last position [batch, vocab], cache)``."""
    if ids.ndim != 2 or ids.shape[-1] == 0:
        raise ValueError(f"prefill needs a non-empty [batch, len] prompt, got shape {tuple(ids.shape)}")
    if ids.shape[-1] > cache_capacity(cache):
        raise ValueError(f"prompt of {ids.shape[-1]} tokens does not fit the cache ({cache_capacity(cache)} slots)")
    logits, cache = gpt2_cached(params, ids, cache, cfg, inplace=inplace)
    return logits[:, -1], cache


def decode_step(
    params: Params, cache: Params, tokens: Tensor, cfg: GPT2Config, *, inplace: bool = False
) -> tuple[Tensor, Params]:
    """One token per row, ``tokens: [batch]``, at slot ``cache["pos"]``: ``(logits [batch, vocab], cache)``.

    Pure and shape-static (the slot is a tensor), so one compiled graph serves every position.
    ``inplace=True`` (for a caller that owns the cache, as :func:`fnlm.models.generate`) writes the
    new K/V into ``cache``'s tensors instead of copying them.
    """
    logits, cache = gpt2_cached(params, tokens[:, None], cache, cfg, inplace=inplace)
    return logits[:, 0], cache
