"""``callbot simulate`` and ``callbot replay``: signed notifications for a bot running elsewhere.

A bot running elsewhere trusts the simulator once started with the
``CALLBOT_*`` variables printed at start (the signing keys' URL above all).
The simulator listens on fixed ports (8765 for the keys, 8766 for Graph, by
default) and signs with one key kept for those ports in the system's temporary
directory, so a bot configured once keeps working across runs: a new key in
each run would be refused until the bot's key refetch cooldown had passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp

from ._bot import CallBot
from ._config import Settings
from ._display import TrafficPrinter
from ._errors import CallbotError
from ._ids import id_key
from ._parse import path_of
from ._recording import RecordedBatch, read_recording, records_real_calls
from .testing._scenarios import SCENARIOS, ScenarioOptions
from .testing._simulator import Simulator, SimulatorError, Traffic, run_with_simulator

__all__ = ["RemoteBot", "replay", "simulate"]

_CALL_ID = re.compile(r"/calls/([^/?]+)", re.IGNORECASE)
_DEFAULT_PORT = next(f.default for f in dataclasses.fields(Settings) if f.name == "port")


@dataclass(frozen=True, kw_only=True)
class RemoteBot:
    """A bot served elsewhere: its callback URL, its app id, and the simulator's ports."""

    url: str
    app_id: str
    tenant_id: str
    keys_port: int = 8765
    graph_port: int = 8766
    wait: float = 30.0
    """Seconds to wait for the bot to answer on ``/readyz``."""
    application_instance_id: str | None = None
    """The bot's application instance (resource account) calls are made to, when a
    scenario's caller calls it; by default one derived from the app id."""

    @property
    def key_file(self) -> Path | None:
        """Where the signing key for these ports is kept across runs (none for port 0)."""
        if not self.keys_port:
            return None
        # Named for its user too: in a shared temporary directory, others keep their own.
        owner = f"{os.getuid()}-" if hasattr(os, "getuid") else ""
        return Path(tempfile.gettempdir()) / f"callbot-simulator-{owner}{self.keys_port}.pem"


async def _start(sim: Simulator, bot: RemoteBot) -> None:
    """Start the simulator on its fixed ports: one already taken is the user's to change."""
    try:
        await sim.start()
    except OSError as exc:
        raise CallbotError(
            f"the simulator cannot listen: {exc.strerror or exc} (choose free ports with "
            f"--keys-port and --graph-port, now {bot.keys_port} and {bot.graph_port})"
        ) from None


def _show_setup(sim: Simulator, bot: RemoteBot, stream: TextIO) -> None:
    origin = _origin(bot.url)
    environment = sim.bot_environment(public_url=origin)
    port = urlsplit(bot.url).port
    if port is not None and port != _DEFAULT_PORT:
        # A URL naming no port is a proxy's: the bot behind it listens where the proxy says.
        environment["CALLBOT_PORT"] = str(port)
    lines = [
        "callbot simulator: start (or restart) your bot with these settings:",
        "",
        *(f"  export {k}={v}" for k, v in environment.items()),
        "",
        f"(A bot using Graph's beta: CALLBOT_GRAPH_URL={sim.graph.beta_url}, served too.)",
        f"Notifications go to {bot.url}.",
    ]
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def _wait_for_bot(bot: RemoteBot, stream: TextIO) -> bool:
    """Wait for the bot's /readyz; ``True`` once it is ready, or reachable long enough."""
    readyz = _origin(bot.url) + "/readyz"
    # The real clock: the bot is another process, which no loop's simulated time moves.
    deadline = time.monotonic() + bot.wait
    reachable_since: float | None = None
    said = False
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                async with session.get(readyz) as response:
                    if response.status in (200, 404):
                        return True
                    reachable_since = reachable_since or time.monotonic()
            except (aiohttp.ClientError, TimeoutError):
                reachable_since = None
            now = time.monotonic()
            # A bot not ready yet (keys not loaded) fetches them when the first token arrives.
            if reachable_since is not None and now - reachable_since > 3.0:
                return True
            if now > deadline:
                return reachable_since is not None
            if not said:
                stream.write(f"Waiting for the bot at {readyz} ...\n")
                stream.flush()
                said = True
            await asyncio.sleep(0.5)


