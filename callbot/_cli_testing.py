"""The ``demo``, ``simulate`` and ``replay`` subcommands of ``callbot``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys

from ._arguments import callback_url, keys, new_file, port, seconds
from ._config import Settings
from ._diagram import SequenceDiagram
from ._display import FORMATS, TrafficPrinter
from ._errors import CallbotError
from ._log import configure_logging
from .testing._scenarios import SCENARIOS, TAKES, ScenarioOptions
from .testing._tokens import TEST_TENANT_ID

__all__ = ["add_testing_commands"]


def _demo(args: argparse.Namespace) -> int:
    from ._demo import main

    diagram = SequenceDiagram() if args.diagram else None
    status = main(fmt=args.format, pace=args.pace, verbose=args.verbose, diagram=diagram)
    if diagram is not None:
        _write(diagram, args.diagram, "callbot demo")
    return status


def _write(diagram: SequenceDiagram, path: str, title: str) -> None:
    try:
        diagram.write(path, title)
    except OSError as exc:
        raise CallbotError(f"cannot write the diagram to {path}: {exc.strerror or exc}") from None


def _log_to_stderr() -> None:
    """Log lines (the simulator's failed posts) to stderr: stdout is the traffic, which
    ``--format json`` promises as JSON lines only."""
    # Read as a bot reads them: a value no bot takes is refused here too.
    names = ("CALLBOT_LOG_FORMAT", "CALLBOT_LOG_LEVEL")
    settings = Settings.from_env({name: os.environ[name] for name in names if name in os.environ})
    configure_logging(settings.log_format, settings.log_level)


def _remote(args: argparse.Namespace, url: str) -> object:
    from ._simulate import RemoteBot

    app_id = args.app_id or os.environ.get("CALLBOT_APP_ID")
    if not app_id:
        raise CallbotError("--app-id (or CALLBOT_APP_ID) is required: tokens are minted for it")
    return RemoteBot(
        url=url,
        app_id=app_id,
        tenant_id=args.tenant_id or os.environ.get("CALLBOT_TENANT_ID") or TEST_TENANT_ID,
        keys_port=args.keys_port,
        graph_port=args.graph_port,
        wait=args.wait,
    )


def _refuse_options_not_taken(args: argparse.Namespace) -> None:
    """An option the scenario does not play by (:data:`~callbot.testing._scenarios.TAKES`) is
    a usage error, before anything starts: it would be ignored, or fail the run once set up."""
    given = {
        ("blind", "--blind"): args.blind,
        ("keys", "--keys"): args.keys is not None,
        ("to_instance", "--application-instance-id"): args.application_instance_id is not None,
    }
    for (name, option), is_given in given.items():
        if is_given and name not in TAKES[args.scenario]:
            takers = ", ".join(sorted(s for s, taken in TAKES.items() if name in taken))
            raise CallbotError(f"{args.scenario} takes no {option} (only {takers} do)")


def _simulate(args: argparse.Namespace) -> int:
    from ._simulate import RemoteBot, simulate

    _refuse_options_not_taken(args)
    remote = _remote(args, args.url)
    assert isinstance(remote, RemoteBot)
    remote = dataclasses.replace(remote, application_instance_id=args.application_instance_id)
    _log_to_stderr()
    options = ScenarioOptions(
        blind=args.blind,
        timeout=args.timeout,
        hold=args.hold,
        keys=ScenarioOptions.keys if args.keys is None else args.keys,
        # Given an instance, the caller calls it, as a user calls a resource account's bot.
        to_instance=True if args.application_instance_id else None,
    )
    printer = TrafficPrinter(sys.stdout, fmt=args.format)
    return asyncio.run(
        simulate(
            remote,
            args.scenario,
            options=options,
            printer=printer,
            prompt_seconds=args.prompt_seconds,
        )
    )


def _replay(args: argparse.Namespace) -> int:
    if os.path.isdir(args.file):
        raise CallbotError(f"cannot replay {args.file!r}: it is a directory, not a recording")
    if not os.path.isfile(args.file):
        raise CallbotError(f"cannot replay {args.file!r}: no such file")
    printer = TrafficPrinter(sys.stdout, fmt=args.format)
    diagram = SequenceDiagram()
    status = _replay_into(args, printer, diagram)
    if args.diagram:
        _write(diagram, args.diagram, f"callbot replay {os.path.basename(args.file)}")
    return status


def _replay_into(
    args: argparse.Namespace, printer: TrafficPrinter, diagram: SequenceDiagram
) -> int:
    from ._simulate import RemoteBot, replay

    if args.bot:
        from ._loading import load_bot

        _log_to_stderr()
        bot = load_bot(args.bot)
        configure_logging(bot.settings.log_format, bot.settings.log_level)
        return asyncio.run(
            replay(
                args.file,
                printer=printer,
                bot=bot,
                speed=args.speed,
                max_gap=args.max_gap,
                settle=args.settle,
                observers=[diagram],
            )
        )
    remote = _remote(args, args.url)
    assert isinstance(remote, RemoteBot)
    _log_to_stderr()
    return asyncio.run(
        replay(
            args.file,
            printer=printer,
            remote=remote,
            speed=args.speed,
            max_gap=args.max_gap,
            settle=args.settle,
            observers=[diagram],
        )
    )


_FORMAT_HELP = "rich/plain text on a terminal, JSON lines otherwise (default: auto)"


def _remote_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app-id", default=None, help="the bot's app id (CALLBOT_APP_ID)")
    parser.add_argument(
        "--tenant-id", default=None, help="tenant of the tokens (CALLBOT_TENANT_ID)"
    )
    parser.add_argument(
        "--keys-port", type=port, default=8765, help="port of the signing keys (default 8765)"
    )
    parser.add_argument(
        "--graph-port", type=port, default=8766, help="port of the simulated Graph (default 8766)"
    )
    parser.add_argument(
        "--wait",
        type=seconds,
        default=30.0,
        help="seconds to wait for the bot to come up (default %(default)g)",
    )


def add_testing_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``, ``simulate`` and ``replay`` to the ``callbot`` command."""
    demo = commands.add_parser(
        "demo",
        help="watch a sample IVR bot take calls from a simulated Graph (no account needed)",
    )
    demo.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help=_FORMAT_HELP,
    )
    demo.add_argument(
        "--pace", type=seconds, default=0.3, help="seconds each prompt plays (default 0.3)"
    )
    demo.add_argument("--verbose", action="store_true", help="also show the bot's log on stderr")
    demo.add_argument(
        "--diagram",
        type=new_file,
        metavar="FILE.md",
        help="also write the calls as Mermaid sequence diagrams",
    )
    demo.set_defaults(func=_demo)

    simulate = commands.add_parser(
        "simulate",
        help="play a scripted call against a bot running elsewhere: callbot simulate URL SCENARIO",
    )
    simulate.add_argument(
        "url",
        type=callback_url,
        help="the bot's callback URL, e.g. http://127.0.0.1:8080/api/calls",
    )
    simulate.add_argument("scenario", choices=sorted(SCENARIOS), help="what happens in the call")
    _remote_options(simulate)
    simulate.add_argument(
        "--blind",
        action="store_true",
        help="do not wait for the bot's Graph requests (answer, subscribeToTone); not for "
        "meeting-roster or outgoing-call",
    )
    simulate.add_argument(
        "--keys",
        type=keys,
        default=None,  # given or not: a scenario that presses none refuses it
        help="keys the caller presses, one by one (dtmf, out-of-order; by default 1)",
    )
    simulate.add_argument(
        "--hold",
        type=seconds,
        default=1.0,
        help="seconds a call lasts before the far end hangs up, counted from its last key "
        "in dtmf (default %(default)g)",
    )
    simulate.add_argument(
        "--timeout",
        type=seconds,
        default=15.0,
        help="seconds to wait for the bot to act (default %(default)g)",
    )
    simulate.add_argument(
        "--prompt-seconds",
        type=seconds,
        default=1.0,
        help="seconds each prompt plays (default %(default)g)",
    )
    simulate.add_argument(
        "--application-instance-id",
        default=None,
        metavar="ID",
        help="the bot's application instance (the resource account's object id): the "
        "caller calls it instead of the bot's app",
    )
    simulate.add_argument("--format", choices=FORMATS, default="auto", help=_FORMAT_HELP)
    simulate.set_defaults(func=_simulate)

    replay = commands.add_parser(
        "replay",
        help="post recorded notifications (settings.record_path) to a bot again",
    )
    replay.add_argument("file", help="a JSON-lines recording")
    target = replay.add_mutually_exclusive_group(required=True)
    target.add_argument("--bot", help="MODULE:ATTR of a bot to load and serve here")
    target.add_argument("--url", type=callback_url, help="callback URL of a bot running elsewhere")
    _remote_options(replay)
    replay.add_argument(
        "--speed",
        type=seconds,
        default=1.0,
        help="1 keeps the recorded pauses, 2 halves them, 0 posts without pausing "
        "(default %(default)g)",
    )
    replay.add_argument(
        "--max-gap",
        type=seconds,
        default=5.0,
        help="longest pause between batches, in seconds (default %(default)g)",
    )
    replay.add_argument(
        "--settle",
        type=seconds,
        default=1.0,
        help="at most this many seconds to let the bot start an operation whose outcome is "
        "next, and to let handlers finish at the end (default %(default)g)",
    )
    replay.add_argument("--format", choices=FORMATS, default="auto", help=_FORMAT_HELP)
    replay.add_argument(
        "--diagram",
        type=new_file,
        metavar="FILE.md",
        help="also write the calls as Mermaid sequence diagrams",
    )
    replay.set_defaults(func=_replay)
