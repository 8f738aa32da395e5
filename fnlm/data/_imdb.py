"""The IMDb Large Movie Review Dataset (Maas et al., ACL 2011), read in its official layout.

The official archive ``aclImdb_v1.tar.gz`` (and the labelled copy in ``shared/data``) hold one
review per UTF-8 file::

    aclImdb/{train,test}/{pos,neg}/{id}_{rating}.txt

``pos`` reviews are rated >= 7/10 (label 1), ``neg`` ones <= 4/10 (label 0). :func:`load_imdb`
reads an archive as a stream (one pass, nothing unpacked) or an unpacked folder, skips the
unlabelled ``unsup`` part, and sorts the examples by (label, id), so the order never depends on
how the archive happens to be packed. Anything that is not such a dataset raises
:class:`DatasetError` with a one-line message naming the path.

Bounded: a review over :data:`fnlm.data.MAX_TEXT_CHARS` characters is truncated (with a warning)
or refused (``long_text="error"``) while it is read, so no more than about 4 bytes per allowed
character of it is ever in memory; a folder's entries that are symlinks leading outside the
folder are refused.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import os
import re
import tarfile
import urllib.error
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fnlm.data._limits import MAX_TEXT_CHARS, TextTooLongError, cap_text, check_long_text
from fnlm.io._hub import ChecksumError, download_file

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
SPLITS = ("train", "test")
LABELS = {"neg": 0, "pos": 1}

# "aclImdb/train/pos/123_8.txt", possibly below a prefix such as "./" or "data/".
_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/([^/]+)$")
_FILE = re.compile(r"(\d+)_(\d+)\.txt")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


class DatasetError(ValueError):
    """The data at a path is missing, unreadable, or not the IMDb dataset's layout."""


class DownloadError(RuntimeError):
    """The dataset could not be downloaded (offline, HTTP error, checksum mismatch)."""


