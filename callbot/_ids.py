"""Identifier helpers shared by every stage."""

from __future__ import annotations

__all__ = ["id_key"]


def id_key(identifier: str) -> str:
    """The form two Graph ids are compared in.

    Graph writes one id as ``0fe0623f-d628-...`` in a response and as
    ``0FE0623FD628...`` in a notification path, so compare without case or dashes.
    """
    return identifier.replace("-", "").lower()
