"""Print the declared floors of callbot's runtime dependencies as pip pins (name==version).

Reads the ``>=`` lower bounds of ``[project] dependencies`` and of the ``redis``
extra in pyproject.toml and prints one ``name==version`` line for each, so CI
installs and tests exactly the floors pyproject.toml declares:

    python3 .ci/floors.py >floors.txt && pip install -e '.[dev]' -r floors.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# name, optional [extras], then the version specifiers up to an environment marker.
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def floors(pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["redis"]]
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"cannot read the requirement {requirement!r}")
        name = re.sub(r"[-_.]+", "-", match[1]).lower()
        lower = [s.strip()[2:].strip() for s in match[2].split(",") if s.strip().startswith(">=")]
        if len(lower) != 1:
            raise SystemExit(f"{requirement!r} declares no single '>=' floor")
        if pins.setdefault(name, lower[0]) != lower[0]:
            raise SystemExit(f"{name} has two floors: {pins[name]} and {lower[0]}")
    return [f"{name}=={version}" for name, version in pins.items()]


if __name__ == "__main__":
    sys.stdout.write("".join(f"{line}\n" for line in floors()))
