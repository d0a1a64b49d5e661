"""`setting(...)`: a config dataclass field that also says how the command line offers it.

`TrainingConfig` and `ServeConfig` declare each setting once, with this; `cli/config_options.py` turns the fields
into a command's options and the options back into field values, so a new option is one new field.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field

DTYPES = ("auto", "float32", "bfloat16", "float16")  # what a model's weights may be loaded as


def setting(
    default=MISSING,
    *,
    help: str,
    default_factory=MISSING,
    flags: tuple[str, ...] = (),
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] = (),
    base_default: bool = False,
    default_help: str | None = None,
    path: bool = False,
    repeatable: bool = False,
    envvar: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
):
    """A config field with what the command line needs to offer it.

    `flags`: the option names (default `--field-name`; a tuple field takes one flag per element). `min` / `max`:
    bounds the command line enforces. `base_default`: a base model may ship its own default. `default_help`: how
    `--help` states the default when the field's default is computed (None) or a flag. `path`: a file path, written
    as `str(Path(value))` as given on the command line. `repeatable`: a tuple of strings given as the option once
    per item (rather than one comma-separated option). `envvar`: read from this environment variable when the
    option is not given. `metavar`: how `--help` shows its value. `cli=False`: not an option.
    """
    metadata = dict(
        help=help,
        flags=flags,
        min=min,
        max=max,
        choices=choices,
        base_default=base_default,
        default_help=default_help,
        path=path,
        repeatable=repeatable,
        envvar=envvar,
        metavar=metavar,
        cli=cli,
    )
    return field(default=default, default_factory=default_factory, metadata=metadata)


def field_default(f: Field):
    """A dataclass field's default, whether given as a value or a factory."""
    return f.default_factory() if f.default is MISSING and callable(f.default_factory) else f.default


def option_flags(f: Field) -> tuple[str, ...]:
    """The command-line names of a setting: its `flags`, else `--field-name`."""
    return f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",)
