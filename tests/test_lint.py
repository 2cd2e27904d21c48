"""The code passes its lint configuration ([tool.ruff] in pyproject.toml), as the pre-commit hook checks."""
import shutil
import subprocess
from pathlib import Path

from helpers import require_tool

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    require_tool("ruff", "pip install -e '.[dev]' (ruff is a dev dependency)")
    p = subprocess.run([shutil.which("ruff"), "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"ruff check found problems (fix them, or `ruff check --fix`):\n{p.stdout[-6000:]}{p.stderr[-2000:]}"


def test_pre_commit_hooks_run_offline():
    """The pre-commit hooks run with the dev install's tools (local hooks: no network, nothing to fetch)."""
    require_tool("pre-commit", "pip install -e '.[dev]' (pre-commit is a dev dependency)")
    if not (REPO / ".git").exists():
        import pytest
        pytest.skip("not a git checkout (pre-commit runs on a repository's files)")
    for hook in ("ruff", "import-linter"):
        p = subprocess.run([shutil.which("pre-commit"), "run", hook, "--all-files"], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, f"pre-commit hook {hook} failed:\n{p.stdout[-4000:]}{p.stderr[-2000:]}"