async def simulate(
    bot: RemoteBot,
    scenario: str,
    *,
    options: ScenarioOptions,
    printer: TrafficPrinter,
    prompt_seconds: float = 1.0,
    info: TextIO | None = None,
) -> int:
    """Play a scenario against a bot served elsewhere; returns the exit status."""
    info = info or sys.stderr
    play = SCENARIOS[scenario]
    sim = Simulator(
        app_id=bot.app_id,
        tenant_id=bot.tenant_id,
        callback_url=bot.url,
        keys_port=bot.keys_port,
        graph_port=bot.graph_port,
        key_file=bot.key_file,
        prompt_duration=prompt_seconds,
        record_duration=prompt_seconds * 2,
        transfer_duration=prompt_seconds / 2,
        step_delay=0.05,
        observers=[printer],
        application_instance_id=bot.application_instance_id,
    )
    await _start(sim, bot)
    try:
        _show_setup(sim, bot, info)
        if not await _wait_for_bot(bot, info):
            info.write(f"callbot: no bot answers at {_origin(bot.url)} (waited {bot.wait} s)\n")
            return 1
        printer.note(f"scenario {scenario}")
        try:
            await play(sim, options)
        except SimulatorError as exc:
            printer.note(f"scenario failed: {exc}")
            return 1
        refused = sim.failed_deliveries
        if refused:
            printer.note(f"scenario failed: the bot refused {len(refused)} notification(s)")
            return 1
        printer.note(f"scenario {scenario} finished")
        return 0
    finally:
        await sim.close()


def _call_id(batch: RecordedBatch) -> str | None:
    for item in batch.body.get("value", []):
        if isinstance(item, dict):
            path = item.get("resourceUrl") or item.get("resource")
            match = _CALL_ID.search(path) if isinstance(path, str) else None
            if match:
                return match.group(1)
    return None


_OPERATION_PATH = re.compile(r"(/calls/[^/?]+/operations/)([^/?]+)$", re.IGNORECASE)


class _Outcomes:
    """Recorded operation outcomes, told under the replayed bot's own operations: its actions
    got new ids (and contexts) from the simulator, so the n-th recorded outcome of a kind on
    a call goes to the n-th such operation the bot started on it."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self._graph = sim.graph
        self._names: dict[str, str] = {}  # recorded id (its key) -> the bot's operation id
        self.unmatched = 0

    async def ready(self, body: dict[str, Any], within: float) -> None:
        """Wait (up to ``within``) until the bot started an operation for each recorded
        outcome in ``body``: the replay may run ahead of the handler that starts it."""
        wanted = [found for found in map(self._outcome, body.get("value") or ()) if found]
        with contextlib.suppress(SimulatorError):  # then told as recorded, and counted
            await self._sim._until(
                lambda: all(self._ours(*found) is not None for found in wanted),
                within,
                lambda: "no operation to tell the outcome of",
            )

    def _outcome(self, item: Any) -> tuple[str, str, Any] | None:
        """(recorded operation id, call id, operation kind) of an operation outcome item."""
        if not isinstance(item, dict):
            return None
        path, data = path_of(item), item.get("resourceData")
        if path is None or not isinstance(data, dict):
            return None
        found, call = _OPERATION_PATH.search(path), _CALL_ID.search(path)
        if found is None or call is None or found.group(2).lower() == "participants":
            return None
        return found.group(2), call.group(1), data.get("@odata.type")

    def rewrite(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with each recorded outcome under the bot's operation (when it has one)."""
        items = body.get("value")
        if not isinstance(items, list):
            return body
        return {**body, "value": [self._item(item) for item in items]}

    def _item(self, item: Any) -> Any:
        found = self._outcome(item)
        if found is None:
            return item
        ours = self._ours(*found)
        if ours is None:
            self.unmatched += 1
            return item
        self._names[id_key(found[0])] = ours

        def moved(path: str) -> str:
            return _OPERATION_PATH.sub(lambda m: m.group(1) + ours, path)

        data = item["resourceData"]
        context = self._graph.operations[ours].get("clientContext")
        rewritten = {**data, "id": ours, "clientContext": context}
        if isinstance(data.get("@odata.id"), str):
            rewritten["@odata.id"] = moved(data["@odata.id"])
        # Either form of the path, or both, as recorded (older Graph wrote ``resource`` only).
        paths = {
            key: moved(item[key])
            for key in ("resourceUrl", "resource")
            if isinstance(item.get(key), str)
        }
        return {**item, **paths, "resourceData": rewritten}

    def _ours(self, recorded: str, call_id: str, kind: Any) -> str | None:
        """The bot's operation a recorded outcome goes to: the one it went to before, else the
        first of its kind the bot started on the call that none went to yet."""
        key = id_key(recorded)
        if key in self._names:
            return self._names[key]
        taken = set(self._names.values())
        for op, started_on in self._graph.operation_calls.items():
            same_kind = self._graph.operations[op].get("@odata.type") == kind
            if op not in taken and same_kind and id_key(started_on) == id_key(call_id):
                return op
        return None


