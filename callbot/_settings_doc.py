"""Every setting as a Markdown table, read from the ``Settings`` class (for the docs site)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap

from ._config import Settings

__all__ = ["settings_descriptions", "settings_table"]


def settings_descriptions() -> dict[str, str]:
    """Each field's docstring (the string literal after it in the class body), by name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Settings)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    found: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found[node.target.id] = inspect.cleandoc(after.value.value)
    return found


def _cell(text: str) -> str:
    # Markdown table cells hold one line; reST literals become Markdown code.
    return re.sub(r"``(.+?)``", r"`\1`", " ".join(text.split())).replace("|", "\\|")


def _default(field: dataclasses.Field[object]) -> str:
    if field.default is dataclasses.MISSING:
        return ""
    value = field.default
    if value is None or value == "" or value == () or value == frozenset():
        return ""
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if isinstance(value, frozenset | tuple):
        # As the variable takes it: comma-separated.
        return "`" + ",".join(sorted(value) if isinstance(value, frozenset) else value) + "`"
    return f"`{value}`"


def settings_table() -> str:
    """``| variable | keyword | meaning | default |``, one row per field of ``Settings``."""
    descriptions = settings_descriptions()
    rows = [
        "| variable | `CallBot(...)` keyword | meaning | default |",
        "| --- | --- | --- | --- |",
    ]
    for field in dataclasses.fields(Settings):
        meaning = descriptions.get(field.name, "")
        if field.name == "app_id":
            meaning += " **Required.**"
        kind = str(field.type)
        if kind.startswith(("frozenset", "tuple")):
            meaning += " As a variable: comma-separated."
        elif kind == "bool":
            meaning += " As a variable: `1`/`0` (or `true`/`false`)."
        rows.append(
            f"| `CALLBOT_{field.name.upper()}` | `{field.name}` | {_cell(meaning)} "
            f"| {_default(field)} |"
        )
    return "\n".join(rows) + "\n"
