"""The ``callbot`` command line."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import keyword
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from ._arguments import port
from ._cli_testing import add_testing_commands
from ._config import _convert, listen_address
from ._errors import CallbotError
from ._loading import load_bot
from ._log import configure_logging, get_logger
from ._tunnel import TUNNEL_KINDS, discover_public_url

__all__ = ["build_parser", "load_bot", "main", "write_sample"]

log = get_logger("callbot.cli")


def _run(args: argparse.Namespace) -> int:
    configure_logging(
        os.environ.get("CALLBOT_LOG_FORMAT", "auto"), os.environ.get("CALLBOT_LOG_LEVEL", "info")
    )
    bot = load_bot(args.target)
    # Where to listen is the deployment's choice (an image sets it), also for a bot built in code.
    bot.configure(**_listen_from_env(os.environ))
    configure_logging(bot.settings.log_format, bot.settings.log_level)
    if args.tunnel:
        port = bot.settings.port if args.port is None else args.port
        if port == 0:
            raise CallbotError("a tunnel forwards to a fixed port: give --port a number, not 0")
        listen_host = args.host or bot.settings.host
        found = discover_public_url(args.tunnel, port, listen_host=listen_host)
        was = bot.settings.public_url
        if was and was.rstrip("/") != found.rstrip("/"):
            # Said, not silent: the variable set may be what the author thinks Graph is given.
            log.warning("public_url_replaced_by_tunnel", was=was, now=found, tunnel=args.tunnel)
        bot.configure(public_url=found)
    try:
        bot.run(args.host, args.port)
    except OSError as exc:
        host = listen_address(args.host or bot.settings.host)
        port = bot.settings.port if args.port is None else args.port
        # An IPv6 address is bracketed before its port, as in a URL: [::]:8080, not :::8080.
        shown = f"[{host}]" if ":" in host else host
        # A name that does not resolve, or an address not this machine's: another port fails too.
        # (Python 3.13 says so with no errno: "could not bind on any address out of ...".)
        bad_host = (
            isinstance(exc, socket.gaierror)
            or exc.errno == errno.EADDRNOTAVAIL
            or (exc.errno is None and "could not bind" in str(exc))
        )
        option = "--host or CALLBOT_HOST" if bad_host else "--port or CALLBOT_PORT"
        raise CallbotError(
            f"cannot listen on {shown}:{port}: {exc.strerror or exc} (choose another with {option})"
        ) from None
    return 0


def _listen_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """``host`` and ``port`` from ``CALLBOT_HOST`` and ``CALLBOT_PORT`` when set: ``callbot run``
    applies them to any bot, not only one made with ``CallBot.from_env()``."""
    listen: dict[str, Any] = {}
    for name, type_name in (("host", "str"), ("port", "int")):
        raw = environ.get("CALLBOT_" + name.upper(), "").strip()
        if raw:
            listen[name] = _convert(name, type_name, raw)
    return listen


# Each sample and how its README runs it for real, from the sample's folder.
SAMPLES = {
    "ivr": "callbot run bot:bot",
    "meeting": 'python bot.py "<meeting join URL>"',
    "notifier": "python bot.py <user id or +phone number>",
}


def write_sample(name: str, directory: str) -> list[Path]:
    """Copy the sample bot ``name`` (its bot, tests and README) into a new ``directory``."""
    if name not in SAMPLES:
        raise CallbotError(f"no sample {name!r}; samples: {', '.join(SAMPLES)}")
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CallbotError(f"{directory} is a file: choose a new directory")
    if target.exists() and any(target.iterdir()):
        raise CallbotError(f"{directory} exists and is not empty: choose a new directory")
    # Its tests import the bot as `from . import bot`: pytest imports the folder as a package.
    package = target.resolve().name
    if not package.isidentifier() or keyword.iskeyword(package):
        raise CallbotError(
            f"{directory}: {package!r} is not a Python package name, which the sample's tests"
            " need (letters, digits and _, not starting with a digit: my_ivr, not my-ivr)"
        )
    if _another_module(package, target):
        raise CallbotError(
            f"{directory}: {package!r} is the name of a module Python already has, which the"
            " sample's tests would import instead of the sample: choose another (my_ivr)"
        )
    try:
        return _copy_sample(name, target)
    except OSError as exc:  # a parent that is a file, a read-only place
        raise CallbotError(
            f"cannot write the sample to {directory}: {exc.strerror or exc}"
        ) from None


def _another_module(package: str, target: Path) -> bool:
    """Whether ``package`` imports something other than ``target`` (an installed module)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a module that fails as it is looked for: taken too
        return True
    if spec is None:
        return False
    places = [*(spec.submodule_search_locations or []), spec.origin or ""]
    # `python -m callbot` has the current directory on the path: the sample's own is no other.
    return not any(place and Path(place).resolve() == target.resolve() for place in places)


def _copy_sample(name: str, target: Path) -> list[Path]:
    source = resources.files("callbot.samples").joinpath(name)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith((".py", ".md")):
            path = target / entry.name
            data = entry.read_bytes()
            if entry.name == "README.md":
                data = data.replace(b"](../README.md", b"](SAMPLES.md")
            path.write_bytes(data)
            written.append(path)
    common = target / "SAMPLES.md"
    common.write_bytes(resources.files("callbot.samples").joinpath("README.md").read_bytes())
    written.append(common)
    return written


def _sample(args: argparse.Namespace) -> int:
    # "my_ivr/" as a shell completes it: the steps below add their own slashes.
    directory = os.path.normpath(args.directory or args.name)
    written = write_sample(args.name, directory)
    print(f"wrote the {args.name} sample to {directory}/ ({len(written)} files). Next:")
    print(f"  python -m pytest {directory}          # its tests, against the simulator")
    print(f"  cd {directory} && {SAMPLES[args.name]}    # for real: {directory}/README.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``callbot`` command."""
    parser = argparse.ArgumentParser(prog="callbot", description="Microsoft Graph calling bots")
    parser.add_argument("--version", action="version", version=f"callbot {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve a bot: callbot run MODULE:ATTR")
    run.add_argument("target", help="MODULE:ATTR naming a CallBot (or a function returning one)")
    run.add_argument("--host", default=None, help="address to listen on (CALLBOT_HOST)")
    run.add_argument(
        "--port", type=port, default=None, help="port to listen on, 0 for a free one (CALLBOT_PORT)"
    )
    run.add_argument(
        "--tunnel",
        choices=TUNNEL_KINDS,
        default=None,
        help="development: take public_url from a running ngrok agent or dev tunnel",
    )
    run.set_defaults(func=_run)
    sample = commands.add_parser(
        "sample", help="write a sample bot with its tests to start from: callbot sample ivr DIR"
    )
    sample.add_argument("name", choices=SAMPLES, help="which sample")
    sample.add_argument("directory", nargs="?", help="where to write it (default: NAME)")
    sample.set_defaults(func=_sample)
    add_testing_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``callbot`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CallbotError as exc:
        print(f"callbot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C where no bot serves (run's bot handles its own): the shell's status for it.
        print("callbot: interrupted", file=sys.stderr)
        return 130