async def _post_all(
    sim: Simulator,
    batches: Sequence[RecordedBatch],
    *,
    speed: float,
    max_gap: float,
    outcomes: _Outcomes | None = None,
    settle: float = 1.0,
) -> int:
    previous: float | None = None
    refused = 0
    for batch in batches:
        if speed > 0 and previous is not None and batch.at is not None:
            # Keep the recorded rhythm (races depend on it), scaled, with long pauses cut.
            await asyncio.sleep(min(max(batch.at - previous, 0.0) / speed, max_gap))
        previous = batch.at if batch.at is not None else previous
        body = batch.body
        if outcomes is not None:
            await outcomes.ready(body, within=settle)
            body = outcomes.rewrite(body)
        status = await sim.post(body, call_id=_call_id(batch), tenant_id=batch.tenant_id)
        if not 200 <= status < 300:
            refused += 1
    return refused


def _unmatched_note(outcomes: _Outcomes) -> str:
    if not outcomes.unmatched:
        return ""
    return (
        f"; {outcomes.unmatched} operation outcome(s) matched no operation the bot started "
        "(its handlers acted otherwise than in the recording)"
    )


async def replay(
    path: str | Path,
    *,
    printer: TrafficPrinter,
    bot: CallBot | None = None,
    remote: RemoteBot | None = None,
    speed: float = 1.0,
    max_gap: float = 5.0,
    settle: float = 1.0,
    info: TextIO | None = None,
    observers: Sequence[Callable[[Traffic], None]] = (),
) -> int:
    """Post a recording's batches to a bot (loaded here, or served elsewhere); exit status.

    ``observers`` see the traffic too (a :class:`~callbot._diagram.SequenceDiagram`). A
    recording with a line that is not a notification, or none at all, raises CallbotError.
    """
    info = info or sys.stderr
    batches = list(read_recording(path))
    if not batches:
        # The wrong file, as a line that is not a notification is (read_recording raises).
        raise CallbotError(f"{path} holds no notifications")
    printer.note(f"replaying {len(batches)} batch(es) from {path}")
    if bot is not None:
        watchers = [printer, *observers]
        recording = bot.settings.record_path
        if records_real_calls(recording):
            bot.configure(record_path=None)
        try:
            async with run_with_simulator(bot, drive=False, observers=watchers) as sim:
                outcomes = _Outcomes(sim)
                refused = await _post_all(
                    sim, batches, speed=speed, max_gap=max_gap, outcomes=outcomes, settle=settle
                )
                # The bot's handlers act on the last notifications before it stops (at most
                # ``settle`` seconds: a handler waiting for what the recording never sends).
                with contextlib.suppress(SimulatorError):
                    await sim._until(
                        lambda: not bot._running().dispatcher.queued, settle, lambda: "busy"
                    )
                counts = bot.metrics.sources.handled() if bot.metrics.sources.handled else None
                errors = int(counts["handler_errors"]) if counts is not None else 0
        finally:
            if recording != bot.settings.record_path:
                bot.configure(record_path=recording)
        printer.note(
            f"replay finished: {len(batches) - refused} accepted, {refused} refused, "
            f"{errors} handler error(s){_unmatched_note(outcomes)}"
        )
        return 0 if not refused and not errors else 1
    if remote is None:
        raise ValueError("replay needs a bot or a remote bot")
    sim = Simulator(
        app_id=remote.app_id,
        tenant_id=remote.tenant_id,
        callback_url=remote.url,
        keys_port=remote.keys_port,
        graph_port=remote.graph_port,
        key_file=remote.key_file,
        drive=False,
        observers=[printer, *observers],
    )
    await _start(sim, remote)
    try:
        _show_setup(sim, remote, info)
        if not await _wait_for_bot(remote, info):
            info.write(f"callbot: no bot answers at {_origin(remote.url)}\n")
            return 1
        outcomes = _Outcomes(sim)
        refused = await _post_all(
            sim, batches, speed=speed, max_gap=max_gap, outcomes=outcomes, settle=settle
        )
        await asyncio.sleep(settle)
    finally:
        await sim.close()
    printer.note(
        f"replay finished: {len(batches) - refused} accepted, {refused} refused"
        f"{_unmatched_note(outcomes)}"
    )
    return 0 if not refused else 1
