"""Attention you can look at: a sentence's attention probabilities per layer and head, and where [CLS] looks."""

from __future__ import annotations

import torch

from fnlm.models._bert import bert


def attention_maps(params, cfg, tokenizer, text: str, max_len: int = 64) -> tuple[list[str], torch.Tensor]:
    """``(tokens, P)``: the word pieces of ``text`` and the attention probabilities
    ``P [layers, heads, len, len]`` of every layer (``P[l, h, i, j]``: how much query ``i`` takes from key ``j``)."""
    b = tokenizer.encode([text], max_len=min(max_len, cfg.max_position_embeddings))
    with torch.no_grad():
        _, _, inter = bert(
            params,
            b["input_ids"],
            cfg,
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
            output_attentions=True,
        )
    tokens = [tokenizer.id_to_token(i) for i in b["input_ids"][0].tolist()]
    return tokens, torch.stack([p[0] for p in inter["attentions"]]).float()


def cls_summary(tokens: list[str], probs: torch.Tensor) -> list[tuple[int, str, float]]:
    """``(position, token, weight)`` of [CLS]'s attention in the last layer, averaged over heads,
    largest first: ``mean_h P[-1, h, 0, :]`` (sums to 1)."""
    w = probs[-1, :, 0, :].mean(0)
    order = torch.argsort(w, descending=True, stable=True).tolist()
    return [(j, tokens[j], float(w[j])) for j in order]
