"""fnlm.config as a library: flags generated from a frozen dataclass, --config files under the command
line, declared ranges checked when the config is built (one-line ConfigError naming the flag)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from fnlm.config import ConfigError, check, check_ranges, option, parse_config


@dataclass(frozen=True)
class Cfg:
    lr: float = option(1e-3, "learning rate", gt=0)
    steps: int = option(10, "steps", ge=1)
    dropout: float = option(0.0, "dropout", ge=0, lt=1)
    top_p: float = option(1.0, "nucleus", gt=0, le=1)
    eval_every: int | None = option(None, "validate every N steps", ge=1)
    name: str = option("run", "a name")
    out: Path | None = option(None, "output directory")

    def __post_init__(self):
        check_ranges(self)
        check(self.eval_every is None or self.eval_every <= self.steps, "--eval-every must be <= --steps")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1e-4"], "--lr must be > 0, got -0.0001"),  # a negative number is a value, not a flag
        (["--lr=0"], "--lr must be > 0, got 0.0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        (["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
        (["--eval-every", "20"], "--eval-every must be <= --steps"),
        (["--steps", "x"], "--steps"),
    ],
)
def test_out_of_range_values_are_one_line_errors_naming_the_flag(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_config(Cfg, argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bounds_are_inclusive_or_exclusive_as_declared_and_none_is_allowed():
    cfg, explicit = parse_config(Cfg, ["--dropout", "0", "--top-p", "1", "--steps", "1", "--eval-every", "1"])
    assert (cfg.dropout, cfg.top_p, cfg.steps, cfg.eval_every) == (0.0, 1.0, 1, 1)
    assert explicit == {"dropout", "top_p", "steps", "eval_every"}
    assert parse_config(Cfg, [])[0] == Cfg()  # every default is in range, eval_every None included
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        Cfg(lr=-1.0)  # built directly, not only through the command line


def test_config_file_under_the_command_line(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"lr": 0.5, "steps": 3, "name": "from-file"}))
    cfg, explicit = parse_config(Cfg, ["--config", str(f), "--steps", "7"])
    assert (cfg.lr, cfg.steps, cfg.name) == (0.5, 7, "from-file") and explicit == {"steps"}
    f.write_text(json.dumps({"lr": -2}))
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        parse_config(Cfg, ["--config", str(f)])


def test_a_field_takes_one_lower_and_one_upper_bound():
    with pytest.raises(TypeError, match="at most one lower bound"):
        option(1, "x", gt=0, ge=0)
    with pytest.raises(TypeError, match="at most one lower bound"):
        option(1, "x", lt=2, le=2)
