"""The cost of a request once ended calls are being forgotten: a server's steady state.

A call that ended is kept for ``termination_grace`` (30 s by default) to drop
stragglers, then forgotten. For its first 30 s a server only ever adds calls;
from then on each new call is matched by one forgotten, which is the state it
stays in for the rest of its life. ``throughput.py`` loads each server for a
few seconds at a time, so this state hardly shows there.

This loads the ``full`` server (as in ``throughput.py``: whole calls, 32
connections) without a pause for ``termination_grace`` + 25 s, in windows of
5 s, and prints the server's CPU per request in each window and
``after-grace/before-grace: N.NN``: the median of the windows that start at
least 5 s after the grace over the median of those that end before it (the
first window, the warm-up, left out). The target is the one for active calls:
at most 1.2.

    python benchmarks/steady.py [--window 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import APP_ID, LoadGenerator, machine, server
from callbot import Settings
from callbot.testing import TokenAuthority

GRACE = Settings.termination_grace
CONNECTIONS = 32


async def measure(window: float, *options: str) -> dict[str, Any]:
    """CPU per request in consecutive windows, and the ratio after/before the grace."""
    windows: list[dict[str, float]] = []
    async with TokenAuthority() as authority:
        token = authority.mint(audience=APP_ID, expires_in=3600)
        async with (
            LoadGenerator(token) as load,
            server("full", authority.openid_config_url, *options) as srv,
        ):
            started = 0.0
            while started < GRACE + 25.0:
                before = (await srv.stats())["cpu_seconds"]
                result = await load.run(
                    srv.url, prefix=f"w{len(windows)}-", connections=CONNECTIONS, seconds=window
                )
                cpu = (await srv.stats())["cpu_seconds"] - before
                windows.append(
                    {
                        "start": started,
                        "requests": result.requests,
                        "cpu_us": cpu / max(result.requests, 1) * 1e6,
                    }
                )
                started += result.seconds
    early = [w["cpu_us"] for w in windows[1:] if w["start"] + window <= GRACE]
    late = [w["cpu_us"] for w in windows if w["start"] >= GRACE + 5.0]
    return {
        "windows": windows,
        "after-grace/before-grace": statistics.median(late) / statistics.median(early),
    }


def main() -> None:
    """Parse the command line, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per window")
    # The grace sets the length: --quick cannot shorten it and is accepted for run.py only.
    parser.add_argument("--quick", action="store_true", help="accepted; the same length")
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(machine(), flush=True)
    result = asyncio.run(measure(args.window, *(["--uvloop"] if args.uvloop else [])))
    print(
        f"the full server, whole calls, {CONNECTIONS} connections; ended calls are forgotten "
        f"{GRACE:.0f} s after their end"
    )
    print(f"{'window from':>12} {'requests':>9} {'CPU us/req':>11}")
    for w in result["windows"]:
        print(f"{w['start']:>11.0f}s {w['requests']:>9.0f} {w['cpu_us']:>11.1f}")
    print(f"after-grace/before-grace: {result['after-grace/before-grace']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
