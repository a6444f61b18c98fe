"""Acting on calls end to end: notifications in through the receiver, requests out to Graph."""

from __future__ import annotations

import asyncio
from typing import Any

from callbot import Call, CallBot, OperationFailed, Target, events, models
from callbot.testing import FakeGraph, FakeResponse, RecordedRequest, TokenAuthority
from callbot.testing import builders as b

from .conftest import BotServer, until


def graph_bot(graph: FakeGraph, authority: TokenAuthority, **options: Any) -> CallBot:
    settings = graph.settings(openid_config_url=authority.openid_config_url, **options)
    return CallBot(settings)


def operation_id(graph: FakeGraph, request: Any) -> str:
    body = graph.answer_to(request).body
    assert isinstance(body, dict)
    return str(body["id"])


async def test_a_handler_awaits_its_own_prompt_then_hangs_up(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority)
    outcomes: list[Any] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def greet(call: Call, event: events.CallStateChanged) -> None:
        prompt = await call.play_prompt("https://cdn.example.test/welcome.wav")
        outcomes.append(await prompt.wait(timeout=10))
        await call.hangup()

    seen_operations: list[str] = []

    @bot.on_operation
    async def operation(call: Call, event: events.OperationUpdated) -> None:
        seen_operations.append(event.status)

    server: BotServer = await serve(bot)
    graph.add_call("call-1")
    await server.post(b.notifications(b.incoming_call("call-1")))
    answer_request = await graph.wait_for_request("answer")
    assert answer_request.json["callbackUri"] == "https://bot.example.test/api/calls"
    await server.post(b.notifications(b.call_state("call-1", "establishing")))
    await server.post(b.notifications(b.call_state("call-1", "established")))
    prompt_request = await graph.wait_for_request("playPrompt")
    # The completion arrives while the handler that started the prompt is still running.
    await server.post(graph.operation_notification(operation_id(graph, prompt_request)))
    await graph.wait_for_request("deleteCall")
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], models.PlayPromptOperation)
    assert outcomes[0].status == "completed"
    # The operation notification is also dispatched, after the running handler finished.
    await until(lambda: seen_operations == ["completed"])


async def test_the_same_across_100_concurrent_calls(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority, max_concurrent_handlers=128)
    hung_up: list[str] = []

    @bot.on_state("established")
    async def greet(call: Call, event: events.CallStateChanged) -> None:
        prompt = await call.play_prompt("https://cdn.example.test/welcome.wav")
        await prompt.wait(timeout=20)
        await call.hangup()
        hung_up.append(call.id)

    server: BotServer = await serve(bot)
    calls = [f"c{i:03d}" for i in range(100)]
    for call_id in calls:
        graph.add_call(call_id)

    async def drive(call_id: str) -> None:
        await server.post(b.notifications(b.call_state(call_id, "establishing")))
        await server.post(b.notifications(b.call_state(call_id, "established")))

    await asyncio.gather(*(drive(c) for c in calls))
    prompts = [await graph.wait_for_request("playPrompt", timeout=20) for _ in calls]
    await asyncio.gather(
        *(server.post(graph.operation_notification(operation_id(graph, r))) for r in prompts)
    )
    await until(lambda: len(hung_up) == len(calls), within=20)
    assert sorted(hung_up) == calls
    assert len(graph.requests_for("deleteCall")) == len(calls)


async def test_a_failed_operation_raises_with_its_result_info(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority)
    failures: list[OperationFailed] = []

    @bot.on_state("established")
    async def record(call: Call, event: events.CallStateChanged) -> None:
        op = await call.record_response(max_record_duration=10)
        try:
            await op.wait(timeout=10)
        except OperationFailed as exc:
            failures.append(exc)

    server: BotServer = await serve(bot)
    graph.add_call("rec")
    await server.post(b.notifications(b.call_state("rec", "establishing")))
    await server.post(b.notifications(b.call_state("rec", "established")))
    request = await graph.wait_for_request("recordResponse")
    failed = graph.operation_notification(
        operation_id(graph, request),
        status="failed",
        result_info={"code": 400, "subcode": 8508, "message": "Action failed, the lock is held."},
    )
    await server.post(failed)
    await until(lambda: len(failures) == 1)
    assert failures[0].result_info is not None
    assert failures[0].result_info.subcode == 8508


