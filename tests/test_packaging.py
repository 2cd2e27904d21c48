"""Packaging hygiene: the constraints file pins what pyproject.toml asks for, and the package ships what it says."""
import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pins():
    out = {}
    for line in (REPO / "constraints/cpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[norm(name)] = Version(version)
    return out


def test_constraints_pin_every_dependency_within_its_range():
    """Every direct dependency (and dev extra) has a pin, and the pin satisfies pyproject's specifier, so
    `pip install -c constraints/cpu.txt -e '.[dev]'` cannot fail to resolve or silently pin nothing."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(line)
        assert norm(req.name) in pinned, f"constraints/cpu.txt has no pin for {req.name}: rerun constraints/freeze.py"
        assert req.specifier.contains(pinned[norm(req.name)], prereleases=True), (
            f"constraints/cpu.txt pins {req.name}=={pinned[norm(req.name)]}, outside pyproject's {req.specifier}")


def test_torch_pin_has_no_local_version():
    """`torch==X` takes the CPU build from the extra index on Linux and the plain build on macOS (no +cpu wheels)."""
    assert "+" not in str(pins()["torch"])


def test_license_and_typing_marker_ship():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "MIT"}
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert (REPO / "src/nanopipe/py.typed").exists()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["nanopipe"]
