"""Command-line options made from a config dataclass's fields, so each setting is declared once (in the config).

`with_config_options(TrainingConfig, ...)` gives a command one Typer option per field that has `cli` metadata (see
`expert_hub.settings.setting`), and `config_values` turns what the command received back into field values.
Field kinds map to options as follows: a `bool` is `--x/--no-x` (or the given flag alone), a `tuple` one option per
element (a `repeatable` one: one option, given once per item), a `list[str]` one comma-separated option, `choices` a
fixed set, a `path` a `Path` (stored as its string), and a setting a base may default is optional: left out, it
takes the base's default, then the config's.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import Field, fields
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from expert_hub.settings import field_default, option_flags

_ELEMENT = "__"  # a tuple field's element options are named FIELD__0, FIELD__1, ...


def _option_fields(config_class) -> list[tuple[Field, type]]:
    hints = typing.get_type_hints(config_class)
    return [(f, hints[f.name]) for f in fields(config_class) if f.metadata.get("cli")]


def _plain(annotation) -> type:
    """`int | None` -> int."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(arguments) == 1
    return arguments[0] if optional else annotation


def _describe(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parameters(f: Field, annotation, base_note: Callable[[str], str]) -> list[inspect.Parameter]:
    """The option(s) for one field."""
    meta, kind, default, help_text = f.metadata, _plain(annotation), field_default(f), f.metadata["help"]
    flags = option_flags(f)
    bounds = {key: meta[key] for key in ("min", "max") if meta[key] is not None}
    if meta["base_default"]:  # optional: left out, the base's own default applies
        help_text = f"{help_text.removesuffix('.')} [default: {meta['default_help'] or _describe(default)}"
        help_text += f"{base_note(f.name)}]."
        if kind is bool:
            flags = (f"{flags[0]}/--no-{flags[0].removeprefix('--')}",)
        return [_keyword(f.name, kind | None, None, typer.Option(*flags, help=help_text, **bounds))]
    if default is None and meta["default_help"]:  # a computed default: Typer would show none
        help_text = f"{help_text.removesuffix('.')} [default: {meta['default_help']}]."
    if kind is bool:  # without flags of its own, Typer's --x/--no-x
        return [_keyword(f.name, bool, default, typer.Option(*meta["flags"], help=help_text))]
    if meta["repeatable"]:
        return [_keyword(f.name, list[str] | None, None, typer.Option(*flags, help=help_text, metavar=meta["metavar"]))]
    if typing.get_origin(kind) is tuple:
        return [
            _keyword(f"{f.name}{_ELEMENT}{i}", element, value, typer.Option(flag, help=help_text.format(n=i + 1)))
            for i, (flag, element, value) in enumerate(zip(flags, typing.get_args(kind), default))
        ]
    if meta["choices"]:
        choices = Enum(f.name.title().replace("_", ""), {c.replace("-", "_"): c for c in meta["choices"]}, type=str)  # type: ignore[misc]
        if default is None:  # no choice made unless given
            return [_keyword(f.name, choices | None, None, typer.Option(*flags, help=help_text))]
        return [_keyword(f.name, choices, choices(default), typer.Option(*flags, help=help_text))]
    if typing.get_origin(kind) is list:
        return [_keyword(f.name, str, ",".join(default), typer.Option(*flags, help=help_text))]
    if meta["path"]:
        annotation = Path | None if kind is not annotation else Path
    option = typer.Option(*flags, help=help_text, envvar=meta["envvar"], metavar=meta["metavar"], **bounds)
    return [_keyword(f.name, annotation, default, option)]


def _keyword(name: str, annotation, default, option) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


def with_config_options(config_class, base_note: Callable[[str], str] = lambda name: ""):
    """Decorator: the command takes one option per `cli` field of `config_class`, received in its `**settings`.

    `base_note(field)` adds to a base-defaulted setting's stated default (e.g. the demo base's value).
    """

    def decorate(command):
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        derived = [p for f, annotation in _option_fields(config_class) for p in _parameters(f, annotation, base_note)]
        command.__signature__ = inspect.Signature([*own[:-1], *derived, *own[-1:]])  # the command's last option last
        return command

    return decorate


def config_values(config_class, settings: dict) -> dict:
    """Field values from the options `with_config_options` made; base-defaulted settings left out are omitted."""
    values: dict[str, object] = {}
    for f, annotation in _option_fields(config_class):
        kind = _plain(annotation)
        if f.metadata["repeatable"]:
            values[f.name] = tuple(settings[f.name] or ())
        elif typing.get_origin(kind) is tuple:
            values[f.name] = tuple(settings[f"{f.name}{_ELEMENT}{i}"] for i in range(len(typing.get_args(kind))))
        elif typing.get_origin(kind) is list:
            values[f.name] = [item.strip() for item in settings[f.name].split(",") if item.strip()]
        elif f.metadata["base_default"] and settings[f.name] is None:
            continue
        else:
            value = settings[f.name]
            values[f.name] = (
                value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value
            )
    return values
