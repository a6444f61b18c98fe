"""Types of the ``callbot`` command's options: a value out of range is a usage error
naming the option, before anything starts."""

from __future__ import annotations

import argparse
import math
import os
from urllib.parse import urlsplit

from ._dtmf import keys_of

__all__ = ["callback_url", "keys", "new_file", "port", "seconds"]


def port(text: str) -> int:
    """A TCP port to listen on, 0 (a free one) to 65535."""
    value = int(text)  # argparse names the option: "invalid port value: 'x'"
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {text}")
    return value


def seconds(text: str) -> float:
    """A duration: a finite number of seconds, 0 or more."""
    value = float(text)
    # NaN passes every comparison: a wait for NaN seconds never ends.
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"seconds are a number from 0 up, got {text}")
    return value


def callback_url(text: str) -> str:
    """A bot's callback URL: http or https, a host, and a port if any that is one."""
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number 0-65535
    except ValueError:
        fits = False
    else:
        fits = parts.scheme in ("http", "https") and bool(parts.hostname)
    if not fits:
        raise argparse.ArgumentTypeError(
            f"expected the bot's callback URL, e.g. http://127.0.0.1:8080/api/calls, got {text!r}"
        )
    return text


def new_file(text: str) -> str:
    """A file to write at the end of a run: checked first, so that no run is played for
    nothing."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"cannot write {text}: it is a directory")
    folder = os.path.dirname(text) or "."
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text}: no directory {folder}")
    return text


def keys(text: str) -> str:
    """Keypad keys (``12#``; spaces between them ignored), as :func:`keys_of` reads them."""
    try:
        return keys_of(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
