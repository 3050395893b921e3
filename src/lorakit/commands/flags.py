"""Command-line flags made from a dataclass's fields, so a config class is the one source of `--help`.

`--max-steps 10` for field `max_steps: int`; booleans get `--x/--no-x`; lists take commas
(`--target-modules q_proj,v_proj`); a field's help is its `metadata["help"]` (or "doc").
Flags default to "not given", so only what the user typed overrides the config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable
from typing import Any

DEST_PREFIX = "field:"  # keeps field names apart from the command's own arguments


def add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, *, exclude: set[str] = frozenset(), title: str | None = None
) -> None:
    """One `--field-name` option per field of `cls` (skipping `exclude` and private fields)."""
    group = parser.add_argument_group(title or f"{cls.__name__} fields (override the config file)")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude or field.name.startswith("_") or not field.init:
            continue
        kind = _unwrap_optional(hints.get(field.name, str))
        option = "--" + field.name.replace("_", "-")
        doc = field.metadata.get("help") or field.metadata.get("doc") or ""
        default = _default_of(field)
        if "default" in doc or "required" in doc:  # the help already says it
            help_text = doc
        else:
            help_text = f"{doc} (default: {_show(default)})" if doc else f"default: {_show(default)}"
        common: dict[str, Any] = {"dest": DEST_PREFIX + field.name, "default": argparse.SUPPRESS,
                                  "help": help_text.replace("%", "%%")}
        if kind is bool:
            group.add_argument(option, action=argparse.BooleanOptionalAction, **common)
            continue
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        group.add_argument(option, type=_converter(kind, option), choices=choices,
                           metavar=_metavar(kind), **common)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The dataclass fields the user set on the command line, by field name."""
    return {k[len(DEST_PREFIX):]: v for k, v in vars(args).items() if k.startswith(DEST_PREFIX)}


def _unwrap_optional(kind: Any) -> Any:
    """`X | None` -> X; other unions stay as they are."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def _converter(kind: Any, option: str) -> Callable[[str], Any]:
    """Text -> value of `kind`; unknown kinds are read as YAML (`{q_proj: 4}`, `[1, 2]`)."""
    origin = typing.get_origin(kind)
    if kind in (int, float, str):
        return kind
    if typing.get_origin(kind) is typing.Literal:
        values = typing.get_args(kind)
        return type(values[0]) if values else str
    if origin in (list, tuple, set) or kind in (list, tuple, set):
        item = (typing.get_args(kind) or (str,))[0]
        item = item if item in (int, float, str) else str
        return lambda text: [item(part.strip()) for part in text.split(",") if part.strip()]
    if isinstance(kind, type) and issubclass(kind, os.PathLike):
        return kind

    def from_yaml(text: str) -> Any:
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise argparse.ArgumentTypeError(f"{option}: not a valid value ({err.problem})") from None

    return from_yaml


def _metavar(kind: Any) -> str | None:
    origin = typing.get_origin(kind)
    if kind is int:
        return "N"
    if kind is float:
        return "X"
    if origin in (list, tuple, set) or kind in (list, tuple, set):
        return "A,B,..."
    if origin is typing.Literal:
        return None  # argparse shows the choices
    return "TEXT" if kind is str else "VALUE"


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "required"


def _show(value: Any) -> str:
    """A default as the user would type it (YAML spelling: null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
