"""Helpers shared by the test modules (import as `from helpers import ...`)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def make_cfg(*overrides: str):
    """The validated config of conf/ composed with overrides (what params.yaml would hold)."""
    from nanopipe.config import compose_conf, validate

    return validate(compose_conf(list(overrides), conf_dir=REPO / "conf"), source="test config")


def subprocess_env(extra=None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DVC_NO_ANALYTICS": "1"}
    # mlflow.set_tracking_uri() in an earlier test exports MLFLOW_TRACKING_URI; a repo copy uses its own store.
    env.pop("MLFLOW_TRACKING_URI", None)
    return {**env, **(extra or {})}


def run(cmd, cwd, env=None, check=True, timeout=900):
    p = subprocess.run(cmd, cwd=cwd, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


# plots/: the offline `dvc plots` page that .dvc/config names
REPO_FILES = ["dvc.yaml", "conf", "stages", "src", "plots", "pyproject.toml", ".dvcignore", ".gitignore"]


def make_repo_copy(dest: Path, *overrides: str) -> Path:
    """A fresh git+DVC repo holding this project's pipeline, with params composed from overrides."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in REPO_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "t@t"], dest)
    run(["git", "config", "user.name", "t"], dest)
    run(["dvc", "init", "-q"], dest)
    shutil.copy2(REPO / ".dvc/config", dest / ".dvc/config")  # hydra on, and the cache links (not copies) outputs
    run([sys.executable, "-m", "nanopipe.cli", "compose", *overrides], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest


def require_tool(name: str, install_hint: str, found=None):
    """Skip the calling test where a required tool is missing, but fail it under CI=true: CI installs
    every tool (.ci/run), so a missing one there is a broken install, never a green skip.
    `found`: whether the tool is usable (default: `name` is on PATH)."""
    import pytest

    if found is None:
        found = shutil.which(name) is not None
    if found:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {name} is missing ({install_hint})")
    pytest.skip(f"{name} is not available here ({install_hint})")


def require_module(name: str, install_hint: str = "pip install -e '.[dev]'"):
    """The module `name`, imported; where it cannot be imported the calling test (or, at module level, the
    test module) is skipped, but fails under CI=true: CI installs every dev dependency, so a missing one
    there is a broken install, never a green skip (pytest.importorskip would skip silently)."""
    import importlib

    import pytest

    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: cannot import {name} ({e}; {install_hint})", pytrace=False)
        pytest.skip(f"{name} is not available here ({e}; {install_hint})", allow_module_level=True)