async def test_the_call_ending_fails_a_pending_wait(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority)
    failures: list[OperationFailed] = []

    @bot.on_state("established")
    async def play(call: Call, event: events.CallStateChanged) -> None:
        op = await call.play_prompt("https://cdn.example.test/long.wav")
        try:
            await op.wait(timeout=10)
        except OperationFailed as exc:
            failures.append(exc)

    server: BotServer = await serve(bot)
    graph.add_call("gone")
    await server.post(b.notifications(b.call_state("gone", "establishing")))
    await server.post(b.notifications(b.call_state("gone", "established")))
    await graph.wait_for_request("playPrompt")
    await server.post(b.notifications(b.call_terminated("gone", code=0, subcode=5001)))
    await until(lambda: len(failures) == 1)
    assert failures[0].result_info is not None
    assert failures[0].result_info.subcode == 5001


async def test_a_created_call_reaches_the_handlers_like_any_other(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    from callbot.graph import Target

    bot = graph_bot(graph, authority)
    states: list[tuple[str, str]] = []

    @bot.on_state("establishing", "established")
    async def state(call: Call, event: events.CallStateChanged) -> None:
        states.append((call.id, event.state))

    server: BotServer = await serve(bot)
    call = await bot.create_call(Target.user("8d1e6ab6-26c5-4e22-a1bc-06ea7343958e"))
    request = await graph.wait_for_request("createCall")
    assert request.json["callbackUri"] == "https://bot.example.test/api/calls"
    assert request.json["targets"][0]["identity"]["user"]["id"].startswith("8d1e6ab6")
    await server.post(b.notifications(b.call_state(call.id, "establishing")))
    await server.post(b.notifications(b.call_state(call.id, "established")))
    await until(lambda: len(states) == 2)
    assert states == [(call.id, "establishing"), (call.id, "established")]
    assert bot.services.call(call.id.upper()) == call


async def test_graph_requests_and_retries_are_counted_in_metrics(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority)
    answered: list[str] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()
        answered.append(call.id)

    server: BotServer = await serve(bot)
    graph.add_call("m")
    graph.fail_next("answer", 429, headers={"Retry-After": "0"})
    await server.post(b.notifications(b.incoming_call("m")))
    await until(lambda: answered == ["m"])
    text = await (await server.client.get("/metrics")).text()
    assert 'callbot_graph_requests_total{method="POST",status="429"} 1.0' in text
    assert 'callbot_graph_requests_total{method="POST",status="202"} 1.0' in text
    assert "callbot_graph_retries_total 1.0" in text


async def test_outcomes_refused_while_draining_still_resolve_running_handlers(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority, shutdown_timeout=10.0)
    finished: list[str] = []

    @bot.on_state("established")
    async def play(call: Call, event: events.CallStateChanged) -> None:
        prompt = await call.play_prompt("https://cdn.example.test/welcome.wav")
        await prompt.wait(timeout=10)
        finished.append(call.id)

    server: BotServer = await serve(bot)
    graph.add_call("d")
    await server.post(b.notifications(b.call_state("d", "establishing")))
    await server.post(b.notifications(b.call_state("d", "established")))
    request = await graph.wait_for_request("playPrompt")
    draining = asyncio.create_task(bot.drain())
    await until(lambda: not bot.ready)
    refused = await server.post(graph.operation_notification(operation_id(graph, request)))
    assert refused.status == 503
    await draining
    assert finished == ["d"]


async def test_a_call_established_while_draining_still_resolves_a_running_handler(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """A handler that placed a call waits for it to be established; the bot starts
    draining, and the callee picks up: the ``established`` refused meanwhile (503) still
    tells the waiting handler, as an outcome refused then does, and as any instance of a
    shared store is told."""
    bot = graph_bot(graph, authority, shutdown_timeout=10.0)
    placed: list[str] = []
    finished: list[str] = []

    @bot.on_incoming_call
    async def call_an_agent(call: Call, event: events.IncomingCall) -> None:
        await call.answer()
        agent = await bot.create_call(Target.user("8d1e6ab6-26c5-4e22-a1bc-06ea7343958e"))
        placed.append(agent.id)
        await agent.wait_until_established(timeout=10)
        finished.append(agent.id)

    server: BotServer = await serve(bot)
    graph.add_call("caller")
    await server.post(b.notifications(b.incoming_call("caller")))
    await until(lambda: bool(placed))
    draining = asyncio.create_task(bot.drain())
    await until(lambda: not bot.ready)
    for state in ("establishing", "established"):
        refused = await server.post(b.notifications(b.call_state(placed[0], state)))
        assert refused.status == 503
    await draining
    assert finished == placed


async def test_a_call_graph_has_forgotten_is_let_go_when_its_keep_alive_gets_404(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority, keep_alive=True, keep_alive_interval=1.0)
    server: BotServer = await serve(bot)
    graph.add_call("lost")
    await server.post(b.notifications(b.call_state("lost", "establishing")))
    await server.post(b.notifications(b.call_state("lost", "established")))
    await graph.wait_for_request("keepAlive")
    assert [c.id for c in bot.active_calls()] == ["lost"]
    graph.end_call("lost")  # its termination never reaches the bot
    await until(lambda: bot.active_calls() == [])


async def test_the_handle_create_call_returns_sees_its_call_end(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """``call.ended`` is live on every handle: also on the one ``create_call`` returned,
    which a bot keeps to act on the call from outside its handlers."""
    bot = graph_bot(graph, authority)
    ended: list[str] = []

    @bot.on_state("terminated")
    async def done(call: Call, event: events.CallStateChanged) -> None:
        ended.append(call.id)

    server = await serve(bot)
    call = await bot.create_call(Target.user("8d1e6ab6-26c5-4e22-a1bc-06ea7343958e"))
    for item in (
        b.call_state(call.id, "establishing"),
        b.call_state(call.id, "established"),
        b.call_terminated(call.id, code=0, subcode=5001),
    ):
        assert (await server.post(b.notifications(item))).status == 202
    await until(lambda: ended == [call.id])
    assert call.ended


async def test_a_transfer_failing_again_by_an_update_alone_is_heard_again(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """Graph may tell a failed transfer by an update alone: ``established`` again with a
    ``resultInfo`` (no ``transferring`` first). A bot trying a second target then gets the
    very same notification when that fails too: it was dropped as a repeat of the first,
    and the bot never heard its second transfer fail. A copy with no transfer asked in
    between is still a repeat."""
    bot = graph_bot(graph, authority)
    failures: list[int] = []
    targets = [Target.user("agent-id", "Agent"), Target.phone("+14255550100")]

    @bot.on_call_updated
    async def failed(call: Call, event: events.CallUpdated) -> None:
        if event.result_info is None:
            return
        failures.append(event.result_info.subcode or 0)
        if len(failures) < len(targets):
            await call.transfer(targets[len(failures)])

    @bot.on_terminated
    async def over(call: Call, event: events.CallTerminated) -> None:
        failures.append(-1)

    server: BotServer = await serve(bot)
    graph.add_call("xfer-call")
    for state in ("establishing", "established"):
        assert (await server.post(b.notifications(b.call_state("xfer-call", state)))).status == 202
    why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
    failure = b.call_state("xfer-call", "established", result_info=why)
    await bot.services.call("xfer-call").transfer(targets[0])
    assert (await server.post(b.notifications(failure))).status == 202
    await until(lambda: failures == [7000])
    await until(lambda: len(graph.requests_for("transfer")) == 2)
    assert (await server.post(b.notifications(failure))).status == 202  # the second fails
    await until(lambda: failures == [7000, 7000])
    assert (await server.post(b.notifications(failure))).status == 202  # Graph sent it twice
    ended = b.call_terminated("xfer-call")
    assert (await server.post(b.notifications(ended))).status == 202
    await until(lambda: failures[-1:] == [-1])  # the end comes after the copy, in order
    assert failures == [7000, 7000, -1]


async def test_a_transfer_failure_posted_before_the_transfer_is_answered_is_heard_once(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """Graph may post a transfer's failure before it answers the transfer request. The
    transfer was counted only once answered: its failure, worded as the one before, was then
    dropped as a repeat of it, and a copy Graph sent again of the first failure was heard as
    a second one."""
    bot = graph_bot(graph, authority)
    heard: list[str] = []

    @bot.on_call_updated
    async def failed(call: Call, event: events.CallUpdated) -> None:
        if event.result_info is not None:
            heard.append(f"failed {event.result_info.subcode}")

    @bot.on_tone
    async def pressed(call: Call, event: events.ToneReceived) -> None:
        heard.append(event.tone)

    @bot.on_terminated
    async def over(call: Call, event: events.CallTerminated) -> None:
        heard.append("ended")

    server: BotServer = await serve(bot)
    graph.add_call("xfer-call")
    for state in ("establishing", "established"):
        assert (await server.post(b.notifications(b.call_state("xfer-call", state)))).status == 202
    why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
    failure = b.notifications(b.call_state("xfer-call", "established", result_info=why))

    async def fails_before_answering(request: RecordedRequest) -> FakeResponse:
        assert (await server.post(failure)).status == 202
        return FakeResponse(status=202)

    graph.route("transfer", fails_before_answering)
    call = bot.services.call("xfer-call")
    await call.transfer(Target.user("agent-id", "Agent"))
    await until(lambda: heard == ["failed 7000"])
    assert (await server.post(failure)).status == 202  # Graph sent the first failure twice
    tone = b.notifications(b.tone("xfer-call", "tone1", 1))
    assert (await server.post(tone)).status == 202  # handled after the copy, in order
    await until(lambda: heard[-1:] == ["tone1"])
    await call.transfer(Target.phone("+14255550100"))  # it fails as the first did
    ended = b.call_terminated("xfer-call")
    assert (await server.post(b.notifications(ended))).status == 202
    await until(lambda: heard[-1:] == ["ended"])
    assert heard == ["failed 7000", "tone1", "failed 7000", "ended"]


async def test_a_prompt_failing_with_the_call_s_end_in_one_request_is_no_handler_error(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """The caller hangs up during a prompt: Graph may tell the prompt's failure and the
    call's end in one request, the failure first. The handler awaiting the prompt got an
    OperationFailed that did not say the call had ended, and it counted as a handler error
    (``handler_failed`` logged at error level) though the call had ended by the time it
    reached the dispatcher. It counts as stopped by the call's end, as when the end comes
    first."""
    bot = graph_bot(graph, authority)
    failures: list[OperationFailed] = []

    @bot.on_state("established")
    async def greet(call: Call, event: events.CallStateChanged) -> None:
        prompt = await call.play_prompt("https://cdn.example.test/welcome.wav")
        try:
            await prompt.wait(timeout=10)
        except OperationFailed as exc:
            failures.append(exc)
            raise

    server: BotServer = await serve(bot)
    graph.add_call("hang-up")
    await server.post(b.notifications(b.call_state("hang-up", "establishing")))
    await server.post(b.notifications(b.call_state("hang-up", "established")))
    prompt_request = await graph.wait_for_request("playPrompt")
    failed = b.operation_update(
        "hang-up", operation_id(graph, prompt_request), status="failed", code=500, subcode=8508
    )
    ended = b.call_terminated("hang-up")
    assert (await server.post(b.notifications(failed, ended))).status == 202
    handled = bot.metrics.sources.handled
    assert handled is not None
    await until(lambda: handled()["call_ended"] == 1)
    assert [exc.call_ended for exc in failures] == [False]  # the failure came first
    assert handled()["handler_errors"] == 0


async def test_a_call_ending_while_its_tones_are_asked_for_leaves_no_subscription(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """The call's end, told while ``subscribeToTone`` waits for its answer, forgets the call's
    subscription: the answer coming after it marked the call subscribed again, for the life
    of the process (and a tone told later was kept for it)."""
    bot = graph_bot(graph, authority)
    server: BotServer = await serve(bot)
    graph.add_call("tone-call")
    for state in ("establishing", "established"):
        assert (await server.post(b.notifications(b.call_state("tone-call", state)))).status == 202
    call = bot.services.call("tone-call")
    tones = bot.services.tones

    async def ends_before_answering(request: RecordedRequest) -> FakeResponse:
        ended = b.notifications(b.call_terminated("tone-call"))
        assert (await server.post(ended)).status == 202
        await until(lambda: call.ended)
        body = {"@odata.type": "#microsoft.graph.subscribeToToneOperation", "id": "op-tones"}
        return FakeResponse(status=200, body={**body, "status": "completed"})

    graph.route("subscribeToTone", ends_before_answering)
    await call.subscribe_to_tone()
    assert call.key not in tones._subscribed
