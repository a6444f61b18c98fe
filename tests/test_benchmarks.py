"""The benchmarks' workload and the metrics' bucket arithmetic (no timing is asserted)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from benchmarks._common import call_script
from benchmarks.instructions import by_place, instructions_by_object
from benchmarks.loadgen import _content_length, bodies
from benchmarks.scaling import _one
from benchmarks.stages import sampled_table
from callbot import Settings, events
from callbot._metrics import Latencies, Metrics
from callbot._parse import parse_body


def test_the_benchmark_call_script_is_one_whole_call_in_order() -> None:
    script = call_script()
    kinds = [type(parse_body(t.render("bench-1"))[0]) for t in script]
    assert kinds == [
        events.IncomingCall,
        events.CallStateChanged,
        events.CallStateChanged,
        events.ParticipantsUpdated,
        events.ToneReceived,
        events.ToneReceived,
        events.ToneReceived,
        events.CallStateChanged,
        events.CallTerminated,
    ]
    tones = [parse_body(t.render("bench-1"))[0] for t in script[4:7]]
    assert [t.sequence_id for t in tones if isinstance(t, events.ToneReceived)] == [1, 2, 3]


def test_the_load_generator_interleaves_calls_step_by_step() -> None:
    steps = len(call_script())
    sent = list(itertools.islice(bodies(call_script(), "p", 2), steps * 2 + 1))
    call_ids = [parse_body(body)[0].call_id for body in sent]
    assert call_ids[: steps * 2] == ["p0000000x0", "p0000000x1"] * steps
    assert call_ids[-1] == "p0000001x0"


def test_content_length_is_read_from_a_response_head() -> None:
    assert _content_length(b"http/1.1 202 accepted\r\ncontent-length: 0") == 0
    assert _content_length(b"http/1.1 400 bad\r\ncontent-length: 42\r\nserver: x") == 42
    assert _content_length(b"http/1.1 204 no content") == 0


def test_latencies_count_a_duration_on_a_bound_in_that_bound() -> None:
    latencies = Latencies((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        latencies.observe(seconds)
    assert latencies.counts == [2, 2, 1]


def test_metrics_render_latencies_as_cumulative_histograms() -> None:
    metrics = Metrics()
    metrics.ack_seconds.observe(0.0007)
    metrics.observe_handler("greet", "ok", 0.3)
    metrics.observe_handler("greet", "ok", 20.0)
    text = metrics.render().decode()
    assert 'callbot_ack_seconds_bucket{le="0.0005"} 0.0' in text
    assert 'callbot_ack_seconds_bucket{le="0.001"} 1.0' in text
    assert 'callbot_ack_seconds_bucket{le="+Inf"} 1.0' in text
    assert "callbot_ack_seconds_count 1.0" in text
    assert 'callbot_handler_seconds_bucket{handler="greet",le="0.5",outcome="ok"} 1.0' in text
    assert 'callbot_handler_seconds_bucket{handler="greet",le="+Inf",outcome="ok"} 2.0' in text
    assert 'callbot_handler_seconds_count{handler="greet",outcome="ok"} 2.0' in text
    assert 'callbot_handler_seconds_sum{handler="greet",outcome="ok"} 20.3' in text


def test_a_sampled_profile_is_split_by_the_stages_on_each_stack(tmp_path: Path) -> None:
    loop = "BaseEventLoop._run_once (asyncio/base_events.py:1922)"
    request = f"{loop};RequestHandler._handle_request (aiohttp/web_protocol.py:577)"
    receiver = f"{request};Receiver.handle (callbot/_receiver.py:172)"
    parse = "parse_body_in_parts (callbot/_parse.py:120);_decode (callbot/_parse.py:170)"
    samples = tmp_path / "server.samples"
    samples.write_text(
        f"{receiver};{parse} 3\n"
        f"{receiver};MemoryStore.ingest (callbot/store/_memory.py:57) 2\n"
        f"{request};RequestHandler.finish_response (aiohttp/web_protocol.py:700) 4\n"
        f"{loop};Dispatcher._work (callbot/_dispatch.py:190) 1\n"
    )
    # 10 samples, 50 us per request: a stage on 3 of them is 15 us.
    table = {stage.strip(): (us, share) for stage, us, share in sampled_table(samples, 50.0)}
    expected = {
        "aiohttp: a request, from parsed head to written response": (45.0, 0.9),
        "callbot's receiver (auth to 202)": (25.0, 0.5),
        "of which authentication (cached token)": (0.0, 0.0),
        "of which parsing into typed events": (15.0, 0.3),
        "of which sequencing and queueing (the store's ingest)": (10.0, 0.2),
        "writing the response": (20.0, 0.4),
        "aiohttp: reading and parsing requests": (0.0, 0.0),
        "callbot's worker tasks (dispatch, handler included)": (5.0, 0.1),
    }
    assert table.keys() == expected.keys()
    for stage, figures in expected.items():
        assert table[stage] == pytest.approx(figures), stage


def test_instructions_are_counted_where_they_were_executed(tmp_path: Path) -> None:
    # callgrind's format: names compressed to "(n)" after first use (in ob= or cob=), and
    # the line after calls= is the call's inclusive cost, which belongs to the callee.
    profile = tmp_path / "callgrind.out"
    profile.write_text(
        "events: Ir\n"
        "ob=(1) /lib/libpython3.11.so.1.0\n"
        "fn=(1) _PyEval_EvalFrameDefault\n"
        "10 100\n"
        "cob=(2) /site-packages/pydantic_core/_pydantic_core.so\n"
        "cfn=(2) validate\n"
        "calls=1 0\n"
        "11 40\n"
        "+1 5\n"
        "ob=(2)\n"
        "fn=(2)\n"
        "0 40\n"
        "ob=(3) /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "fn=(3) memcpy\n"
        "* 7\n"
    )
    totals = instructions_by_object(profile)
    assert totals == {
        "/lib/libpython3.11.so.1.0": 105,
        "/site-packages/pydantic_core/_pydantic_core.so": 40,
        "/usr/lib/x86_64-linux-gnu/libc.so.6": 7,
    }
    places = by_place(totals)
    assert (places["interpreter"], places["pydantic-core"], places["C library"]) == (105, 40, 7)
    assert places["the rest"] == 0


def test_the_scaling_benchmark_s_calls_all_stay_active_past_the_pending_bound() -> None:
    """Its calls are answered, as a bot's own are: more of them than ``max_pending_calls``
    (2,000 by default) all stay active, so the memory per call is a real call's."""
    assert Settings().max_pending_calls < 2_100
    assert _one(2_100, 16)["active"] == 2_100
