"""What a package index and a person reading the sdist see (CI builds and installs the wheel)."""

from __future__ import annotations

import tomllib
from importlib.metadata import metadata, version

import callbot

from .support.snippets import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_license_is_an_spdx_expression_with_its_file() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")


def test_one_version_everywhere() -> None:
    assert version("callbot") == callbot.__version__
    assert f"## {callbot.__version__}" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_the_metadata_has_classifiers_and_the_docs_extra() -> None:
    assert "Typing :: Typed" in (metadata("callbot").get_all("Classifier") or [])
    assert "docs" in PYPROJECT["project"]["optional-dependencies"]


def test_the_sdist_carries_what_the_readme_links_to() -> None:
    manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8").split()
    for wanted in ("SECURITY.md", "CHANGELOG.md", "LICENSE", "docs", "deploy"):
        assert wanted in manifest
    # The samples are in the package, so the wheel has them too.
    assert (ROOT / "callbot" / "samples" / "ivr" / "test_ivr.py").is_file()
