"""Recording accepted notifications to a JSON-lines file, and reading them back to replay.

With ``settings.record_path`` set, each batch the receiver accepts becomes one
line::

    {"at": "2025-05-01T09:30:00.123456+00:00", "tenant_id": "...", "value": [...]}

``value`` holds the notification items as received, except that every value
under a key naming a token or a secret (``recordingAccessToken``, ``token``,
a meeting's ``passcode``, ...) is replaced by ``"[removed]"``, and so is the
passcode of a Teams meeting link (``https://teams.microsoft.com/meet/...?p=``):
with the meeting id, it lets anyone join. The bearer token of the request is never
seen here. ``callbot replay FILE`` posts the batches again, in order.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from . import events
from ._errors import CallbotError, ConfigurationError
from ._log import get_logger

__all__ = [
    "REMOVED",
    "NotificationRecorder",
    "RecordedBatch",
    "read_recording",
    "records_real_calls",
    "scrub",
]

log = get_logger("callbot.recording")

REMOVED = "[removed]"
_SECRET_ENDINGS = ("token", "passcode", "password", "secret")
_SECRET_NAMES = frozenset({"authorization"})
# A Teams meeting link's passcode: /meet/{join meeting id}?p={passcode}.
_MEETING_PASSCODE = re.compile(r"(/meet/[^?#]*\?(?:[^#]*&)?p=)[^&#]*", re.IGNORECASE)


def _is_secret(key: str) -> bool:
    lowered = key.lower().replace("_", "")
    return lowered.endswith(_SECRET_ENDINGS) or lowered in _SECRET_NAMES


def scrub(value: Any) -> Any:
    """A copy of ``value`` with every token or secret replaced by ``"[removed]"``."""
    if isinstance(value, dict):
        return {
            k: (REMOVED if _is_secret(k) and v not in (None, "") else scrub(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str) and "/meet/" in value.lower():
        return _MEETING_PASSCODE.sub(lambda m: m.group(1) + REMOVED, value)
    return value


def records_real_calls(record_path: str | None) -> bool:
    """Whether ``record_path`` is the file ``CALLBOT_RECORD_PATH`` names: the developer's
    record of real calls, which simulated ones (a test's, a replay's) never join."""
    named = os.environ.get("CALLBOT_RECORD_PATH", "").strip()
    return record_path is not None and record_path == named


class NotificationRecorder:
    """Appends each accepted batch to a JSON-lines file (opened as the bot starts)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._failed = False

    def write(self, batch: Sequence[events.Event]) -> None:
        """Append one line for the batch; a failure is logged once and recording stops."""
        if not batch or self._failed:
            return
        tenant = next((e.tenant_id for e in batch if e.tenant_id), None)
        line = {
            "at": datetime.now(UTC).isoformat(),
            "tenant_id": tenant,
            "value": [scrub(event.raw) for event in batch],
        }
        try:
            file = self._open()
            # A small synchronous append: recording is a debugging aid, not a hot path.
            file.write(json.dumps(line, separators=(",", ":")) + "\n")
            file.flush()
        except (OSError, ValueError) as exc:
            self._failed = True
            log.error("recording_failed", path=str(self.path), error=str(exc))

    def open(self) -> None:
        """Open the file now: a path that cannot be written stops the bot as it starts."""
        try:
            self._open()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot write record_path {self.path}: {exc.strerror or exc} (CALLBOT_RECORD_PATH)"
            ) from None

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        return self._file

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True, kw_only=True)
class RecordedBatch:
    """One recorded batch: when it arrived, its tenant, and the body to post again."""

    line: int
    at: float | None
    tenant_id: str | None
    body: dict[str, Any]


def read_recording(path: str | Path) -> Iterator[RecordedBatch]:
    """The batches of a recording, in order.

    Besides recorder lines, a line may be a bare ``commsNotifications`` body or
    a single notification item. Raises ``CallbotError`` naming the bad line.
    """
    with Path(path).open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CallbotError(f"{path}:{number}: not UTF-8: {exc}") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except RecursionError:
                raise CallbotError(f"{path}:{number}: JSON nested too deeply") from None
            except ValueError as exc:
                raise CallbotError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(record, dict):
                raise CallbotError(f"{path}:{number}: expected a JSON object")
            if isinstance(record.get("value"), list):
                body = {"value": record["value"]}
            elif "changeType" in record:
                body = {"value": [record]}
            else:
                raise CallbotError(f"{path}:{number}: no 'value' list and no notification item")
            body["@odata.type"] = "#microsoft.graph.commsNotifications"
            tenant = record.get("tenant_id")
            yield RecordedBatch(
                line=number,
                at=_timestamp(record.get("at")),
                tenant_id=tenant if isinstance(tenant, str) else None,
                body=body,
            )


def _timestamp(value: Any) -> float | None:
    """When a batch was recorded, or ``None`` (a replay then keeps no pause before it)."""
    stamp: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            stamp = float(value)
        except OverflowError:  # an integer of hundreds of digits
            return None
    elif isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    # NaN or infinity would make the pause before the batch endless.
    return stamp if stamp is not None and math.isfinite(stamp) else None
