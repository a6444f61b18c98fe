"""DTMF: the keys a caller presses and the tone names Graph uses for them."""

from __future__ import annotations

__all__ = ["DIGIT_OF_TONE", "TONE_OF_DIGIT", "digit_of", "tones_of"]

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
    return DIGIT_OF_TONE.get(tone, DIGIT_OF_TONE.get(tone.lower(), tone))


def tones_of(keys: str) -> list[str]:
    """Graph tone names for keys such as ``"12#"`` (whitespace ignored)."""
    try:
        return [TONE_OF_DIGIT[ch.upper()] for ch in keys if not ch.isspace()]
    except KeyError as exc:
        raise ValueError(f"not a DTMF key: {exc.args[0]!r} (use 0-9, *, #, A-D)") from None
