"""Command-line options declared once: as the fields of the dataclasses they fill.

A field made with `option(...)` is a flag of `interpql serve` (its name, with dashes, unless
`flag` says otherwise), with its default, help and group in one place; `add_options` puts a
dataclass's options on a parser and `from_args` builds the dataclass back from what was parsed.
A field whose type is itself such a dataclass (ServeOptions.settings) contributes its options
too. Types decide the action: a bool is a switch (`--x` or, defaulting to True, `--x/--no-x`),
a list or tuple is repeatable (`action="append"`), anything else takes one value.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_UNSET: Any = object()


class groups:
    """The sections of `interpql serve --help`."""

    MODEL = "the model"
    DATA = "node data"
    EXPLAIN = "explaining through an OpenAI-compatible API"
    ACCESS = "API keys and access (mutations need a key)"
    LIMITS = "limits (typed errors when exceeded; 0: unlimited)"
    OBSERVE = "observability"


def option(
    default: Any = _UNSET,
    *,
    help: str,
    flag: str | None = None,
    group: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    default_factory: Any = _UNSET,
    minimum: float = 0,
    maximum: float | None = None,
) -> Any:
    """A dataclass field that is a command-line option (see the module docstring). A number
    must be finite and within [`minimum`, `maximum`] (by default, not negative)."""
    metadata = {
        "help": help,
        "flag": flag,
        "group": group,
        "choices": choices,
        "metavar": metavar,
        "minimum": minimum,
        "maximum": maximum,
    }
    if default_factory is not _UNSET:
        return dataclasses.field(default_factory=default_factory, metadata={"option": metadata})
    return dataclasses.field(default=default, metadata={"option": metadata})


def _options(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], dict[str, Any], Any]]:
    """(field, its option metadata, its resolved type) for every option of `cls`, nested
    dataclasses included, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found += _options(kind)  # type: ignore[arg-type]
        elif "option" in f.metadata:
            found.append((f, f.metadata["option"], kind))
    return found


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc,operator]


def _is_sequence(kind: Any) -> bool:
    return typing.get_origin(kind) in (list, tuple)


def _scalar(kind: Any) -> Any:
    """The type argparse converts one value to: int, float or str (None for bool)."""
    if kind is bool:
        return None
    if _is_sequence(kind):
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return kind if kind in (int, float) else str


def _flag(f: dataclasses.Field[Any], meta: dict[str, Any]) -> str:
    return str(meta["flag"] or "--" + f.name.replace("_", "-"))


def flags(cls: type[Any], only: frozenset[str] | None = None) -> dict[str, bool]:
    """Each option's flag (those named in `only`, if given) and whether it takes a value."""
    return {
        _flag(f, meta): kind is not bool
        for f, meta, kind in _options(cls)
        if only is None or f.name in only
    }


def add_options(
    parser: argparse.ArgumentParser, cls: type[Any], only: frozenset[str] | None = None
) -> None:
    """Puts `cls`'s options on `parser` (those named in `only`, if given)."""
    for f, meta, kind in _options(cls):
        if only is not None and f.name not in only:
            continue
        target: Any = parser
        if meta["group"] is not None:
            target = _group(parser, meta["group"])
        flag = _flag(f, meta)
        default = _default(f)
        shown = "" if default in (None, False, True, (), []) else f" (default: {default})"
        named: dict[str, Any] = {"dest": f.name, "help": meta["help"] + shown}
        if kind is not bool and meta["choices"] is None:
            named["metavar"] = meta["metavar"] or flag.removeprefix("--").replace("-", "_").upper()
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            target.add_argument(flag, action=action, default=default, **named)
            continue
        if meta["choices"] is not None:
            named["choices"] = meta["choices"]
        convert = _scalar(kind)
        if convert in (int, float):
            convert = _bounded(convert, meta.get("minimum", 0), meta.get("maximum"))
        if _is_sequence(kind):
            target.add_argument(flag, action="append", type=convert, default=[], **named)
        else:
            target.add_argument(flag, type=convert, default=default, **named)


def _bounded(kind: type[Any], minimum: float, maximum: float | None) -> Any:
    """argparse's converter to `kind`, refusing what is not finite or out of bounds: a limit
    of -1 or nan is never meant, and would refuse every request or none, silently."""

    def convert(text: str) -> Any:
        value = kind(text)
        if not (
            math.isfinite(value) and value >= minimum and (maximum is None or value <= maximum)
        ):
            bounds = (
                f"at least {minimum:g}" if maximum is None else f"in [{minimum:g}, {maximum:g}]"
            )
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, not {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value" errors
    return convert


def _group(parser: argparse.ArgumentParser, title: str) -> Any:
    """The parser's argument group of that title (made once, whichever dataclass asks)."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def from_args(
    cls: type[T], args: argparse.Namespace, only: frozenset[str] | None = None, **given: Any
) -> T:
    """`cls` with its options' values from `args` (nested dataclasses likewise; those named
    in `only`, if given, the others left at their defaults); `given` overrides fields by name."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        if f.name in given:
            values[f.name] = given[f.name]
        elif dataclasses.is_dataclass(kind):
            values[f.name] = from_args(kind, args, only)  # type: ignore[arg-type]
        elif "option" in f.metadata and hasattr(args, f.name) and (only is None or f.name in only):
            value = getattr(args, f.name)
            if _is_sequence(kind) and typing.get_origin(kind) is tuple:
                value = (*_default(f), *value) if value else _default(f)
            values[f.name] = value
    return cls(**values)
