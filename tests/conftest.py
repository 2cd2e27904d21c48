import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import make_repo_copy  # noqa: E402


@pytest.fixture
def repo_copy(tmp_path):
    return lambda *overrides: make_repo_copy(tmp_path / "repo", *overrides)
