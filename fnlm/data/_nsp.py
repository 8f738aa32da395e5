"""Next-sentence-prediction pairs from documents, as BERT's pretraining data (Devlin et al. 2019,
§3.1 and ``create_pretraining_data.py``).

Each document (a review) is split into sentences and tokenized; consecutive sentences are
gathered into a chunk until it fills ``max_len - 3`` word pieces, and each chunk of at least two
sentences is cut at a random sentence boundary into segments A and B. Exactly half of the pairs
(chosen at random) keep their actual B (IsNext, label 0); the other half get a random run of
sentences from a *different* document as B (NotNext, label 1), so the label cannot be read off
the length. Pairs are ``[CLS] A [SEP] B [SEP]``; one over ``max_len`` is cut from the front of A
and the back of B, longer side first, so an IsNext pair's A still ends where its B begins.

The sampler sees only the documents it is given: feed it training text only (the scripts never
pass the test split).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import torch

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ``.``, ``!`` or ``?`` (and closing quotes/brackets) followed by
    white space; empty pieces dropped. A rule, not a parser: abbreviations ("Mr. Smith") split too."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start : m.start() + len(m.group(0).rstrip())].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


class NspPairs(NamedTuple):
    """Sentence pairs: ``input_ids`` ``[CLS] A [SEP] B [SEP]`` (unpadded lists), ``b_start`` (index of
    B's first piece: token type 1 from there on), ``labels`` (0 IsNext, 1 NotNext) and ``source``
    ``(doc_a, first_a, end_a, doc_b, first_b, end_b)``: the documents and sentence ranges
    ``[first, end)`` the segments were taken from (before truncation)."""

    input_ids: list[list[int]]
    b_start: list[int]
    labels: list[int]
    source: list[tuple[int, int, int, int, int, int]]

    def token_type_ids(self, index: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token types of a batch whose rows are the pairs ``index`` ``[B]`` (-1: dummy row,
        all 0), e.g. ``make_batches(pairs.input_ids, pairs.labels, ...)``'s ``index``."""
        starts = torch.tensor(self.b_start + [1 << 30], dtype=torch.int64)[index]  # -1 -> never
        pos = torch.arange(attention_mask.shape[-1])
        return ((pos[None, :] >= starts[:, None]) & attention_mask.bool()).long()


def nsp_pairs(tokenizer, documents: Sequence[str], *, max_len: int = 128, seed: int = 0) -> NspPairs:
    """IsNext / NotNext pairs (50/50) from ``documents`` (see the module docstring)."""
    if not isinstance(max_len, int) or max_len < 5:
        raise ValueError(f"max_len must be an int >= 5 ([CLS] A [SEP] B [SEP]), got {max_len!r}")
    docs = [split_sentences(d) for d in documents]
    flat = [s for d in docs for s in d]
    enc = tokenizer.backend.encode_batch(flat, add_special_tokens=False) if flat else []
    pieces, k = [], 0
    for d in docs:
        pieces.append([e.ids for e in enc[k : k + len(d)]])
        k += len(d)
    target = max_len - 3
    g = torch.Generator().manual_seed(seed)

    def randint(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    cands = []  # (doc, first, cut, end): A = sentences [first, cut), B = [cut, end)
    for d, sents in enumerate(pieces):
        first, length = 0, 0
        for i, s in enumerate(sents):
            length += len(s)
            if i == len(sents) - 1 or length >= target:
                if i + 1 - first >= 2:
                    cands.append((d, first, first + 1 + randint(i - first), i + 1))
                first, length = i + 1, 0
    sources = [d for d, sents in enumerate(pieces) if any(sents)]
    if cands and len(sources) < 2:
        raise ValueError(
            "nsp_pairs needs at least two documents with text: NotNext segments come from another document"
        )
    pos_in_sources = {d: i for i, d in enumerate(sources)}
    not_next = set(torch.randperm(len(cands), generator=g)[: len(cands) // 2].tolist())

    out = NspPairs([], [], [], [])
    for c, (d, first, cut, end) in enumerate(cands):
        a = [t for s in pieces[d][first:cut] for t in s]
        if c in not_next:
            j = randint(len(sources) - 1)  # uniform over the other documents with text
            r = sources[j + (j >= pos_in_sources[d])]
            sents = pieces[r]
            b_first = randint(len(sents))
            b, b_end = [], b_first
            while b_end < len(sents) and len(b) < target - len(a):
                b += sents[b_end]
                b_end += 1
            src = (d, first, cut, r, b_first, b_end)
        else:
            b = [t for s in pieces[d][cut:end] for t in s]
            src = (d, first, cut, d, cut, end)
        while len(a) + len(b) > target:  # longer side first: A from the front, B from the back
            if len(a) > len(b):
                a = a[1:]
            else:
                b = b[:-1]
        if not a or not b:
            continue
        out.input_ids.append([tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id])
        out.b_start.append(len(a) + 2)
        out.labels.append(1 if c in not_next else 0)
        out.source.append(src)
    return out
