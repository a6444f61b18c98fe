"""Fuzzing the callback endpoint with random and mutated bodies, through a real server.

The corpus is Microsoft's documented notifications (tests/fixtures/notifications).
Each request carries a valid token, so the bodies reach the parser, the
sequencer and the handlers. Whatever the body: never a 5xx, never an error
logged by callbot itself, memory bounded, every accepted item either handled
or dropped with a counted reason, and the bot still serves a real
notification afterwards. The seed and the count can be changed for a longer
run: ``CALLBOT_FUZZ_SEED=7 CALLBOT_FUZZ_COUNT=20000 pytest tests/test_robustness_fuzz.py``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import re
import tracemalloc
from collections.abc import Callable
from typing import Any

from structlog.testing import capture_logs

from callbot import Call, events
from callbot.testing import builders as b

from .conftest import FIXTURES, BotServer, make_bot, until

SEED = int(os.environ.get("CALLBOT_FUZZ_SEED", "20240611"))
COUNT = int(os.environ.get("CALLBOT_FUZZ_COUNT", "500"))
MAX_BODY = 64_000
# Python allocations of the test process (server and client alike) while one request is
# answered, beyond what was allocated before it: a hostile body must not blow up.
SPIKE_BOUND = 8 * 1024 * 1024
# What may stay allocated per request: the calls opened, the log lines captured.
GROWTH_PER_REQUEST = 16 * 1024
ALLOWED = {202, 400, 403, 413, 415}  # 403: a mutated tenantId no longer matches the token

CORPUS = [p.read_bytes() for p in sorted((FIXTURES / "notifications").glob("*.json"))]


def _strict_corpus() -> list[Any]:
    out: list[Any] = []
    for raw in CORPUS:
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out


STRICT = _strict_corpus()

ODD_PATHS = [
    "/communications/calls/",
    "/communications/calls/a/../../users/x",
    "https://evil.example/communications/calls/abc",
    "/communications/calls/" + "x" * 3000,
    "/communications/calls/%00/participants",
    "/communications/calls/a/participants/b/c/d",
    "/app/calls/a/operations/",
    "/beta/communications/calls/a/contentsharingsessions/1",
    "/communications/calls/a?x=/communications/calls/b",
    "//communications//calls//a",
    "/communications/calls/\u202e\u0000",
]


def _random_scalar(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            2**70,
            1.5e308,
            -0.0,
            "",
            "x" * rng.choice((1, 100, 5000)),
            "\u0000\ud7ff\ue000\U0010ffff",
            "established",
            "terminated",
            "incoming",
            "#microsoft.graph.participant",
            rng.choice(ODD_PATHS),
        ]
    )


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.4:
        return _random_scalar(rng)
    if roll < 0.7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = [
        "value",
        "changeType",
        "resourceUrl",
        "resource",
        "resourceData",
        "state",
        "@odata.type",
    ]
    return {
        rng.choice([*keys, "k" + str(rng.randint(0, 9))]): _random_json(rng, depth + 1)
        for _ in range(rng.randint(0, 5))
    }


def _nested(depth: int) -> Any:
    node: Any = []
    for _ in range(depth):
        node = [node]
    return node


def _walk(node: Any, rng: random.Random) -> tuple[Any, Any] | None:
    """A random (container, key) inside ``node``."""
    path: list[tuple[Any, Any]] = []
    current = node
    while isinstance(current, dict | list) and current:
        key = (
            rng.choice(list(current)) if isinstance(current, dict) else rng.randrange(len(current))
        )
        path.append((current, key))
        current = current[key]
        if rng.random() < 0.3:
            break
    return rng.choice(path) if path else None


def _mutate_structure(rng: random.Random) -> bytes:
    body = copy.deepcopy(rng.choice(STRICT))
    # A fresh call id per body, so the sequencer opens calls instead of dropping repeats.
    text = re.sub(r"calls/([^/\"]+)", f"calls/fz{rng.randrange(10**9)}", json.dumps(body))
    body = json.loads(text)
    for _ in range(rng.randint(1, 4)):
        spot = _walk(body, rng)
        if spot is None:
            break
        container, key = spot
        action = rng.random()
        if action < 0.35:
            container[key] = _random_json(rng)
        elif action < 0.5 and isinstance(container, dict):
            del container[key]
        elif action < 0.6:
            container[key] = _nested(rng.choice((10, 70, 300)))
        elif action < 0.7:
            container[key] = [copy.deepcopy(container[key])] * rng.choice((2, 50))
        elif action < 0.85 and isinstance(container, dict):
            container[rng.choice(["resourceUrl", "resource"])] = rng.choice(ODD_PATHS)
        else:
            container[key] = _random_scalar(rng)
    return json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()


def _mutate_bytes(rng: random.Random) -> bytes:
    data = bytearray(rng.choice(CORPUS))
    for _ in range(rng.randint(1, 8)):
        if not data:
            break
        spot = rng.randrange(len(data))
        action = rng.random()
        if action < 0.3:
            data[spot] = rng.randrange(256)
        elif action < 0.5:
            del data[spot : spot + rng.randint(1, 40)]
        elif action < 0.7:
            data[spot:spot] = data[spot : spot + rng.randint(1, 200)]
        elif action < 0.85:
            data[spot:spot] = rng.choice([b"\xff", b"\\u", b'"', b"{", b"]", b"\x00", b"NaN"])
        else:
            del data[spot:]
    return bytes(data)


def _random_body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.5:
        return json.dumps({"value": [_random_json(rng) for _ in range(rng.randint(0, 3))]}).encode()
    if roll < 0.8:
        return json.dumps(_random_json(rng)).encode()
    return rng.randbytes(rng.randint(0, 300))


GENERATORS: list[tuple[float, Callable[[random.Random], bytes]]] = [
    (0.5, _mutate_structure),
    (0.3, _mutate_bytes),
    (0.2, _random_body),
]

CONTENT_TYPES = [
    "application/json",
    "application/json",
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
]


def _body(rng: random.Random) -> bytes:
    roll = rng.random()
    for weight, generate in GENERATORS:
        if roll < weight:
            return generate(rng)
        roll -= weight
    return GENERATORS[-1][1](rng)


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


async def test_random_and_mutated_bodies_never_break_the_endpoint(
    authority: Any, serve: Any
) -> None:
    bot = make_bot(authority, max_body_bytes=MAX_BODY, reorder_window=0.05)
    handled: list[str] = []

    @bot.on(events.Event)
    async def inspect(call: Call, event: events.Event) -> None:
        # Handlers may read anything of an event: it must hold together.
        event.model_dump(mode="json")
        handled.append(event.call_key)

    server: BotServer = await serve(bot)
    rng = random.Random(SEED)
    token = server.token(expires_in=3600)
    statuses: dict[int, int] = {}
    spike = 0
    tracemalloc.start()
    try:
        with capture_logs() as logs:
            baseline = tracemalloc.get_traced_memory()[0]
            for _ in range(COUNT):
                headers = {
                    "Authorization": f"Bearer {token}",
                    "Content-Type": rng.choice(CONTENT_TYPES),
                }
                body = io.BytesIO(_body(rng))
                before = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                # A file-like body: aiohttp warns about large raw bytes on the client side.
                response = await server.client.post(
                    bot.settings.callback_path, data=body, headers=headers
                )
                await response.read()
                spike = max(spike, tracemalloc.get_traced_memory()[1] - before)
                statuses[response.status] = statuses.get(response.status, 0) + 1
                assert response.status in ALLOWED, (response.status, await response.text())
            growth = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert spike < SPIKE_BOUND, spike
    assert growth < COUNT * GROWTH_PER_REQUEST, growth
    # Both ways through the receiver were taken often enough to mean something.
    assert statuses.get(202, 0) > COUNT // 10, statuses
    assert statuses.get(400, 0) > COUNT // 10, statuses
    errors = [e for e in logs if e.get("log_level") in ("error", "critical")]
    assert errors == []

    # Still serving, and still handling a real notification.
    real = b.incoming_call("after-fuzz")
    assert (await server.post(b.notifications(real))).status == 202
    await until(lambda: "afterfuzz" in handled)
    assert (await server.client.get("/readyz")).status == 200

    # Every accepted item was handled or dropped with a reason, once held ones are out.
    await bot.drain()
    text = await (await server.client.get("/metrics")).text()
    accepted = _metric(text, "callbot_notifications_total", outcome="accepted", reason="")
    dropped = sum(
        _metric(text, "callbot_notifications_total", outcome="dropped", reason=reason)
        for reason in ("duplicate", "stale", "after_end")
    )
    assert accepted == len(handled) + dropped
