"""Outcome counters of the hot path."""

from __future__ import annotations

from collections import Counter
from typing import TypeVar

_K = TypeVar("_K")


class Counts(Counter[_K]):
    """A ``Counter`` whose ``counts[key] += 1`` costs what a dict's does.

    ``Counter`` defines ``__delitem__`` in Python, which makes every item assignment go
    through a generic slot (twice a dict's cost, several hundred instructions more): the
    receiver, the sequencer and the dispatcher each count every notification. Deleting a
    key that is not there raises ``KeyError`` here, as a dict's; nothing deletes counts.
    """

    __delitem__ = dict.__delitem__  # type: ignore[assignment]  # typed for keys, not any object
