"""What a bot author reaches for first: plain ids, digits, names, and a call that has ended."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import callbot
from callbot import Call, CallEnded, GraphError, Target, events, models
from callbot._lifecycle import CallLife
from callbot.graph import CallServices, RetryPolicy
from callbot.testing import FakeGraph, FakeResponse

CALL_ID = "57dab8b1-894c-409a-b240-bd8beae78896"
USER_ID = "6e0b8a2d-5e8c-4a4f-9d1b-1f2e3d4c5b6a"


@pytest.fixture
async def services(graph: FakeGraph) -> AsyncIterator[CallServices]:
    graph.add_call(CALL_ID, state="established")  # the call the tests act on, offered
    settings = graph.settings(public_url="https://bot.contoso.com")
    svc = CallServices(settings, retry=RetryPolicy(total_time=1.0, base_delay=0.01))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


def test_target_is_importable_from_the_package() -> None:
    assert callbot.Target is Target


async def test_transfer_to_a_plain_user_id(graph: FakeGraph, services: CallServices) -> None:
    await services.call(CALL_ID).transfer(USER_ID)
    body = (await graph.wait_for_request("transfer")).json
    assert body["transferTarget"] == Target.user(USER_ID).invitation_json()


@pytest.mark.parametrize(
    ("given", "hint"),
    [
        ("+14255550100", "Target.phone"),
        ("1 425 555 0100", "Target.phone"),
        ("(425) 555-0100", "Target.phone"),
        ("alice@contoso.com", "object id"),
    ],
)
async def test_a_plain_string_that_is_no_user_id_is_refused_before_graph(
    graph: FakeGraph, services: CallServices, given: str, hint: str
) -> None:
    """Graph would look a number or a sign-in name up as a user's id: nobody would ring."""
    call = services.call(CALL_ID)
    for action in (call.transfer(given), call.redirect(given), call.participants.invite(given)):
        with pytest.raises(ValueError, match=hint):
            await action
    assert [r.action for r in graph.requests if r.action != "token"] == []


@pytest.mark.parametrize(
    ("given", "hint"),
    [
        ("+1 425 555 0100", "Target.phone('+14255550100')"),
        ("+1 (425) 555-0100", "Target.phone('+14255550100')"),
        ("(425) 555-0100", "in E.164 form: '+' and the country code first"),
    ],
)
async def test_the_hint_for_a_plain_phone_number_is_a_number_graph_takes(
    services: CallServices, given: str, hint: str
) -> None:
    """Graph takes a number in E.164 form: a plus, the country code, the digits."""
    with pytest.raises(ValueError, match=re.escape(hint)):
        await services.call(CALL_ID).transfer(given)


