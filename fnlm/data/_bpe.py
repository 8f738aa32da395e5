"""Byte-level BPE tokenization (GPT-2, RoBERTa), backed by Hugging Face's Rust ``tokenizers``.

:func:`load_bpe_tokenizer` reads ``tokenizer.json``, or else ``vocab.json`` + ``merges.txt``
(byte-level pre-tokenizer and decoder, ``add_prefix_space`` from ``tokenizer_config.json``), and
returns a :class:`BPETokenizer` with the interface of :class:`~fnlm.data.WordPieceTokenizer`
(``encode_ids``, ``encode``, ``decode``, ``pad_id``...). Two flavours, told apart by
``tokenizer_config.json``'s ``tokenizer_class`` or else by the vocabulary:

* GPT-2 (``<|endoftext|>``): no special tokens are added, ``pad_id`` is the end-of-text id
  unless the files name a pad token;
* RoBERTa (``<s>``, ``</s>``, ``<pad>``, ``<mask>``): ``<s> A </s>`` and ``<s> A </s></s> B </s>``,
  token types all zero, as ``transformers``' ``RobertaTokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from fnlm.data._tokenizer import WordPieceTokenizer, _head_tail, _pair_budgets

GPT2_EOS = "<|endoftext|>"
ROBERTA_SPECIALS = {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": "<mask>"}


class BPETokenizer(WordPieceTokenizer):
    """A byte-level BPE tokenizer (GPT-2 or RoBERTa flavour, see the module docstring).

    ``kind``: ``'gpt2'`` or ``'roberta'``; ``specials``: role (``cls``/``sep``/``pad``/``unk``/
    ``mask``/``eos``) -> token string, for the roles the tokenizer has.
    """

    def __init__(self, tokenizer: Tokenizer, *, kind: str, specials: dict[str, str], model_max_length: int = 1024):
        if kind not in ("gpt2", "roberta"):
            raise ValueError(f"kind must be 'gpt2' or 'roberta', got {kind!r}")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tk = tokenizer
        self.kind = kind
        self.do_lower_case = False
        self.strip_accents = None
        self.model_max_length = model_max_length
        self._cuttable = False
        ids = {role: tokenizer.token_to_id(tok) for role, tok in specials.items()}
        if kind == "roberta":
            missing = [ROBERTA_SPECIALS[r] for r in ("cls", "sep", "pad") if ids.get(r) is None]
            if missing:
                raise ValueError(f"a RoBERTa tokenizer needs the tokens {missing} in its vocabulary")
        elif ids.get("eos") is None:
            raise ValueError(f"a GPT-2 tokenizer needs {GPT2_EOS!r} (or an eos_token) in its vocabulary")
        if ids.get("pad") is None:
            ids["pad"] = ids.get("eos")
        self._ids = ids

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int | None:
        return self._ids.get("unk")

    @property
    def cls_id(self) -> int | None:
        return self._ids.get("cls")

    @property
    def sep_id(self) -> int | None:
        return self._ids.get("sep")

    @property
    def mask_id(self) -> int | None:
        return self._ids.get("mask")

    @property
    def eos_id(self) -> int | None:
        """The end-of-text id (GPT-2's ``<|endoftext|>``, RoBERTa's ``</s>``)."""
        return self._ids.get("eos", self._ids.get("sep"))

    def word_starts(self, input_ids):
        raise NotImplementedError("whole-word masking is implemented for WordPiece vocabularies only")

    def _check_args(self, max_len, truncation, head_tokens, pair):
        if self.kind == "gpt2":
            return super()._check_args(max_len + 2 + (1 if pair else 0), truncation, head_tokens, pair)
        return super()._check_args(max_len - (1 if pair else 0), truncation, head_tokens, pair)

    def _encode(self, texts, pairs, max_len, truncation, head_tokens, long_text="truncate"):
        """Unpadded ids (GPT-2: the pieces; RoBERTa: with ``<s>``/``</s>``), truncated to ``max_len``."""
        texts, pairs, head_tokens = self._checked_inputs(texts, pairs, max_len, truncation, head_tokens, long_text)
        rob = self.kind == "roberta"
        bos, eos = ([self.cls_id], [self.sep_id]) if rob else ([], [])
        out = []
        if pairs is None:
            budget = max_len - 2 * rob
            for a in self._pieces(texts):
                out.append(bos + _head_tail(a, budget, truncation, min(head_tokens, budget)) + eos)
        else:
            budget = max_len - 4 * rob
            for a, b in zip(self._pieces(texts), self._pieces(pairs)):
                na, nb = _pair_budgets(len(a), len(b), budget)
                a = _head_tail(a, na, truncation, min(head_tokens, na))
                b = _head_tail(b, nb, truncation, min(head_tokens, nb))
                out.append(bos + a + eos + eos + b + eos if rob else a + b)
        return out, [None] * len(out)

    def save(self, directory):
        """Write ``tokenizer.json`` (loadable by :func:`load_bpe_tokenizer` and ``transformers``' fast tokenizers)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(d / "tokenizer.json"))
        return d

    def __repr__(self) -> str:
        return f"BPETokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def load_bpe_tokenizer(path: Path | str) -> BPETokenizer:
    """The byte-level BPE tokenizer of a checkpoint directory (see the module docstring)."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(
            f"no tokenizer at {d}: expected a directory with tokenizer.json or vocab.json + merges.txt"
        )
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        if (d / name).is_file():
            cfg.update(json.loads((d / name).read_text(encoding="utf-8")))
    if (d / "tokenizer.json").is_file():
        tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        tk = Tokenizer(BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.get("add_prefix_space", False)))
        tk.decoder = decoders.ByteLevel()
    else:
        raise FileNotFoundError(f"{d} has neither tokenizer.json nor vocab.json + merges.txt")
    vocab = tk.get_vocab(with_added_tokens=True)
    cls_name = str(cfg.get("tokenizer_class") or "")
    roberta = "Roberta" in cls_name or (not cls_name.startswith("GPT2") and "<s>" in vocab and "</s>" in vocab)
    specials = {}
    keys = {
        "cls": "cls_token",
        "sep": "sep_token",
        "pad": "pad_token",
        "unk": "unk_token",
        "mask": "mask_token",
        "eos": "eos_token",
    }
    for role, key in keys.items():
        tok = _token_str(cfg.get(key))
        if tok is None and roberta and role in ROBERTA_SPECIALS:
            tok = ROBERTA_SPECIALS[role]
        if tok is None and not roberta and role in ("eos", "unk"):
            tok = GPT2_EOS
        if tok is not None and tok in vocab:
            specials[role] = tok
    # special tokens written literally in a text stay one token (as in transformers)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(set(specials.values()))])
    max_len = cfg.get("model_max_length", 1024 if not roberta else 512)
    if not isinstance(max_len, int) or max_len > 1_000_000:
        max_len = 1024 if not roberta else 512
    return BPETokenizer(tk, kind="roberta" if roberta else "gpt2", specials=specials, model_max_length=max_len)
