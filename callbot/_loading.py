"""Finding the bot a command names (``module:attribute``)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable

from ._bot import CallBot
from ._errors import CallbotError

__all__ = ["load_bot"]


def load_bot(target: str) -> CallBot:
    """Import ``module:attribute`` and return the CallBot it names (or a factory's result)."""
    module_name, _, attribute = target.partition(":")
    if not module_name:
        raise CallbotError(f"expected MODULE:ATTRIBUTE, got {target!r}")
    if module_name.startswith(".") or module_name.endswith(".py") or "/" in module_name:
        # A file's path, or a relative name, which importlib refuses with a TypeError.
        name = module_name.rsplit("/", 1)[-1].removesuffix(".py").lstrip(".") or "bot"
        raise CallbotError(
            f"expected MODULE:ATTRIBUTE, got {target!r}: name the module as Python imports it, "
            f"e.g. {name}:{attribute or 'bot'}, run from the folder holding {name}.py"
        )
    if os.getcwd() not in sys.path:
        # A bot module next to where the command runs should import like a script.
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the named module being absent is a typo; a missing dependency inside it is a bug.
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise
        raise CallbotError(
            f"cannot import {module_name!r} (from {target!r}): no module named {exc.name!r} "
            f"in {os.getcwd()} or on the Python path"
        ) from None
    obj = getattr(module, attribute or "bot", None)
    if obj is None:
        raise CallbotError(f"{module_name} has no attribute {attribute or 'bot'!r}")
    if inspect.iscoroutinefunction(obj):
        # Calling it would fail with a TypeError, or leave a coroutine no one awaits.
        raise CallbotError(
            f"{target} is an async function (a handler?), not a CallBot or a function "
            f"returning one: name the bot, e.g. {module_name}:bot"
        )
    if not isinstance(obj, CallBot) and callable(obj):
        _check_takes_no_arguments(obj, target)
        obj = obj()
    if not isinstance(obj, CallBot):
        raise CallbotError(f"{target} is not a CallBot (got {type(obj).__name__})")
    return obj


def _check_takes_no_arguments(factory: Callable[..., object], target: str) -> None:
    """The command calls a factory with nothing: one that needs more is the user's mistake."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): just call it
        return
    required = [
        p.name
        for p in parameters
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise CallbotError(
            f"{target} takes arguments ({', '.join(required)}): name a CallBot, or a function "
            "that returns one and takes none"
        )
