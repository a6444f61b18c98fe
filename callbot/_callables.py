"""What a handler or a chooser is when it is called: a coroutine or not, and its name."""

from __future__ import annotations

import functools
import inspect

__all__ = ["calls_a_coroutine", "handler_name", "is_an_object"]


def _beneath_partials(handler: object) -> object:
    while isinstance(handler, functools.partial):
        handler = handler.func
    return handler


def is_an_object(handler: object) -> bool:
    """Whether calling ``handler`` runs its class's ``__call__`` (functions, methods and
    classes have a qualified name of their own)."""
    return not isinstance(getattr(_beneath_partials(handler), "__qualname__", None), str)


def calls_a_coroutine(handler: object) -> bool:
    """Whether calling ``handler`` gives a coroutine: an ``async def`` function or method, an
    object whose class defines ``async def __call__``, or a ``functools.partial`` of one."""
    handler = _beneath_partials(handler)
    if inspect.iscoroutinefunction(handler):
        return True
    # An object is called through its class's __call__ (callable() says it has one), even
    # one that functools.update_wrapper gave the __qualname__ of the function it wraps.
    return callable(handler) and inspect.iscoroutinefunction(type(handler).__call__)


def handler_name(handler: object) -> str:
    """A handler's name in logs, metrics and diagrams: its qualified name, a partial's
    function's, an object's class's (a repr's memory address would differ in each process)."""
    handler = _beneath_partials(handler)
    name = getattr(handler, "__qualname__", None)
    return name if isinstance(name, str) else type(handler).__qualname__