@dataclass
class IMDb:
    """One split of IMDb: parallel lists, sorted by (label, id).

    Behaves like a ``list[tuple[str, int]]`` of ``(text, label)`` pairs (``len``, indexing,
    iteration); ``ids`` and ``ratings`` come from the file names ``{id}_{rating}.txt``.
    """

    split: str
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    ratings: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        return self.texts[i], self.labels[i]

    def __iter__(self):
        return iter(zip(self.texts, self.labels))

    def select(self, indices) -> "IMDb":
        """A new split holding the examples at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        return IMDb(
            self.split,
            [self.texts[i] for i in idx],
            [self.labels[i] for i in idx],
            [self.ids[i] for i in idx],
            [self.ratings[i] for i in idx],
        )

    def counts(self) -> dict[int, int]:
        """Number of examples per label."""
        return {lab: self.labels.count(lab) for lab in sorted(set(self.labels))}


def html_clean(text: str) -> str:
    """Replace the ``<br />`` line breaks that IMDb reviews contain with spaces."""
    return _BR.sub(" ", text)


# ----------------------------------------------------------------------------- reading
def _read_capped(f, size: int, where: str, long_text: str) -> str:
    """The UTF-8 text of the open binary file ``f`` (``size`` bytes), reading at most about
    ``4 * MAX_TEXT_CHARS`` bytes of it: truncated to ``MAX_TEXT_CHARS`` characters with a warning,
    or :class:`DatasetError` for ``long_text='error'`` (the one line names ``MAX_TEXT_CHARS``)."""
    limit = 4 * MAX_TEXT_CHARS + 4  # UTF-8: at most 4 bytes a character
    try:
        data = f.read(limit)
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=len(data) < limit)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where} is not UTF-8 text ({e})") from None
    try:  # more than ``limit`` bytes always decode to more than MAX_TEXT_CHARS characters
        return cap_text(text, f"{where} ({size:,} bytes)", long_text)
    except TextTooLongError as e:
        raise DatasetError(str(e)) from None


def _add(out: dict, split: str, sentiment: str, filename: str, f, size: int, where: str, long_text: str) -> None:
    m = _FILE.fullmatch(filename)
    if m is None:
        raise DatasetError(
            f"{where}: unexpected file {split}/{sentiment}/{filename} (IMDb reviews are named {{id}}_{{rating}}.txt)"
        )
    text = _read_capped(f, size, f"{where}: {split}/{sentiment}/{filename}", long_text)
    out[split].append((LABELS[sentiment], int(m[1]), int(m[2]), text))


def _describe(found: set[str]) -> str:
    if not found:
        return "nothing"
    shown = sorted(found)[:8]
    return ", ".join(shown) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")


_CORRUPT = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)  # OSError: BadGzipFile, bz2


def _read_archive(path: Path, splits: tuple[str, ...], long_text: str) -> tuple[dict, dict, set[str]]:
    """One streaming pass over a tar / tar.gz / tar.bz2 / tar.xz archive.

    Decompression goes through :mod:`gzip` / :mod:`bz2` / :mod:`lzma` file objects (not
    tarfile's own stream) and the stream is read to its end, so a cut-off archive is detected
    even when only the compressed stream's trailer is missing.
    """
    out = {s: [] for s in splits}
    seen = {(s, c): False for s in splits for c in LABELS}
    found: set[str] = set()
    not_archive = f"{path} is not a tar.gz archive of the IMDb dataset (it is neither gzip nor tar)"
    with open(path, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        if magic[:2] == b"\x1f\x8b":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif magic[:3] == b"BZh":
            stream = bz2.BZ2File(raw, mode="rb")
        elif magic[:6] == b"\xfd7zXZ\x00":
            stream = lzma.LZMAFile(raw, mode="rb")
        else:
            stream = None
        compressed = stream is not None
        try:
            tf = tarfile.open(fileobj=stream or raw, mode="r|")
        except _CORRUPT as e:
            if compressed:
                raise DatasetError(
                    f"{path} is truncated or corrupt: cannot open it as a tar archive ({type(e).__name__}: {e})"
                ) from None
            raise DatasetError(not_archive) from None
        try:
            for member in tf:
                name = member.name
                found.add("/".join(name.lstrip("./").split("/")[:3]))
                if not member.isfile():
                    continue
                m = _MEMBER.search(name)
                if m is None or m[1] not in out:
                    continue
                split, sentiment, filename = m[1], m[2], m[3]
                seen[split, sentiment] = True
                _add(out, split, sentiment, filename, tf.extractfile(member), member.size, str(path), long_text)
            if compressed:
                while stream.read(1 << 20):  # to the end: checks the trailer (CRC, length)
                    pass
        except _CORRUPT as e:
            raise DatasetError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); download it again") from None
        finally:
            tf.close()
            if compressed:
                stream.close()
    return out, seen, found


def _find_root(path: Path) -> Path:
    if (path / "aclImdb").is_dir():
        return path / "aclImdb"
    return path


def _inside(p: Path, root: Path, where: Path) -> None:
    """Refuse ``p`` (one line) if, symlinks resolved, it lies outside ``root``."""
    if not Path(os.path.realpath(p)).is_relative_to(root):
        raise DatasetError(
            f"{where}: {p.relative_to(where)} is a symlink leading outside the dataset folder "
            f"(to {os.path.realpath(p)}); refused"
        )


def _read_folder(path: Path, splits: tuple[str, ...], long_text: str) -> tuple[dict, dict, set[str]]:
    real = Path(os.path.realpath(path))
    root = _find_root(path)
    _inside(root, real, path)
    out = {s: [] for s in splits}
    seen = {(s, c): False for s in splits for c in LABELS}
    found = {str(p.relative_to(path)) for p in sorted(path.iterdir())[:20]} if path.is_dir() else set()
    for split in splits:
        for sentiment in LABELS:
            d = root / split / sentiment
            if not d.is_dir():
                continue
            _inside(d, real, path)
            for entry in os.scandir(d):
                if not entry.is_file():
                    continue
                if entry.is_symlink():
                    _inside(Path(entry.path), real, path)
                seen[split, sentiment] = True
                with open(entry.path, "rb") as f:
                    _add(out, split, sentiment, entry.name, f, os.fstat(f.fileno()).st_size, str(path), long_text)
    return out, seen, found


def load_imdb_splits(
    path: Path | str, splits: tuple[str, ...] = SPLITS, *, long_text: str = "truncate"
) -> dict[str, IMDb]:
    """Several splits of IMDb from one pass over ``path`` (see :func:`load_imdb`)."""
    check_long_text(long_text)
    splits = tuple(splits)
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (the unlabelled 'unsup' part is not read), got {s!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(
            f"IMDb data not found: {path} does not exist (pass an aclImdb_v1.tar.gz "
            "archive or a folder containing aclImdb/)"
        )
    if path.is_dir():
        out, seen, found = _read_folder(path, splits, long_text)
    else:
        out, seen, found = _read_archive(path, splits, long_text)
    missing = [f"aclImdb/{s}/{c}" for (s, c), ok in seen.items() if not ok]
    if missing:
        raise DatasetError(
            f"{path} does not have the IMDb layout aclImdb/{{train,test}}/{{pos,neg}}/"
            f"<id>_<rating>.txt: no reviews in {', '.join(missing)}; found {_describe(found)}"
        )
    result = {}
    for s in splits:
        rows = sorted(out[s], key=lambda r: (r[0], r[1]))
        result[s] = IMDb(s, [r[3] for r in rows], [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return result


def load_imdb(path: Path | str, split: str = "train", *, long_text: str = "truncate") -> IMDb:
    """The ``split`` (``"train"`` or ``"test"``) of the IMDb dataset at ``path``.

    ``path``: an ``aclImdb_v1.tar.gz`` archive (read as a stream, not unpacked), a folder that
    contains ``aclImdb/``, or the ``aclImdb/`` folder itself. Label 1 = pos, 0 = neg; examples
    sorted by (label, id). Raises :class:`DatasetError` naming ``path`` if it is missing, not an
    archive, truncated, or lacks the ``aclImdb/<split>/{pos,neg}`` layout. A review over
    ``MAX_TEXT_CHARS`` characters is truncated with a warning (``long_text="error"``: refused).
    """
    return load_imdb_splits(path, (split,), long_text=long_text)[split]


# ----------------------------------------------------------------------------- subsets
def subset(examples, n: int, seed: int = 0):
    """A deterministic, label-balanced random subset of ``n`` examples.

    ``n // 2`` (rounded up for the smaller label value) per label for binary data, in general as
    even a split over the labels as possible. Works on an :class:`IMDb` (returns one) or a list
    of ``(text, label)`` pairs (returns a list); the chosen examples keep their original order.
    """
    labels = np.asarray(examples.labels if isinstance(examples, IMDb) else [lab for _, lab in examples])
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if n > len(labels):
        raise ValueError(f"cannot take a subset of {n} from {len(labels)} examples")
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for k, c in enumerate(classes):
        want = n // len(classes) + (1 if k < n % len(classes) else 0)
        pool = np.flatnonzero(labels == c)
        if want > len(pool):
            raise ValueError(
                f"a balanced subset of {n} needs {want} examples of label {c}, but there are only {len(pool)}"
            )
        chosen.append(rng.permutation(pool)[:want])
    idx = np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)
    if isinstance(examples, IMDb):
        return examples.select(idx)
    return [examples[int(i)] for i in idx]


# ----------------------------------------------------------------------------- download
def download_imdb(
    cache_dir: Path | str | None = None,
    *,
    url: str | None = None,
    sha256: str | None = IMDB_SHA256,
    timeout: float = 15.0,
) -> Path:
    """The official ``aclImdb_v1.tar.gz`` (84 MB) in ``cache_dir`` (default ``~/.cache/fnlm``),
    downloaded once: progress bar, temporary file + rename, sha256 check."""
    url = url or IMDB_URL
    cache = Path(cache_dir).expanduser() if cache_dir is not None else Path.home() / ".cache" / "fnlm"
    target = cache / "aclImdb_v1.tar.gz"
    if target.is_file():
        return target
    hint = (
        "download aclImdb_v1.tar.gz from ai.stanford.edu/~amaas/data/sentiment/ on a machine "
        "with internet access and pass --data PATH (the archive, or a folder containing aclImdb/)"
    )
    try:
        download_file(url, target, timeout=timeout, desc="aclImdb_v1.tar.gz", sha256=sha256)
    except ChecksumError as e:
        raise DownloadError(f"{e}; {hint}") from None
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download the IMDb dataset from {url}: HTTP {e.code} {e.reason}; {hint}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(
            f"cannot download the IMDb dataset from {url} ({reason}); you appear to be offline — {hint}"
        ) from None
    return target
