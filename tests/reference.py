"""The ESFT reference's own code and files, the oracles of the fidelity tests: read from `../shared/esft/reference/`
(the reference repository as published, see ../shared/esft/README.md), which CI and the team's checkouts have.

Its modules are not imported whole: they import what a test does not need and this environment lacks or no longer
has (transformers 4 internals in `deepseek/modeling_deepseek.py`, deepspeed in `train_ep.py`). `reference_code`
runs only the named top-level definitions of a file, with the definitions and imports they use, from the file's own
source.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from types import SimpleNamespace

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "esft" / "reference"


def reference_file(path: str) -> Path:
    """A file of the reference; the test skips, saying where it looked, where it is missing (CI and the team's
    checkouts have it; a bare clone elsewhere does not)."""
    file = REFERENCE / path
    if not file.is_file():
        pytest.skip(f"the ESFT reference's {path} is not at {file} (see ../shared/esft/README.md)")
    return file


@functools.cache
def reference_code(path: str, *names: str) -> SimpleNamespace:
    """The top-level functions, classes or constants `names` of the reference's file `path`, as attributes.

    Each statement that defines one of them runs, after the statements that define the top-level names it uses
    (its base classes, helpers, constants, imports), in file order, with line numbers kept for tracebacks."""
    file = reference_file(path)
    definitions: dict[str, ast.stmt] = {}  # top-level name -> the statement that binds it
    for statement in ast.parse(file.read_text(encoding="utf-8"), filename=str(file)).body:
        if isinstance(statement, ast.Import | ast.ImportFrom):
            for alias in statement.names:  # one import statement per name, so that only the needed ones run
                alone = ast.copy_location(
                    ast.Import(names=[alias])
                    if isinstance(statement, ast.Import)
                    else ast.ImportFrom(module=statement.module, names=[alias], level=statement.level),
                    statement,
                )
                definitions[alias.asname or alias.name.split(".")[0]] = alone
        elif isinstance(statement, ast.FunctionDef | ast.ClassDef):
            definitions[statement.name] = statement
        elif isinstance(statement, ast.Assign | ast.AnnAssign):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            definitions |= {target.id: statement for target in targets if isinstance(target, ast.Name)}
    if missing := [name for name in names if name not in definitions]:
        raise LookupError(f"{file} defines no {', '.join(missing)}")

    needed: dict[str, ast.stmt] = {}
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in definitions and name not in needed:
            needed[name] = definitions[name]
            pending += [node.id for node in ast.walk(needed[name]) if isinstance(node, ast.Name)]
    statements = sorted({id(node): node for node in needed.values()}.values(), key=lambda node: node.lineno)
    namespace = {"__name__": f"esft_reference.{path.removesuffix('.py').replace('/', '.')}"}
    exec(compile(ast.Module(body=statements, type_ignores=[]), str(file), "exec"), namespace)
    return SimpleNamespace(**{name: namespace[name] for name in names})
