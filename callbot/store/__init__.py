"""Where a bot keeps what must survive: accepted notifications, calls, their order.

``memory`` (the default) keeps everything in the bot's process. A Redis URL
(``CALLBOT_STORE=redis://host:6379/0``) lets several instances behind a load
balancer share calls, with per-call order and each notification's handlers run
once across them. See docs/scaling.md.
"""

from __future__ import annotations

from ._base import Outcomes, Store
from ._memory import MemoryStore
from ._open import open_store

__all__ = ["MemoryStore", "Outcomes", "Store", "open_store"]
