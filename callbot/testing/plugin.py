"""pytest plugin: test a bot against the Graph simulator, no Teams needed.

Installed with callbot and loaded by pytest automatically (entry point
``pytest11``). Define a ``callbot_bot`` fixture returning your bot; the
``sim`` fixture then points the bot at a fresh :class:`~callbot.testing.Simulator`,
serves it on 127.0.0.1 for the test, and stops it afterwards::

    import pytest
    from callbot.testing import Simulator

    from mybot import bot


    @pytest.fixture
    def callbot_bot():
        return bot


    async def test_caller_is_transferred(sim: Simulator) -> None:
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.press("1")
        assert await sim.wait_for_request("transfer")
        await call.hangup()

Fixtures:

* ``callbot_bot`` - yours to define: the :class:`~callbot.CallBot` under test.
* ``callbot_simulator_options`` - keyword arguments for the simulator
  (``prompt_duration``, ``delivery=DeliveryOptions.realistic()``, ...).
* ``callbot_strict`` - ``True`` (default): a test that passed still fails when
  a handler raised an error that no ``@bot.on_error`` handler took (until the bot
  stopped), the bot refused a notification, or handlers still ran when the test
  ended (the bot abandoned them when it stopped). A handler stopped by
  :class:`~callbot.CallEnded` (the caller hung up), or by an
  :class:`~callbot.OperationFailed` because the call ended, is not a failure.
  Override with ``False``.
* ``callbot_simulator`` and its short name ``sim`` - the running simulator. A
  recording file named by ``CALLBOT_RECORD_PATH`` (kept for real calls) is not
  written during the test; one the bot was configured with otherwise is.

The async fixtures need pytest-asyncio (callbot's ``testing`` extra). A
project needs no pytest configuration of its own: an ``async def`` test that
uses ``sim`` (or ``callbot_simulator``) runs on asyncio without a mark, and
pytest-asyncio's default fixture loop scope is set to ``function`` when the
project leaves it unset.

Simulated time: a test marked ``@pytest.mark.looptime`` (or every test, with
``pytest --looptime``) runs on looptime's fast-forwarded clock, and so do the
simulator and the bot of its ``sim`` fixture, from the fixture's setup to its
teardown: a 10-second timeout or a 2-hour call passes in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Generator, Iterator
from types import TracebackType
from typing import Any

import pytest

from .._bot import CallBot
from .._recording import records_real_calls
from ._simulator import Simulator, run_with_simulator

__all__ = [
    "callbot_bot",
    "callbot_simulator",
    "callbot_simulator_options",
    "callbot_strict",
    "pytest_configure",
    "pytest_pycollect_makeitem",
    "pytest_pyfunc_call",
    "pytest_runtest_makereport",
    "sim",
]

try:
    import pytest_asyncio
except ImportError:  # the plugin loads in every pytest run; it must not break one without it
    HAVE_PYTEST_ASYNCIO = False
else:
    HAVE_PYTEST_ASYNCIO = True

try:
    from looptime import LoopTimeEventLoop
except ImportError:  # simulated time is optional (callbot[testing] brings looptime)
    HAVE_LOOPTIME = False
else:
    HAVE_LOOPTIME = True

_CALL_FAILED = pytest.StashKey[bool]()
_SIMULATED_TIME = pytest.StashKey["_SimulatedTime"]()
_SIMULATOR_FIXTURES = frozenset({"sim", "callbot_simulator"})
_LOOP_SCOPE_OPTION = "asyncio_default_fixture_loop_scope"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Give pytest-asyncio a fixture loop scope when the project sets none (else it warns)."""
    if not HAVE_PYTEST_ASYNCIO or config.getini(_LOOP_SCOPE_OPTION):
        return
    # pytest has no public setter for an ini value; getini reads this cache first.
    cache = getattr(config, "_inicache", None)
    if isinstance(cache, dict):
        cache[_LOOP_SCOPE_OPTION] = "function"
    else:  # a pytest without that cache: at least keep the warning out of the run
        warnings.filterwarnings(
            "ignore", message=f".*{_LOOP_SCOPE_OPTION}.* is unset", category=DeprecationWarning
        )


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, Any, Any]:
    """Mark ``async def`` tests that use the simulator as asyncio tests.

    Runs inside pytest-asyncio's own collection wrapper, so the mark is there
    when it decides which tests to run on a loop; a project then needs neither
    ``asyncio_mode = "auto"`` nor ``@pytest.mark.asyncio``.
    """
    result = yield
    if not HAVE_PYTEST_ASYNCIO or not inspect.iscoroutinefunction(obj):
        return result
    items = result if isinstance(result, list) else [result]
    for item in items:
        if (
            isinstance(item, pytest.Function)
            and _SIMULATOR_FIXTURES.intersection(item.fixturenames)
            and item.get_closest_marker("asyncio") is None
        ):
            item.add_marker(pytest.mark.asyncio)
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """Around looptime's own wrapper: lend it the loop the ``sim`` fixture keeps on simulated
    time, so that it puts the test function on that clock itself."""
    clock = pyfuncitem.stash.get(_SIMULATED_TIME, None)
    if clock is None:
        return (yield)
    with clock.lent():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether the test body failed, so teardown checks do not pile on."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = bool(report.failed)
    return report


@pytest.fixture
def callbot_bot() -> CallBot:
    """The bot under test. Define this fixture (in conftest.py) to return your CallBot."""
    pytest.fail(
        "define a `callbot_bot` fixture that returns the CallBot to test, e.g.\n\n"
        "    @pytest.fixture\n"
        "    def callbot_bot():\n"
        "        from mybot import bot\n"
        "        return bot\n",
        pytrace=False,
    )


