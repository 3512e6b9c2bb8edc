"""Typed dataclass configs: defaults, then a TOML file, then command-line flags; unknown keys are errors.

``add_config_args`` turns every field of a dataclass into a ``--flag`` (underscores become dashes, lists are
comma-separated); ``resolve_config`` layers file and flags over the defaults and validates types.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``Optional``: return (inner type, optional?)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(name: str, tp: Any, value: Any) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {name!r} may not be empty")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r} expects a list, got {value!r}")
        return [_convert(name, item, v) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {name!r} expects true or false, got {value!r}")
    if base in (int, float, str):
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config key {name!r} expects an integer, got {value!r}")
        if base is str and not isinstance(value, str):
            raise ConfigError(f"config key {name!r} expects a string, got {value!r}")
        try:
            return base(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {name!r} expects {base.__name__}, got {value!r}") from None
    return value


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--field-name`` for every field of dataclass ``cls`` (default None = not given)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        helptext = f"{helptext} (default: {default})" if helptext else f"default: {default}"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=helptext)


def resolve_config(cls: type[T], file: Path | None, args: argparse.Namespace | None) -> T:
    """Defaults <- TOML ``file`` <- non-None flags in ``args``; every value converted and checked."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {file} is not valid TOML: {e}") from None
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown keys in {file}: {', '.join(unknown)}")
        values.update(data)
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    converted = {k: _convert(k, hints[k], v) for k, v in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def save_config(config: Any, path: Path) -> None:
    """Write the resolved config next to a run's outputs."""
    Path(path).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
