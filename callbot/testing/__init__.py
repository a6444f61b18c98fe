"""Tools for testing callbot bots without Teams.

* :class:`Simulator` plays Microsoft Graph on 127.0.0.1: it answers the bot's
  Graph requests and posts the signed notifications Graph would, and a
  scripted caller presses keys, joins, leaves and hangs up;
  :func:`run_with_simulator` serves a bot against one.
* The pytest plugin (:mod:`callbot.testing.plugin`, loaded automatically)
  gives tests a ``sim`` fixture running the bot from your ``callbot_bot`` fixture.
* :mod:`callbot.testing.builders` builds every kind of notification body.
* :class:`FakeGraph` (Graph's REST API alone) and :class:`TokenAuthority`
  (callback tokens and the keys that sign them) are the simulator's parts.
"""

from __future__ import annotations

from . import builders
from ._fake_graph import FakeGraph, FakeResponse, RecordedRequest
from ._simulator import (
    DEFAULT_APP_ID,
    DeliveryOptions,
    SimulatedCall,
    Simulator,
    SimulatorError,
    Traffic,
    run_with_simulator,
)
from ._tokens import TEST_TENANT_ID, TokenAuthority

__all__ = [
    "DEFAULT_APP_ID",
    "TEST_TENANT_ID",
    "DeliveryOptions",
    "FakeGraph",
    "FakeResponse",
    "RecordedRequest",
    "SimulatedCall",
    "Simulator",
    "SimulatorError",
    "TokenAuthority",
    "Traffic",
    "builders",
    "run_with_simulator",
]
