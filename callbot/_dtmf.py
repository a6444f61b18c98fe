"""DTMF: the keys a caller presses and the tone names Graph uses for them.

The one owner of what a key is: keys are read whatever their case (``"a"`` is key
``A``), whitespace between them is ignored, and anything else is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import models

__all__ = [
    "DIGIT_OF_TONE",
    "TONE_OF_DIGIT",
    "digit_of",
    "key_list",
    "key_of",
    "keys_of",
    "tones_of",
]

TONE_OF_DIGIT: dict[str, str] = {
    **{str(d): f"tone{d}" for d in range(10)},
    "*": "star",
    "#": "pound",
    "A": "a",
    "B": "b",
    "C": "c",
    "D": "d",
}
"""Key on the keypad -> Graph's tone name (``"1"`` -> ``"tone1"``, ``"#"`` -> ``"pound"``)."""

DIGIT_OF_TONE: dict[str, str] = {tone: digit for digit, tone in TONE_OF_DIGIT.items()}
"""Graph's tone name -> key on the keypad."""


def digit_of(tone: str) -> str:
    """The key for a Graph tone name (``"tone1"`` -> ``"1"``); unknown names come back as is."""
    key = key_of(tone)
    return tone if key is None else key


def key_of(tone: str) -> str | None:
    """The keypad key a Graph tone name stands for (``"tone1"`` -> ``"1"``), or ``None`` for a
    tone that is no key: ``flash`` (a hook flash, in Graph's ``tone`` enum) or a tone Graph
    adds later."""
    return DIGIT_OF_TONE.get(tone, DIGIT_OF_TONE.get(tone.lower()))


def keys_of(keys: str) -> str:
    """``keys`` as the keys :func:`digit_of` gives (``"12 a#"`` -> ``"12A#"``).

    Raises ``ValueError`` naming a character that is no key.
    """
    found = ""
    for ch in keys:
        if ch.isspace():
            continue
        if ch.upper() not in TONE_OF_DIGIT:
            raise ValueError(f"not a DTMF key: {ch!r} (use 0-9, *, #, A-D)")
        found += ch.upper()
    return found


def tones_of(keys: str | Sequence[str], *, beta: bool) -> list[str]:
    """Graph tone names for keys such as ``"12#"``; a list is tone names, each checked and
    spelt as :func:`callbot.models.graph_value` does on Graph's beta (``beta``) or v1.0."""
    if not isinstance(keys, str):
        return [models.graph_value(models.Tone, tone, "tones", beta=beta) for tone in keys]
    return [TONE_OF_DIGIT[key] for key in keys_of(keys)]


def key_list(keys: str | Sequence[str], name: str) -> list[str]:
    """Keys as Graph takes them where it names keys, not tones (``recordResponse``'s
    ``stopTones``: ``["#", "1"]``): a string of keys, or a list of one key each.

    Raises ``ValueError`` naming ``name`` and what is no key.
    """
    if isinstance(keys, str):
        try:
            return list(keys_of(keys))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    found: list[str] = []
    for key in keys:
        try:
            one = keys_of(key) if isinstance(key, str) else ""
        except ValueError:
            one = ""
        if len(one) != 1:
            raise ValueError(f"{name}: {key!r} is not one DTMF key (use 0-9, *, #, A-D)")
        found.append(one)
    return found
