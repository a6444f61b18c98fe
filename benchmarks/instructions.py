"""Instructions per request, counted by callgrind: a figure the machine's load hardly moves.

CPU time per request (``throughput.py``) moves by up to 15% from one run to the
next on a shared machine. Instructions executed move far less: each server runs under
``valgrind --tool=callgrind`` with counting switched on only while the load
generator plays whole calls to it (the same load as ``throughput.py``, over 8
connections), so start-up and warm-up are left out, and the count over the
requests answered is instructions per request. The warm-up outlasts
callbot's ``termination_grace`` (30 s), so the calls ended during it are
forgotten while counting, as in a server that has run for a while. Two idle
runs of one tree agree within about 1%; with other work on the machine the
requests batch differently, and a count can differ by up to 1.5%.

Prints, per server, instructions per request in all and by where they were
executed (the interpreter, pydantic-core, orjson, aiohttp's C parts, the C
library, the rest), and the ratios ``full/bare (instructions)`` and
``full/handwritten-cached (instructions)``. Instructions are not time (a
cache miss costs more than an addition) but they track it: in the runs quoted
in README.md the instruction ratios were 0.07 and 0.09 above the CPU-time
ones: an instruction of callbot's takes a little longer, on average, than one
of a bare reader's.

Needs valgrind (``apt-get install valgrind``). Each server takes about a
minute: the interpreter runs twenty to fifty times slower under valgrind.

    python benchmarks/instructions.py [--warm 35] [--seconds 15] [--kinds bare,full]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import APP_ID, LoadGenerator, machine, server
from callbot.testing import TokenAuthority

KINDS = ("bare", "handwritten-cached", "full")
CONNECTIONS = 8
# Where an instruction was executed, by the shared object's name.
PLACES = (
    ("interpreter", re.compile(r"libpython|/python3(\.\d+)?$")),
    ("pydantic-core", re.compile(r"pydantic_core")),
    ("orjson", re.compile(r"orjson")),
    ("aiohttp (C)", re.compile(r"aiohttp|multidict|yarl|propcache|frozenlist")),
    ("C library", re.compile(r"libc[.-]")),
)
# ``ob=(3) /path`` names object 3 and makes it current; ``cob=`` (a callee's) only names it.
_OBJECT = re.compile(r"^c?ob=(?:\((\d+)\))?\s*(.*)$")


def instructions_by_object(profile: Path) -> Counter[str]:
    """Instructions counted in a callgrind output file, by shared object (self cost)."""
    names: dict[str, str] = {}
    totals: Counter[str] = Counter()
    current = "?"
    skip_next = False
    for line in profile.read_text(errors="replace").splitlines():
        if line.startswith(("ob=", "cob=")):
            match = _OBJECT.match(line)
            assert match is not None
            number, name = match.groups()
            if name and number is not None:
                names[number] = name
            if line.startswith("ob="):
                current = name or names.get(number or "", "?")
        elif line.startswith("calls="):
            # The next cost line is what the call cost inclusively: counted in the callee.
            skip_next = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip_next:
                skip_next = False
                continue
            fields = line.split()
            if len(fields) >= 2:
                totals[current] += int(fields[-1])
    return totals


def by_place(totals: Counter[str]) -> dict[str, int]:
    """Object totals grouped into :data:`PLACES` and ``the rest``."""
    grouped = dict.fromkeys([place for place, _ in PLACES] + ["the rest"], 0)
    for name, count in totals.items():
        place = next((place for place, pattern in PLACES if pattern.search(name)), "the rest")
        grouped[place] += count
    return grouped


async def count(
    kind: str, openid_config_url: str, load: LoadGenerator, warm: float, seconds: float
) -> dict[str, float]:
    """Instructions per request of one server, in all and by place."""
    control = shutil.which("callgrind_control")
    assert control is not None
    with tempfile.TemporaryDirectory(prefix="callbot-callgrind-") as folder:
        out = Path(folder) / "callgrind.out"
        wrapper = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
        ]
        async with server(kind, openid_config_url, wrapper=wrapper) as srv:
            # Warm: imports done, caches filled, the first calls' lazy work behind us.
            await load.run(srv.url, prefix="warm-", connections=CONNECTIONS, seconds=warm)
            await _callgrind(control, srv.process.pid, "on")
            result = await load.run(
                srv.url, prefix="counted-", connections=CONNECTIONS, seconds=seconds
            )
            await _callgrind(control, srv.process.pid, "off")
            if result.errors:
                raise SystemExit(f"{kind}: {result.errors} requests failed")
        # The profile is written when the server exits, at the end of the block.
        grouped = by_place(instructions_by_object(out))
    figures: dict[str, float] = {"requests": result.requests}
    figures["total"] = sum(grouped.values()) / result.requests
    figures.update({place: n / result.requests for place, n in grouped.items()})
    return figures


async def _callgrind(control: str, pid: int, switch: str) -> None:
    process = await asyncio.create_subprocess_exec(
        control,
        "--instr=" + switch,
        str(pid),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await process.wait() != 0:
        raise SystemExit(f"callgrind_control --instr={switch} failed")


async def measure(kinds: list[str], warm: float, seconds: float) -> dict[str, dict[str, float]]:
    """Every server counted in turn under the same load."""
    results: dict[str, dict[str, float]] = {}
    async with TokenAuthority() as authority:
        token = authority.mint(audience=APP_ID, expires_in=3600)
        async with LoadGenerator(token) as load:
            for kind in kinds:
                results[kind] = await count(kind, authority.openid_config_url, load, warm, seconds)
    return results


def report(results: dict[str, dict[str, float]]) -> list[str]:
    """The table and the ratio lines."""
    places = [place for place, _ in PLACES] + ["the rest"]
    lines = [
        f"instructions per request (callgrind), {CONNECTIONS} connections, whole calls",
        f"{'server':<20} {'requests':>8} {'total':>9} " + " ".join(f"{p:>13}" for p in places),
    ]
    for kind, figures in results.items():
        lines.append(
            f"{kind:<20} {figures['requests']:>8.0f} {figures['total'] / 1000:>8.1f}k "
            + " ".join(f"{figures[p] / 1000:>12.1f}k" for p in places)
        )
    full = results.get("full")
    if full is not None:
        for other in ("bare", "handwritten-cached"):
            if other in results:
                ratio = results[other]["total"] / full["total"]
                lines.append(f"full/{other} (instructions): {ratio:.2f}")
    return lines


def main() -> None:
    """Parse the command line, count, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--warm", type=float, default=35.0, help="uncounted load first")
    parser.add_argument("--seconds", type=float, default=15.0, help="counted load per server")
    parser.add_argument("--kinds", default=",".join(KINDS), help="servers, comma-separated")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind: apt-get install valgrind")
    print(machine(), flush=True)
    results = asyncio.run(measure(args.kinds.split(","), args.warm, args.seconds))
    print("\n".join(report(results)))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