LISTED_TARGETS: dict[str, Callable[[CallServices], Awaitable[Any]]] = {
    "create_call": lambda s: s.create_call([Target.user(USER_ID)]),  # type: ignore[arg-type]
    "redirect": lambda s: s.call(CALL_ID).redirect([USER_ID]),  # type: ignore[arg-type]
    "invite": lambda s: s.call(CALL_ID).participants.invite([USER_ID]),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("action", sorted(LISTED_TARGETS))
async def test_targets_given_as_a_list_are_refused_with_the_way_to_give_them(
    graph: FakeGraph, services: CallServices, action: str
) -> None:
    """Targets go one by one (``create_call(a, b)``): a list of them was read as a dict,
    and refused with "dictionary update sequence element #0 has length 36"."""
    with pytest.raises(
        TypeError, match=r"targets are given one by one: \(a, b\), not \(\[a, b\]\)"
    ):
        await LISTED_TARGETS[action](services)
    with pytest.raises(TypeError, match=r"a target is a Target, a user's id, a model or a dict"):
        await services.call(CALL_ID).transfer(42)  # type: ignore[arg-type]
    assert [r.action for r in graph.requests if r.action != "token"] == []


def test_a_phone_number_written_with_separators_is_sent_as_its_digits() -> None:
    assert Target.phone("+1 (425) 555-0100").id == "+14255550100"
    assert Target.phone("+44 20.7946.0958").id == "+442079460958"
    assert Target.phone("+14255550100").id == "+14255550100"


async def test_an_object_id_of_digits_only_is_still_a_user(
    graph: FakeGraph, services: CallServices
) -> None:
    digits_only = "11111111-2222-3333-4444-555555555555"
    await services.call(CALL_ID).transfer(digits_only)
    body = (await graph.wait_for_request("transfer")).json
    assert body["transferTarget"]["identity"]["user"]["id"] == digits_only


async def test_redirect_and_invite_take_plain_user_ids_too(
    graph: FakeGraph, services: CallServices
) -> None:
    call = services.call(CALL_ID)
    await call.redirect(USER_ID)
    redirect = (await graph.wait_for_request("redirect")).json
    assert redirect["targets"][0]["identity"]["user"]["id"] == USER_ID
    await call.participants.invite(USER_ID)
    invite = (await graph.wait_for_request("invite")).json
    assert invite["participants"][0]["identity"]["user"]["id"] == USER_ID


async def test_an_action_on_a_call_graph_no_longer_knows_raises_call_ended(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.fail_next("playPrompt", 404)
    with pytest.raises(CallEnded) as raised:
        await services.call(CALL_ID).play_prompt("https://contoso.example/a.wav")
    assert isinstance(raised.value, GraphError)
    assert raised.value.status == 404


GONE = "2765eb15-01f8-47c6-b12b-c32111a4a86f"
ITEM_ACTIONS: dict[str, Callable[[Call], Awaitable[Any]]] = {
    "participants.get": lambda call: call.participants.get(GONE),
    "participants.remove": lambda call: call.participants.remove(GONE),
    "participants.mute": lambda call: call.participants.mute(GONE),
    "participants.start_hold_music": lambda call: call.participants.start_hold_music(GONE),
    "participants.stop_hold_music": lambda call: call.participants.stop_hold_music(GONE),
    "get_operation": lambda call: call.get_operation(GONE),
    "audio_routing_groups.get": lambda call: call.audio_routing_groups.get(GONE),
    "audio_routing_groups.update": lambda call: call.audio_routing_groups.update(GONE),
    "audio_routing_groups.delete": lambda call: call.audio_routing_groups.delete(GONE),
}


@pytest.mark.parametrize("action", sorted(ITEM_ACTIONS))
async def test_a_404_about_one_item_of_a_call_still_going_is_not_call_ended(
    graph: FakeGraph, services: CallServices, action: str
) -> None:
    """Removing a participant who has just left: Graph answers 404 for the participant,
    and the call goes on (a handler letting CallEnded escape would stop quietly)."""
    graph.add_call(CALL_ID, state="established")
    for fake_knows_no_participant in ("muteParticipant", "startHoldMusic", "stopHoldMusic"):
        graph.fail_next(fake_knows_no_participant, 404)
    call = services.call(CALL_ID)
    with pytest.raises(GraphError) as raised:
        await ITEM_ACTIONS[action](call)
    assert raised.value.status == 404
    assert not isinstance(raised.value, CallEnded)
    assert (await call.refresh()).state == "established"


async def test_a_404_about_one_item_of_a_call_that_ended_is_call_ended(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.add_call(CALL_ID, state="established")
    call = services.call(CALL_ID, life=CallLife(CALL_ID, ended=True))
    with pytest.raises(CallEnded):
        await call.participants.remove(GONE)


@pytest.mark.parametrize("action", sorted(ITEM_ACTIONS))
async def test_a_404_saying_the_call_is_not_found_is_call_ended_before_the_end_is_told(
    graph: FakeGraph, services: CallServices, action: str
) -> None:
    """The caller hangs up as the bot takes them off hold music: Graph answers the request
    about the participant with its code for a call it does not have (8522, ``Call not
    found.``) before its notification of the end has reached the bot. The call the bot is
    in has ended, so CallEnded, which a handler may let escape."""
    graph.add_call(CALL_ID, state="established")
    graph.end_call(CALL_ID)
    call = services.call(CALL_ID, life=CallLife(CALL_ID))
    assert not call.ended
    with pytest.raises(CallEnded) as raised:
        await ITEM_ACTIONS[action](call)
    assert (raised.value.status, raised.value.code) == (404, "8522")


NEVER_OFFERED = "0c5e3f1a-7b2d-4e8f-9a6c-1d2e3f4a5b6c"
CALL_ACTIONS: dict[str, Callable[[Call], Awaitable[Any]]] = {
    "answer": lambda call: call.answer(),
    "play_prompt": lambda call: call.play_prompt("https://contoso.example/a.wav"),
    "subscribe_to_tone": lambda call: call.subscribe_to_tone(),
    "transfer": lambda call: call.transfer(Target.user(USER_ID)),
    "mute": lambda call: call.mute(),
    "keep_alive": lambda call: call.keep_alive(),
    "refresh": lambda call: call.refresh(),
    "participants.list": lambda call: call.participants.list(),
    "participants.invite": lambda call: call.participants.invite(Target.user(USER_ID)),
    "audio_routing_groups.list": lambda call: call.audio_routing_groups.list(),
}


@pytest.mark.parametrize("action", sorted(CALL_ACTIONS))
@pytest.mark.parametrize("gone", ["never offered", "ended"])
async def test_fake_graph_answers_about_a_call_it_does_not_have_as_graph_does(
    graph: FakeGraph, services: CallServices, action: str, gone: str
) -> None:
    """FakeGraph took a call it was never offered as known on first use and answered 2xx
    (and an ended one with a body of its own): a bot's test of acting on a call that is
    gone passed where Graph answers 404 ``Call not found.`` and callbot raises CallEnded."""
    call_id = NEVER_OFFERED
    if gone == "ended":
        call_id = graph.add_call(state="established").id
        await services.call(call_id).hangup()
    with pytest.raises(CallEnded) as raised:
        await CALL_ACTIONS[action](services.call(call_id))
    error = raised.value
    assert (error.status, error.code, error.message) == (404, "8522", "Call not found.")
    inner = error.body["error"]["innerError"]
    assert inner["client-request-id"] == error.client_request_id
    assert {"date", "request-id"} <= inner.keys()
    assert graph.calls.get(NEVER_OFFERED.replace("-", "")) is None, "nothing became known"


@pytest.mark.parametrize("gone", ["never offered", "ended"])
async def test_hanging_up_a_call_graph_no_longer_has_is_done(
    graph: FakeGraph, services: CallServices, gone: str
) -> None:
    """The caller hangs up as the bot does (the last person leaves a meeting as it ends):
    Graph answers the bot's ``DELETE`` 404 ``Call not found.``. hangup() raised CallEnded,
    which a handler with more to do after hanging up caught by hand; the bot is out of the
    call, as it asked. Any other error is still raised."""
    call_id = NEVER_OFFERED
    if gone == "ended":
        call_id = graph.add_call(state="established").id
        graph.end_call(call_id)
    await services.call(call_id).hangup()  # raised CallEnded
    assert [r.action for r in graph.requests if r.action != "token"] == ["deleteCall"]
    graph.fail_next("deleteCall", 403)
    with pytest.raises(GraphError) as refused:
        await services.call(call_id).hangup()
    assert refused.value.status == 403


@pytest.mark.parametrize("action", sorted(ITEM_ACTIONS))
async def test_an_item_of_a_call_graph_does_not_have_is_a_plain_404(
    graph: FakeGraph, services: CallServices, action: str
) -> None:
    """FakeGraph answered about a participant, operation or group of a call it was never
    offered as if the call were there: Graph says the call is not found, and (the call not
    known to have ended) callbot raises a plain GraphError."""
    with pytest.raises(GraphError) as raised:
        await ITEM_ACTIONS[action](services.call(NEVER_OFFERED))
    assert not isinstance(raised.value, CallEnded)
    assert (raised.value.status, raised.value.code) == (404, "8522")


async def test_a_call_fake_graph_was_routed_to_create_is_known(
    graph: FakeGraph, services: CallServices
) -> None:
    """A created call is Graph's, however the test answered ``createCall``."""
    created = {"@odata.type": "#microsoft.graph.call", "id": NEVER_OFFERED, "state": "establishing"}
    graph.route("createCall", lambda _: FakeResponse(status=201, body=created))
    call = await services.create_call(Target.user(USER_ID))
    assert (await call.refresh()).state == "establishing"


async def test_other_graph_errors_stay_graph_errors(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.fail_next("playPrompt", 403)
    with pytest.raises(GraphError) as raised:
        await services.call(CALL_ID).play_prompt("https://contoso.example/a.wav")
    assert not isinstance(raised.value, CallEnded)


@pytest.mark.parametrize(
    ("tone", "digit"),
    [("tone0", "0"), ("tone9", "9"), ("star", "*"), ("pound", "#"), ("a", "A"), ("d", "D")],
)
def test_a_tone_offers_the_key_pressed(tone: str, digit: str) -> None:
    assert events.ToneReceived.model_construct(tone=tone).digit == digit


async def test_keys_sent_and_keys_received_use_one_map(
    graph: FakeGraph, services: CallServices
) -> None:
    await services.call(CALL_ID).send_dtmf_tones("19*#AD")
    sent = (await graph.wait_for_request("sendDtmfTones")).json["tones"]
    assert sent == ["tone1", "tone9", "star", "pound", "a", "d"]
    digits = [events.ToneReceived.model_construct(tone=t).digit for t in sent]
    assert "".join(digits) == "19*#AD"


@pytest.mark.parametrize(
    ("identity", "name"),
    [
        ({"user": {"id": USER_ID, "displayName": "Adele Vance"}}, "Adele Vance"),
        ({"phone": {"id": "+14255550100", "displayName": "+1 425 555 0100"}}, "+1 425 555 0100"),
        ({"user": {"id": USER_ID}}, None),
    ],
)
def test_a_participant_has_a_display_name(identity: dict[str, object], name: str | None) -> None:
    participant = models.Participant.model_validate({"id": "p1", "info": {"identity": identity}})
    assert participant.display_name == name
    assert models.Participant.model_validate({"id": "p2"}).display_name is None
