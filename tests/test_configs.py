from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from diffusers_stages.configs import check_choices, config_parser, parse_config


@dataclass
class ToyConfig:
    """A config with one field of each supported kind."""

    steps: int = field(default=3, metadata={"help": "steps"})
    lr: float | None = None
    mode: Literal["a", "b"] = "a"
    ema: bool = False
    widths: list[int] = field(default_factory=lambda: [32, 64])

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"`steps` must be >= 1, got {self.steps}.")


def test_defaults_come_from_the_dataclass():
    assert parse_config(ToyConfig, []) == ToyConfig()


def test_every_kind_of_field_parses():
    config = parse_config(ToyConfig, ["--steps", "5", "--lr", "0.1", "--mode", "b", "--ema", "--widths", "8", "16"])
    assert config == ToyConfig(steps=5, lr=0.1, mode="b", ema=True, widths=[8, 16])
    assert parse_config(ToyConfig, ["--ema", "--no-ema"]).ema is False


def test_choices_and_validation_exit_with_the_message(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--mode", "c"])
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--steps", "0"])
    assert "`steps` must be >= 1" in capsys.readouterr().err


def test_help_shows_defaults():
    text = config_parser(ToyConfig).format_help()
    assert "steps (default: 3)" in text and "A config with one field" in text


@dataclass(kw_only=True)
class RequiredConfig:
    """A config with a field that has no default."""

    path: str
    mode: Literal["a", "b"] | None = None

    def __post_init__(self):
        check_choices(self)


def test_a_field_without_default_is_a_required_flag():
    assert parse_config(RequiredConfig, ["--path", "p"]) == RequiredConfig(path="p")
    with pytest.raises(SystemExit):
        parse_config(RequiredConfig, [])


def test_check_choices_names_the_literal_field():
    assert RequiredConfig(path="p", mode="b").mode == "b"
    with pytest.raises(ValueError, match="`mode` must be one of \\['a', 'b'\\]"):
        RequiredConfig(path="p", mode="c")