@pytest.fixture
def callbot_simulator_options() -> dict[str, Any]:
    """Keyword arguments for the :class:`~callbot.testing.Simulator` (override to change)."""
    return {}


@pytest.fixture
def callbot_strict() -> bool:
    """Whether a passing test fails when a handler raised, a notification was refused, or
    handlers still ran when it ended."""
    return True


def _problems(handled: Counter[str], sim: Simulator) -> list[str]:
    """What went wrong until the bot stopped (its shutdown included): ``handled`` is its
    dispatcher's counts, read after the stop."""
    problems = []
    # Errors an on_error handler took are the bot's own business, not a failure.
    errors = handled["unhandled_errors"]
    if errors:
        problems.append(
            f"{errors} handler run(s) raised and no on_error handler took the error "
            "(see the handler_failed log lines)"
        )
    abandoned = handled["abandoned"]
    if abandoned:
        problems.append(
            f"{abandoned} notification(s) still waited for or ran in their handlers when the "
            "test ended, and were abandoned when the bot stopped: end the test's calls "
            "(await call.hangup()) or wait for the bot (await call.settled(), "
            "call.wait_until_ended()) first"
        )
    problems.extend(refused.refusal() for refused in sim.failed_deliveries)
    return problems


def _looptime_options(item: pytest.Item) -> dict[str, Any] | None:
    """The options looptime runs this test with, or ``None`` when it runs on the real clock.

    looptime's own rule, which its plugin keeps private: its marks (the closest one last)
    and ``--looptime`` / ``--no-looptime``.
    """
    flag = item.config.getoption("looptime", None)
    marks = list(item.iter_markers("looptime"))
    enabled = bool((marks or flag is True) and flag is not False)
    options: dict[str, Any] = {}
    for mark in reversed(marks):
        options.update(mark.kwargs)
        if mark.args:
            enabled = bool(mark.args[0])
    return options if enabled else None


class _SimulatedTime:
    """looptime's clock for the simulator's whole life, its setup and teardown included.

    looptime fast-forwards the loop's clock only while the test function runs; the bot and
    the simulator, started before it and stopped after it, would have their timers set on
    one clock and fired on the other (every timer set in simulated time falls due at once
    when the loop next turns on the real clock). With the test on simulated time, the loop
    stays on it from the fixture's setup to its teardown: :func:`pytest_pyfunc_call` lends
    it to looptime's own plugin for the test function, between two turns of the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, item: pytest.Item) -> None:
        self._loop: LoopTimeEventLoop | None = None
        self._on: contextlib.AbstractContextManager[None] | None = None
        options = _looptime_options(item) if HAVE_LOOPTIME else None
        if options is None or not isinstance(loop, LoopTimeEventLoop) or loop.looptime_on:
            return  # the real clock (or looptime is not patching pytest-asyncio's loops)
        loop.setup_looptime(**options)
        self._loop = loop

    def __enter__(self) -> None:
        if self._loop is not None:
            self._on = self._loop.looptime_enabled()
            self._on.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        on, self._on = self._on, None
        if on is not None:
            on.__exit__(None, None, None)

    @contextlib.contextmanager
    def lent(self) -> Iterator[None]:
        """For the test function: looptime's plugin puts the loop on the same clock itself
        (and refuses a loop already on it)."""
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()


if HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def callbot_simulator(
        request: pytest.FixtureRequest,
        callbot_bot: CallBot,
        callbot_simulator_options: dict[str, Any],
        callbot_strict: bool,
    ) -> AsyncIterator[Simulator]:
        """A running simulator with ``callbot_bot`` served on 127.0.0.1 and pointed at it."""
        if not isinstance(callbot_bot, CallBot):
            pytest.fail(
                f"callbot_bot must return a CallBot, got {type(callbot_bot).__name__}",
                pytrace=False,
            )
        # The recording file the environment names is the developer's record of real calls:
        # simulated ones are not appended to it (one a test configures itself is written).
        recording = callbot_bot.settings.record_path
        kept_out = records_real_calls(recording)
        if kept_out:
            callbot_bot.configure(record_path=None)
        clock = _SimulatedTime(asyncio.get_running_loop(), request.node)
        request.node.stash[_SIMULATED_TIME] = clock
        try:
            with clock:
                async with run_with_simulator(
                    callbot_bot, **callbot_simulator_options
                ) as simulator:
                    # Read once the bot stopped: what its handlers did while it shut down counts.
                    handled = callbot_bot._running().dispatcher.counts
                    yield simulator
        finally:
            del request.node.stash[_SIMULATED_TIME]
            if kept_out:
                with contextlib.suppress(RuntimeError):  # a bot still running keeps None
                    callbot_bot.configure(record_path=recording)
        problems = _problems(handled, simulator)
        if problems and callbot_strict and not request.node.stash.get(_CALL_FAILED, False):
            pytest.fail(
                "the bot misbehaved during the test:\n  - " + "\n  - ".join(problems),
                pytrace=False,
            )

else:

    @pytest.fixture
    def callbot_simulator() -> Simulator:
        """Needs pytest-asyncio."""
        pytest.fail(
            "callbot's simulator fixtures need pytest-asyncio: install callbot's testing "
            "extra ('/path/to/callbot[testing]' from a clone) or pip install pytest-asyncio",
            pytrace=False,
        )


@pytest.fixture
def sim(callbot_simulator: Simulator) -> Simulator:
    """The running simulator (short for ``callbot_simulator``)."""
    return callbot_simulator
