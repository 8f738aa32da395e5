"""Typed run configurations: one frozen dataclass is the single source of a script's settings.

A script declares its settings once, each field with its default and a one-line help::

    @dataclass(frozen=True)
    class Config:
        lr: float = option(1e-4, "peak learning rate (AdamW)", gt=0)
        epochs: int = option(1, "passes over the training set", ge=1)
        warmup: int = option(0, "warm-up steps", ge=0)

        def __post_init__(self):
            check_ranges(self)  # every field's gt/ge/lt/le bound
            check(self.warmup < 10 * self.epochs, "--warmup must be ...")  # checks between fields

and gets its command line from it (:func:`parse_config`): every field is a ``--flag`` with its help
and default; ``--config FILE`` reads JSON (or TOML) with the command line on top; ``--print-config``
prints the resolved configuration and exits. Ranges are checked when the dataclass is built, so a bad
value is one line (:class:`ConfigError`) before any model or data is loaded. :func:`cli_main` turns
the library's errors into that one ``error:`` line and an exit status, never a traceback.

Types understood: ``bool`` (``--flag`` / ``--no-flag``), ``int``, ``float``, ``str``, ``pathlib.Path``,
``X | None`` of these, and ``tuple[str, ...]`` (one or more values). ``option(..., choices=...)``
restricts a value to a set, ``gt``/``ge``/``lt``/``le`` to a range (``None`` is always allowed for an
optional field).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "ConfigError",
    "check",
    "check_ranges",
    "cli_main",
    "config_diff",
    "config_to_dict",
    "config_from_dict",
    "option",
    "parse_config",
]


class ConfigError(ValueError):
    """A setting is out of range, unknown or malformed (one line, naming the flag or file)."""


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    metavar: str | None = None,
    const: Any = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A config field: its ``default``, a one-line ``help`` and, optionally, the allowed ``choices``,
    ``const`` (the value of the flag given without one: ``--remat`` = ``--remat nothing``) and the
    bounds ``gt < value``, ``ge <= value``, ``value < lt``, ``value <= le`` (checked by :func:`check_ranges`)."""
    if gt is not None and ge is not None or lt is not None and le is not None:
        raise TypeError("give at most one lower bound (gt or ge) and one upper bound (lt or le)")
    meta = {
        "help": help,
        "choices": choices,
        "metavar": metavar,
        "const": const,
        "lower": None if gt is None and ge is None else (gt if ge is None else ge, ge is not None),
        "upper": None if lt is None and le is None else (lt if le is None else le, le is not None),
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default (config fields are immutable)")
    return dataclasses.field(default=default, metadata=meta)


def _range_text(lower: tuple | None, upper: tuple | None) -> str:
    """``'> 0'``, ``'>= 1'``, ``'in [0, 1)'`` for a field's bounds (``(value, inclusive)`` pairs)."""
    if lower and upper:
        return f"in {'[' if lower[1] else '('}{lower[0]:g}, {upper[0]:g}{']' if upper[1] else ')'}"
    if lower:
        return f"{'>=' if lower[1] else '>'} {lower[0]:g}"
    return f"{'<=' if upper[1] else '<'} {upper[0]:g}"


def check_ranges(cfg) -> None:
    """Raise :class:`ConfigError` for the first field outside its ``option(gt=, ge=, lt=, le=)`` bounds:
    ``--lr must be > 0, got -0.0001``. ``None`` (an optional field left unset) is never out of range."""
    for f in dataclasses.fields(cfg):
        lower, upper, value = f.metadata.get("lower"), f.metadata.get("upper"), getattr(cfg, f.name)
        if value is None or (lower is None and upper is None):
            continue
        ok = (lower is None or (value >= lower[0] if lower[1] else value > lower[0])) and (
            upper is None or (value <= upper[0] if upper[1] else value < upper[0])
        )
        check(ok, "{} must be {}, got {}", flag(f.name), _range_text(lower, upper), value)


def check(ok: bool, message: str, *values: Any) -> None:
    """Raise :class:`ConfigError` with ``message.format(*values)`` unless ``ok``."""
    if not ok:
        raise ConfigError(message.format(*values))


def flag(name: str) -> str:
    """``'batch_size'`` -> ``'--batch-size'``."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- types
def _field_type(cls, f: dataclasses.Field) -> tuple[type, bool]:
    """``(base type, optional)`` of a field: ``int | None`` -> ``(int, True)``."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _coerce(cls, f: dataclasses.Field, value: Any, where: str) -> Any:
    """``value`` (from a config file or the command line) as the field's type, or a one-line error."""
    base, optional = _field_type(cls, f)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {flag(f.name)} cannot be null")
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {flag(f.name)} must be a list of strings, got {value!r}")
        value = tuple(value)
    elif base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {flag(f.name)} must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {flag(f.name)} must be an integer, got {value!r}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {flag(f.name)} must be a number, got {value!r}")
        value = float(value)
    elif base is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: {flag(f.name)} must be a path, got {value!r}")
        value = Path(value)
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {flag(f.name)} must be a string, got {value!r}")
    for text in value if isinstance(value, tuple) else (value,):
        if isinstance(text, str) and base is not Path:  # paths may hold undecodable bytes; texts may not
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(
                    f"{where}: {flag(f.name)} is not valid Unicode text ({ascii(text)[:60]}: "
                    "undecodable bytes in the argument?)"
                ) from None
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {flag(f.name)} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def config_to_dict(cfg) -> dict[str, Any]:
    """The config as JSON values (paths as strings, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


def config_from_dict(cls, values: dict[str, Any], where: str = "config"):
    """Build ``cls`` from JSON values: unknown keys and wrong types are one-line errors naming ``where``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k.replace("-", "_") not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {k.replace("-", "_"): v for k, v in values.items()}
    return cls(**{k: _coerce(cls, fields[k], v, where) for k, v in kwargs.items()})


def config_diff(a, b) -> list[str]:
    """Names of the fields whose values differ between two configs of the same class."""
    da, db = config_to_dict(a), config_to_dict(b)
    return [k for k in da if da[k] != db.get(k)]


def read_config_file(path: Path) -> dict[str, Any]:
    """A ``--config`` file: JSON, or TOML (``.toml``, Python 3.11+)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    if str(path).endswith(".toml"):
        try:
            import tomllib
        except ImportError:
            raise ConfigError(f"--config {path}: TOML needs Python 3.11+ (tomllib); use JSON") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- the command line
class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`ConfigError` line instead of usage + exit."""

    def error(self, message):
        raise ConfigError(message)


_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """``--lr -1e-4`` -> ``--lr=-1e-4``: argparse (before 3.13) takes ``-1e-4`` for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(argv) and _NUMBER.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _help(f: dataclasses.Field, shown_default: Any) -> str:
    text = f.metadata.get("help", "")
    if shown_default is None or shown_default is False or shown_default == ():
        return text
    if isinstance(shown_default, tuple):
        shown_default = ",".join(shown_default)
    return f"{text} (default: {shown_default})"


def build_parser(cls, description: str, *, epilog: str | None = None) -> argparse.ArgumentParser:
    """The ``argparse`` parser of a config class (every default shown, none ``None``)."""
    ap = _Parser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read settings from a JSON (or TOML) file; flags on the command line override it",
    )
    ap.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    for f in dataclasses.fields(cls):
        base, _ = _field_type(cls, f)
        kw: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": _help(f, f.default),
            "metavar": f.metadata.get("metavar"),
        }
        if base is bool:
            kw.pop("metavar")
            ap.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        if typing.get_origin(base) is tuple:
            kw["nargs"] = "+"
            kw["type"] = str
        else:
            kw["type"] = {int: int, float: float, Path: Path}.get(base, str)
        if f.metadata.get("choices") is not None:
            kw["choices"] = f.metadata["choices"]
            kw.pop("metavar")
        if f.metadata.get("const") is not None:
            kw["nargs"], kw["const"] = "?", f.metadata["const"]
        ap.add_argument(flag(f.name), **kw)
    return ap


def parse_config(cls, argv: list[str] | None = None, *, description: str = "", epilog: str | None = None):
    """``(config, explicit)`` from the command line: defaults, then ``--config FILE``, then the flags
    given. ``explicit`` is the set of field names the command line (not the file) gave. With
    ``--print-config`` the resolved config is printed as JSON and the process exits 0.

    Raises :class:`ConfigError` (one line) for an unknown flag, a malformed value, a setting out of
    range (the class's ``__post_init__`` checks) or an unreadable config file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    for a in argv:  # argv is undecodable text where the terminal sent invalid UTF-8 (surrogate escapes)
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"argument {a.encode('utf-8', 'backslashreplace').decode()!r} is not valid UTF-8 text"
            ) from None
    ns = vars(build_parser(cls, description, epilog=epilog).parse_args(_join_negative_numbers(argv)))
    file_values = read_config_file(ns.pop("config")) if ns.get("config") is not None else {}
    ns.pop("config", None)
    print_config = ns.pop("print_config", False)
    where = "--config file"
    base = config_to_dict(config_from_dict(cls, file_values, where)) if file_values else {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: _coerce(cls, fields[k], v, where) for k, v in base.items()}
    values.update(ns)  # the command line on top
    cfg = cls(**values)
    if print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        raise SystemExit(0)
    return cfg, set(ns)


# ----------------------------------------------------------------------------- main
def one_line(e: BaseException) -> str:
    """The first line of an error's message (``...`` if it had more)."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[0] + (" ..." if len(lines) > 1 else "")


def cli_main(main: Callable[[], int]) -> int:
    """Run ``main()`` and turn a user's mistake into one ``error:`` line and exit status 2.

    Caught: ``ValueError`` (bad settings, data and checkpoints: :class:`ConfigError`,
    ``fnlm.io.CheckpointError``, ``fnlm.data.DatasetError`` are all ``ValueError``\\ s) and ``OSError``
    (files and directories). ``KeyboardInterrupt`` exits 130. Set ``FNLM_TRACEBACK=1`` to see the
    traceback instead.
    """
    from fnlm.data import DownloadError  # a RuntimeError: the network, not the user's input

    try:
        return main()
    except (ValueError, OSError, DownloadError) as e:
        if os.environ.get("FNLM_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
