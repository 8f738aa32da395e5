"""Bounded text: ``text[:MAX_TEXT_CHARS]`` before anything tokenizes or stores it.

A review or text longer than :data:`MAX_TEXT_CHARS` characters (1,000,000: about 70 times the
longest IMDb review, 13,704 characters) is truncated to it with a warning, or refused with
:class:`TextTooLongError`, as the caller chooses (``long_text="truncate"`` or ``"error"``), so
no single input can make tokenization or reading use unbounded memory. Undecodable text (lone
surrogates, which no UTF-8 file or tokenizer accepts) is refused in one line naming the input.
"""

from __future__ import annotations

import warnings

MAX_TEXT_CHARS = 1_000_000
LONG_TEXT = ("truncate", "error")


class TextTooLongError(ValueError):
    """A text exceeds :data:`MAX_TEXT_CHARS` and the caller asked for ``long_text='error'``."""


def check_long_text(long_text: str) -> None:
    if long_text not in LONG_TEXT:
        raise ValueError(f"long_text must be one of {LONG_TEXT}, got {long_text!r}")


def cap_text(text: str, where: str, long_text: str = "truncate", *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """``text`` itself, or its first ``max_chars`` characters (warning naming ``where``), or
    :class:`TextTooLongError` when ``long_text='error'``. Lone surrogates: ``ValueError``."""
    if len(text) > max_chars:
        check_long_text(long_text)
        if long_text == "error":
            raise TextTooLongError(
                f"{where}: {len(text):,} characters, over MAX_TEXT_CHARS={max_chars:,} "
                "(pass long_text='truncate' to keep the first ones)"
            )
        warnings.warn(f"{where}: {len(text):,} characters, truncated to MAX_TEXT_CHARS={max_chars:,}", stacklevel=3)
        text = text[:max_chars]
    return text


def check_encodable(text: str, where: str) -> None:
    """``ValueError`` naming ``where`` if ``text`` is not valid Unicode (lone surrogates, as
    ``sys.argv`` holds for undecodable command-line bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where}: not valid Unicode text (character {e.start}: {text[e.start]!r}, a lone "
            "surrogate; undecodable bytes in a file or command-line argument?)"
        ) from None
