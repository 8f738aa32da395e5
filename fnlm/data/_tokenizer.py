"""BERT WordPiece tokenization, backed by Hugging Face's Rust ``tokenizers`` library.

:func:`load_tokenizer` reads a BERT checkpoint directory (``tokenizer.json`` if present, else
``vocab.txt`` + ``tokenizer_config.json``) and returns a :class:`WordPieceTokenizer`, whose
output is token-for-token that of ``transformers.BertTokenizer`` (tests compare with the pure
Python reference implementation) but is computed in parallel Rust: the 25,000 IMDb training
reviews encode in a few seconds.

Truncation is done here, not by the library, because of ``head+tail`` truncation (Sun et al.
2019, "How to Fine-Tune BERT for Text Classification?"): for long reviews, keeping the first
``head_tokens`` and the *last* remaining word pieces works better than keeping only the head,
since reviews tend to end with the verdict. Word pieces are computed without special tokens,
cut to the budget (``max_len - 2`` for one text, ``max_len - 3`` for a pair), and then wrapped
as ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` (token type 0 for ``[CLS] A [SEP]``, 1 for
``B [SEP]``).

Two levels of output:

* :meth:`WordPieceTokenizer.encode_ids` — ``list[list[int]]``, not padded (the length-bucketed
  data pipeline in :mod:`fnlm.data.batching` pads per batch);
* :meth:`WordPieceTokenizer.encode` / ``__call__`` — padded int64 tensors ``input_ids``,
  ``attention_mask``, ``token_type_ids`` of shape ``[B, L]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from fnlm.data._limits import MAX_TEXT_CHARS, cap_text, check_encodable, check_long_text

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
TRUNCATIONS = ("head", "head+tail")
PADDINGS = ("longest", "max_length")
# Characters of text tokenized per word piece wanted when only the ends of a long text are
# tokenized. English averages ~4.3 characters per BERT word piece (IMDb: at most 5.3 over a whole
# review); an end that yields too few pieces is simply tokenized in full, so this only sets speed.
CHARS_PER_PIECE = 6
# Where a text may be cut exactly: before whitespace BERT keeps (space, tab, newline) or ASCII
# punctuation (each its own pre-token), except "]", which can end a literal special token.
_CUT = re.compile(r"[ \t\n\r!-/:-@\[\\^-`{-~]")
# padding="max_length" beyond this many positions (or the model's, if set) is refused.
MAX_LEN_BOUND = 1 << 16


def _read_vocab(vocab_file: Path) -> dict[str, int]:
    """``vocab.txt``: one token per line, the line number is the id (as in BERT's load_vocab)."""
    vocab: dict[str, int] = {}
    try:
        with open(vocab_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab[line.rstrip("\n")] = i
    except UnicodeDecodeError as e:
        raise ValueError(f"vocabulary file {vocab_file} is not UTF-8 text ({e})") from None
    if not vocab:
        raise ValueError(f"vocabulary file {vocab_file} is empty")
    return vocab


def build_bert_tokenizer(
    vocab: dict[str, int],
    *,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    handle_chinese_chars: bool = True,
    max_input_chars_per_word: int = 100,
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` doing exactly BERT's tokenization, from a token -> id map.

    ``strip_accents=None`` means "strip accents iff lowercasing", as in the original BERT.
    """
    for tok in (UNK, CLS, SEP):
        if tok not in vocab:
            raise ValueError(f"the vocabulary has no {tok} token, so it is not a BERT WordPiece vocabulary")
    tk = Tokenizer(WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=max_input_chars_per_word))
    tk.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=handle_chinese_chars,
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    tk.decoder = decoders.WordPiece(prefix="##")
    # Special tokens written literally in a text stay one token (as in transformers).
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t in vocab])
    return tk


def _check_texts(name: str, texts, long_text: str = "truncate") -> list[str]:
    """``texts`` as a list of valid Unicode strings, each capped at ``MAX_TEXT_CHARS``
    (truncated with a warning, or ``TextTooLongError`` for ``long_text='error'``)."""
    check_long_text(long_text)
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a str or a sequence of str, got {type(texts).__name__}")
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}: {t!r:.60}")
        check_encodable(t, f"{name}[{i}]")
        out.append(cap_text(t, f"{name}[{i}]", long_text) if len(t) > MAX_TEXT_CHARS else t)
    return out


def _last_cut(t: str, end: int) -> int:
    """The last exact cut position in ``t[1:end]`` (-1 if none)."""
    cut = -1
    for m in _CUT.finditer(t, 1, end):
        cut = m.start()
    return cut


def _head_tail_split(ids: list[int], head: int, tail: int) -> list[int]:
    """The first ``head`` and last ``tail`` of ``ids`` (all of ``ids`` if that is no longer)."""
    if len(ids) <= head + tail:
        return ids
    return ids[:head] + (ids[len(ids) - tail :] if tail else [])


def _head_tail(ids: list[int], budget: int, truncation: str, head_tokens: int) -> list[int]:
    """``ids`` cut to ``budget`` pieces by ``truncation`` ("head" or "head+tail")."""
    head = budget if truncation == "head" else min(head_tokens, budget)
    return _head_tail_split(ids, head, budget - head)


def _pair_budgets(la: int, lb: int, total: int) -> tuple[int, int]:
    """Lengths after transformers' ``longest_first`` truncation of a pair to ``total`` tokens:
    repeatedly drop a token from the longer sequence, from the second one on ties."""
    if la + lb <= total:
        return la, lb
    a = min(la, max((total + 1) // 2, total - lb))
    return a, total - a


class WordPieceTokenizer:
    """BERT tokenizer: WordPiece ids, special tokens, truncation and padding.

    Build it with :func:`load_tokenizer` (a checkpoint directory) or :meth:`from_vocab`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        model_max_length: int = 512,
    ):
        tokenizer.no_truncation()  # some tokenizer.json files ship with truncation/padding on
        tokenizer.no_padding()
        self._tk = tokenizer
        self.do_lower_case = do_lower_case
        self.strip_accents = strip_accents
        self.model_max_length = model_max_length
        ids = {}
        for tok in SPECIAL_TOKENS:
            i = tokenizer.token_to_id(tok)
            if i is None and tok in (UNK, CLS, SEP, PAD):
                raise ValueError(f"the tokenizer has no {tok} token, so it is not a BERT WordPiece tokenizer")
            ids[tok] = i
        self._special = ids
        # Tokenizing only the ends of long texts is exact for BERT's normalizer + pre-tokenizer.
        cfg = json.loads(tokenizer.to_str())
        norm, pre = cfg.get("normalizer") or {}, cfg.get("pre_tokenizer") or {}
        self._cuttable = (
            norm.get("type", "BertNormalizer") == "BertNormalizer" and pre.get("type") == "BertPreTokenizer"
        )

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_vocab(
        cls,
        vocab_file: Path | str,
        *,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        handle_chinese_chars: bool = True,
        model_max_length: int = 512,
    ) -> "WordPieceTokenizer":
        """From a ``vocab.txt`` alone; ``lowercase=False`` for cased vocabularies."""
        tk = build_bert_tokenizer(
            _read_vocab(Path(vocab_file)),
            lowercase=lowercase,
            strip_accents=strip_accents,
            handle_chinese_chars=handle_chinese_chars,
        )
        return cls(tk, do_lower_case=lowercase, strip_accents=strip_accents, model_max_length=model_max_length)

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (no truncation, no padding configured)."""
        return self._tk

    # ---------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._special[PAD]

    @property
    def unk_id(self) -> int:
        return self._special[UNK]

    @property
    def cls_id(self) -> int:
        return self._special[CLS]

    @property
    def sep_id(self) -> int:
        return self._special[SEP]

    @property
    def mask_id(self) -> int | None:
        return self._special[MASK]

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def word_starts(self, input_ids) -> torch.Tensor:
        """Bool tensor, the shape of ``input_ids``: True where a token begins a word (every token
        except WordPiece continuations ``##...``), for whole-word masking
        (:func:`fnlm.models.mask_tokens`'s ``word_starts``)."""
        if getattr(self, "_continuation", None) is None:
            table = torch.zeros(self.vocab_size, dtype=torch.bool)
            for tok, i in self.get_vocab().items():
                table[i] = tok.startswith("##")
            self._continuation = table
        ids = torch.as_tensor(input_ids)
        return ~self._continuation.to(ids.device)[ids]

    def tokenize(self, text: str, *, long_text: str = "truncate") -> list[str]:
        """Word pieces of one text, without special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = _check_texts("text", text, long_text)[0]
        return self._tk.encode(text, add_special_tokens=False).tokens

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- encoding
    def _check_args(self, max_len: int, truncation: str, head_tokens: int | None, pair: bool) -> int:
        if not isinstance(max_len, int) or isinstance(max_len, bool):
            raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
        need = 3 if pair else 2
        if max_len > MAX_LEN_BOUND:
            raise ValueError(f"max_len={max_len:,} is beyond any model's positions (at most {MAX_LEN_BOUND:,} here)")
        if max_len < need:
            raise ValueError(
                f"max_len={max_len} is too small: [CLS] and [SEP] alone take {need} positions "
                f"for {'a pair' if pair else 'one text'}, so max_len must be >= {need}"
            )
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if head_tokens is None:
            return max_len // 4  # 128 of 510 for max_len=512, as in Sun et al. (2019)
        if not isinstance(head_tokens, int) or head_tokens < 0:
            raise ValueError(f"head_tokens must be an int >= 0, got {head_tokens!r}")
        return head_tokens

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        batch = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def _truncated_pieces(self, texts: list[str], head: int, tail: int) -> list[list[int]]:
        """``_pieces(texts)`` cut to their first ``head`` and last ``tail`` word pieces (all of
        them when there are at most ``head + tail``), tokenizing only the ends of long texts.

        A long text is cut at a space (or before ASCII punctuation) into a prefix of ~``CHARS_PER_PIECE * head`` characters
        and a suffix of ~``CHARS_PER_PIECE * tail``. BERT's normalizer works character by
        character and its pre-tokenizer splits at every space, so the word pieces of the prefix
        are exactly the first word pieces of the whole text (and those of the suffix its last
        ones); punctuation is a pre-token of its own, so cutting before it is exact too. If an
        end yields fewer pieces than needed (very long words, odd text) or has no such cut, the
        whole text (at most ``MAX_TEXT_CHARS``) is tokenized instead, so the result is always
        that of full tokenization and the work is bounded for texts without spaces.
        """
        if not self._cuttable:
            return [_head_tail_split(ids, head, tail) for ids in self._pieces(texts)]
        win_h = CHARS_PER_PIECE * head + 16
        win_t = CHARS_PER_PIECE * tail + 16 if tail else 0
        jobs: list[str] = []
        plan = []  # per text: ("full", job index) or ("cut", head job, tail job or -1)
        for t in texts:
            n = len(t)
            if n > win_h + win_t + 64:
                ch = _last_cut(t, win_h)
                m = _CUT.search(t, n - win_t) if tail else None
                ct = (m.start() if m else -1) if tail else n
                if ch > 0 and ct > ch:
                    jobs.append(t[:ch])
                    if tail:
                        jobs.append(t[ct:])
                    plan.append(("cut", len(jobs) - 1 - (1 if tail else 0), len(jobs) - 1 if tail else -1))
                    continue
            jobs.append(t)
            plan.append(("full", len(jobs) - 1, -1))
        pieces = self._pieces(jobs)
        out: list[list[int] | None] = []
        redo = []
        for i, (kind, a, b) in enumerate(plan):
            if kind == "full":
                out.append(_head_tail_split(pieces[a], head, tail))
            elif len(pieces[a]) >= head and (b < 0 or len(pieces[b]) >= tail):
                out.append(pieces[a][:head] + (pieces[b][len(pieces[b]) - tail :] if tail else []))
            else:
                out.append(None)
                redo.append(i)
        for i, ids in zip(redo, self._pieces([texts[i] for i in redo])):
            out[i] = _head_tail_split(ids, head, tail)
        return out

    def _checked_inputs(self, texts, pairs, max_len, truncation, head_tokens, long_text):
        """``(texts, pairs, head_tokens)`` checked (and capped) as every ``_encode`` needs them."""
        texts = _check_texts("texts", texts, long_text)
        if pairs is not None:
            pairs = _check_texts("pairs", pairs, long_text)
            if len(pairs) != len(texts):
                raise ValueError(f"pairs has {len(pairs)} texts but texts has {len(texts)}; they must match")
        head_tokens = self._check_args(max_len, truncation, head_tokens, pairs is not None)
        return texts, pairs, head_tokens

    def _encode(self, texts, pairs, max_len, truncation, head_tokens, long_text="truncate"):
        """Unpadded ids and token types with special tokens, truncated to ``max_len``."""
        texts, pairs, head_tokens = self._checked_inputs(texts, pairs, max_len, truncation, head_tokens, long_text)
        cls_id, sep_id = self.cls_id, self.sep_id
        ids_out, types_out = [], []
        if pairs is None:
            budget = max_len - 2
            head = budget if truncation == "head" else min(head_tokens, budget)
            for a in self._truncated_pieces(texts, head, budget - head):
                ids_out.append([cls_id, *a, sep_id])
                types_out.append(None)  # all zeros
        else:
            a_ids, b_ids = self._pieces(texts), self._pieces(pairs)
            budget = max_len - 3
            for a, b in zip(a_ids, b_ids):
                na, nb = _pair_budgets(len(a), len(b), budget)
                a = _head_tail(a, na, truncation, min(head_tokens, na))
                b = _head_tail(b, nb, truncation, min(head_tokens, nb))
                ids_out.append([cls_id, *a, sep_id, *b, sep_id])
                types_out.append(len(a) + 2)  # positions >= this have token type 1
        return ids_out, types_out

    def encode_ids(
        self,
        texts: str | Sequence[str],
        max_len: int = 512,
        truncation: str = "head",
        *,
        head_tokens: int | None = None,
        pairs: Sequence[str] | None = None,
        long_text: str = "truncate",
    ) -> list[list[int]]:
        """Token ids with ``[CLS]``/``[SEP]``, truncated to at most ``max_len``; no padding.
        A text over ``MAX_TEXT_CHARS`` characters is first cut to them with a warning
        (``long_text="error"``: :class:`fnlm.data.TextTooLongError`)."""
        ids, _ = self._encode(texts, pairs, max_len, truncation, head_tokens, long_text)
        return ids

    def encode(
        self,
        texts: str | Sequence[str],
        pairs: Sequence[str] | None = None,
        *,
        max_len: int = 512,
        padding: str = "longest",
        truncation: str = "head",
        head_tokens: int | None = None,
        return_tensors: bool = True,
        long_text: str = "truncate",
    ) -> dict:
        """Padded model inputs: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``[B, L]``.

        ``padding="longest"`` pads to the longest sequence of the batch, ``"max_length"`` to
        ``max_len``. ``truncation="head"`` keeps the first word pieces; ``"head+tail"`` keeps the
        first ``head_tokens`` (default ``max_len // 4``) and the last ones. With
        ``return_tensors=False`` the same values come back as lists of lists. ``max_len`` beyond
        ``model_max_length`` (the model's positions) with ``padding="max_length"`` is refused.
        """
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if padding == "max_length" and isinstance(max_len, int) and max_len > self.model_max_length:
            raise ValueError(
                f"max_len={max_len:,} is beyond the model's {self.model_max_length:,} positions "
                "(model_max_length); padding to it would only allocate"
            )
        ids, types = self._encode(texts, pairs, max_len, truncation, head_tokens, long_text)
        n = len(ids)
        width = max_len if padding == "max_length" else max((len(r) for r in ids), default=0)
        input_ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        token_types = np.zeros((n, width), dtype=np.int64)
        for i, (row, t) in enumerate(zip(ids, types)):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            if t is not None:
                token_types[i, t : len(row)] = 1
        out = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}
        if return_tensors:
            return {k: torch.from_numpy(v) for k, v in out.items()}
        return {k: v.tolist() for k, v in out.items()}

    __call__ = encode

    # ---------------------------------------------------------------- saving
    def save(self, directory: Path | str) -> Path:
        """Write ``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json`` and
        ``special_tokens_map.json``: loadable by :func:`load_tokenizer` and by transformers'
        ``BertTokenizer`` / ``BertTokenizerFast``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        vocab = self._tk.get_vocab(with_added_tokens=False)
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError("vocabulary ids are not contiguous 0..n-1; cannot write vocab.txt")
        with open(d / "vocab.txt", "w", encoding="utf-8") as f:
            f.writelines(tok + "\n" for tok, _ in by_id)
        self._tk.save(str(d / "tokenizer.json"))
        specials = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": True,
            "model_max_length": self.model_max_length,
            **specials,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
        return d

    def __repr__(self) -> str:
        return (
            f"WordPieceTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
            f"strip_accents={self.strip_accents})"
        )


def _is_bpe_dir(d: Path) -> bool:
    """A byte-level BPE tokenizer (GPT-2, RoBERTa): ``vocab.json`` or a BPE ``tokenizer.json``."""
    if (d / "tokenizer.json").is_file():
        try:
            spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False  # not BPE as far as we can tell: the WordPiece loader reports what is wrong with it
        model = spec.get("model") if isinstance(spec, dict) else None
        return isinstance(model, dict) and model.get("type") == "BPE"
    return (d / "vocab.json").is_file() and (d / "merges.txt").is_file()


def load_tokenizer(path: Path | str) -> WordPieceTokenizer:
    """The tokenizer of a checkpoint directory (or of a ``vocab.txt`` file): BERT's WordPiece, or
    for a directory with a byte-level BPE tokenizer (``vocab.json`` + ``merges.txt`` or a BPE
    ``tokenizer.json``: GPT-2, RoBERTa) a :class:`~fnlm.data.BPETokenizer`.

    Prefers ``tokenizer.json``; otherwise builds the tokenizer from ``vocab.txt`` with
    ``do_lower_case`` / ``strip_accents`` / ``tokenize_chinese_chars`` from
    ``tokenizer_config.json`` when present (default: uncased BERT).
    """
    p = Path(path)
    if p.is_dir() and _is_bpe_dir(p):
        from fnlm.data._bpe import load_bpe_tokenizer

        return load_bpe_tokenizer(p)
    if p.is_file():
        vocab_file, d = p, p.parent
    elif p.is_dir():
        vocab_file, d = p / "vocab.txt", p
    else:
        raise FileNotFoundError(f"no tokenizer at {p}: expected a checkpoint directory or a vocab.txt file")
    cfg: dict = {}
    if (d / "tokenizer_config.json").is_file():
        try:
            cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{d / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{d / 'tokenizer_config.json'}: not a JSON object")
    lower = bool(cfg.get("do_lower_case", True))
    strip = cfg.get("strip_accents", None)
    max_len = cfg.get("model_max_length", 512)
    if not isinstance(max_len, int) or max_len > 1_000_000:  # transformers' "infinite" sentinel
        max_len = 512
    if p.is_dir() and (d / "tokenizer.json").is_file():
        try:
            tk = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # the Rust library's parse errors (a plain Exception)
            raise ValueError(
                f"{d / 'tokenizer.json'}: not a tokenizers file ({str(e).splitlines()[0][:200]})"
            ) from None
        norm = json.loads(tk.to_str()).get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":  # tokenizer.json is the authority
            lower, strip = bool(norm.get("lowercase", lower)), norm.get("strip_accents", strip)
        return WordPieceTokenizer(tk, do_lower_case=lower, strip_accents=strip, model_max_length=max_len)
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{d} has neither tokenizer.json nor vocab.txt")
    return WordPieceTokenizer.from_vocab(
        vocab_file,
        lowercase=lower,
        strip_accents=strip,
        handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
        model_max_length=max_len,
    )
