"""Tools for testing callbot bots: a local token authority, and more."""

from __future__ import annotations

from ._fake_graph import FakeGraph, FakeResponse, RecordedRequest
from ._tokens import TEST_TENANT_ID, TokenAuthority

__all__ = ["TEST_TENANT_ID", "FakeGraph", "FakeResponse", "RecordedRequest", "TokenAuthority"]
