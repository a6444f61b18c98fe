"""Run every benchmark and print one table of the figures against their targets.

    python benchmarks/run.py            # about three minutes
    python benchmarks/run.py --quick    # about two
    python benchmarks/run.py --uvloop   # servers on uvloop (needs uvloop installed)

Each benchmark runs in a process of its own (they pin servers and load to
cores, and measure memory); their own reports are printed as they finish.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import REPO, machine

BENCHMARKS = ("throughput", "scaling", "latency", "steady")


def _run(name: str, options: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        completed = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{name}", *options, "--json", out.name],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        )
        # The first line names the machine, printed once for the whole run.
        print("\n".join(completed.stdout.splitlines()[1:]), end="\n\n", flush=True)
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
        return result


def table(results: dict[str, dict[str, Any]]) -> str:
    """The summary: each figure, its target, and whether it is met."""
    throughput, scaling, latency, steady = (results[name] for name in BENCHMARKS)
    kinds = throughput["kinds"]
    full = kinds["full"]
    saturated = latency["rows"][-1]
    idle = latency["rows"][0]
    ratios = throughput["ratios"]
    rows: list[tuple[str, str, str, bool | None]] = [
        (
            "full/bare (CPU per request)",
            f"{ratios['full/bare']:.2f}",
            ">= 0.80",
            ratios["full/bare"] >= 0.8,
        ),
        ("full/bare-noread", f"{ratios['full/bare-noread']:.2f}", "", None),
        (
            "full/handwritten",
            f"{ratios['full/handwritten']:.2f}",
            "> 1.00",
            ratios["full/handwritten"] > 1.0,
        ),
        (
            "full/handwritten-cached",
            f"{ratios['full/handwritten-cached']:.2f}",
            ">= 1.00",
            ratios["full/handwritten-cached"] >= 1.0,
        ),
        (
            "CPU us/req bare/hw/hw-cached/full",
            "/".join(
                f"{kinds[k]['cpu_us']:.0f}"
                for k in ("bare", "handwritten", "handwritten-cached", "full")
            ),
            "",
            None,
        ),
        ("callbot req/s (median)", f"{full['rps']:.0f}", "", None),
        ("ack p50/p99, 32 conn", f"{full['p50_ms']:.2f}/{full['p99_ms']:.2f} ms", "", None),
        (
            "cost 10000/10 active calls",
            f"{scaling['cost 10000/10']:.2f}",
            "<= 1.20",
            scaling["cost 10000/10"] <= 1.2,
        ),
        (
            "cost after/before the grace (steady)",
            f"{steady['after-grace/before-grace']:.2f}",
            "<= 1.20",
            steady["after-grace/before-grace"] <= 1.2,
        ),
        (
            "memory per active call",
            f"{scaling['bytes_per_call'] / 1024:.1f} KB",
            "<= 10 KB",
            scaling["bytes_per_call"] <= 10 * 1024,
        ),
        (
            "arrival->handler, 1 conn, p50/p99",
            f"{idle['p50_us']:.0f}/{idle['p99_us']:.0f} us",
            "",
            None,
        ),
        (
            "arrival->handler, 32 conn, p50/p99",
            f"{saturated['p50_us']:.0f}/{saturated['p99_us']:.0f} us",
            "",
            None,
        ),
    ]
    lines = [f"{'figure':<36} {'measured':>16} {'target':>9}  met"]
    for name, value, target, met in rows:
        verdict = "" if met is None else ("yes" if met else "NO")
        lines.append(f"{name:<36} {value:>16} {target:>9}  {verdict}")
    return "\n".join(lines)


def main() -> None:
    """Run the benchmarks one after another, then print the table."""
    parser = argparse.ArgumentParser(description="run all callbot benchmarks")
    parser.add_argument("--quick", action="store_true", help="shorter runs, noisier figures")
    parser.add_argument("--uvloop", action="store_true", help="run the servers on uvloop")
    args = parser.parse_args()
    print(machine(), end="\n\n", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name in BENCHMARKS:
        options = ["--quick"] if args.quick else []
        if args.uvloop and name != "scaling":
            options.append("--uvloop")
        results[name] = _run(name, options)
    print(table(results))


if __name__ == "__main__":
    main()
