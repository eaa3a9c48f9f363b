"""Typed configs <-> command lines: one dataclass is the single list of a job's options and their defaults.

A config is a ``@dataclass`` whose fields carry their help text in ``metadata["help"]``. :func:`config_parser`
turns it into an ``argparse`` parser (flags named after the fields, a field without default as a required flag,
``Literal`` types as choices, ``bool`` as ``--flag`` / ``--no-flag``, ``list[int]`` as several values), and :func:`parse_config` builds the config from a
command line, so a script never repeats a default. Validation lives in the config's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union

C = TypeVar("C")


def _unwrap_optional(tp):
    """``Optional[X]`` / ``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _argument(field: dataclasses.Field, tp) -> tuple[list[str], dict[str, Any]]:
    """The ``add_argument`` call for one field."""
    flag = f"--{field.name}"
    kwargs: dict[str, Any] = {"help": field.metadata.get("help", "")}
    if field.default is not dataclasses.MISSING:
        kwargs["default"] = field.default
    elif field.default_factory is not dataclasses.MISSING:
        kwargs["default"] = field.default_factory()
    else:
        kwargs["required"] = True
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs["choices"] = typing.get_args(tp)
        kwargs["type"] = type(typing.get_args(tp)[0])
    elif origin in (list, tuple):
        kwargs["nargs"] = "+"
        kwargs["type"] = typing.get_args(tp)[0]
    elif tp in (int, float, str):
        kwargs["type"] = tp
    else:
        raise TypeError(f"config field {field.name!r} has a type the command line cannot express: {tp!r}.")
    if "choices" in field.metadata:
        kwargs["choices"] = field.metadata["choices"]
    if kwargs.get("default") is not None and not kwargs["help"].endswith(")") and tp is not bool:
        kwargs["help"] += " (default: %(default)s)"
    return [flag], kwargs


def config_parser(cls: type, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one flag per field of the dataclass ``cls``."""
    parser = parser or argparse.ArgumentParser(
        description=(cls.__doc__ or "").strip().split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.init and field.metadata.get("cli") is not False:
            flags, kwargs = _argument(field, hints[field.name])
            parser.add_argument(*flags, **kwargs)
    return parser


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config ``cls`` from a parsed namespace (fields absent from the namespace keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """Parse a command line into the config ``cls``; invalid values exit with the config's message."""
    parser = config_parser(cls)
    args = parser.parse_args(argv)
    try:
        return config_from_args(cls, args)
    except ValueError as e:
        parser.error(str(e))


def check_choices(config) -> None:
    """Raise a ``ValueError`` naming the field when a ``Literal``-typed field of the dataclass ``config`` holds a
    value outside its choices (Python does not enforce ``Literal``; call this from ``__post_init__``)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        tp = _unwrap_optional(hints[field.name])
        value = getattr(config, field.name)
        if typing.get_origin(tp) is Literal and value is not None and value not in typing.get_args(tp):
            raise ValueError(f"`{field.name}` must be one of {list(typing.get_args(tp))}, got {value!r}.")


def public_fields(config) -> dict[str, Any]:
    """The fields of a config dataclass that may be logged (tracker configs, model cards, metrics): all but secrets,
    i.e. fields named ``*_token``, ``*_secret``, ``*_password`` or ``*api_key``."""
    secret = ("_token", "_secret", "_password", "api_key")
    return {k: v for k, v in dataclasses.asdict(config).items() if not k.endswith(secret) and k != "token"}
