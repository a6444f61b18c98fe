"""The collector thresholds ``CallBot.serve`` sets, and the ones it leaves alone."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from callbot._gc import SERVING_THRESHOLDS, tune_for_serving


@pytest.fixture
def thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


@pytest.mark.usefixtures("thresholds")
def test_the_interpreter_defaults_are_raised_for_serving() -> None:
    gc.set_threshold(700, 10, 10)
    assert tune_for_serving() is True
    assert gc.get_threshold() == SERVING_THRESHOLDS


@pytest.mark.usefixtures("thresholds")
def test_thresholds_a_process_chose_itself_are_kept() -> None:
    gc.set_threshold(1000, 15, 15)
    assert tune_for_serving() is False
    assert gc.get_threshold() == (1000, 15, 15)
