"""`nanopipe doctor` heals a dvc.lock that a killed `dvc repro` left empty or cut short (issue 18, item 5)."""
import sys

import pytest
from helpers import run

from nanopipe import doctor

DECLARED = {"a": {"outs": ["out/a"], "deps": ["src/a.py"]}}
GOOD = """schema: '2.0'
stages:
  a:
    cmd: python a.py
    deps:
    - path: src/a.py
      hash: md5
      md5: 0123456789abcdef0123456789abcdef
      size: 3
    outs:
    - path: out/a
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
      size: 3
"""


def test_lock_checks():
    assert doctor.lock_problems(GOOD, DECLARED) == ([], [])
    assert doctor.lock_problems("", DECLARED)[0] == ["is empty"]
    assert "not valid YAML" in doctor.lock_problems("stages: {a: [", DECLARED)[0][0]
    cut = GOOD[: GOOD.rindex("md5: 0123") + len("md5: 0123")]  # cut inside the last hash: still YAML
    assert any("no full md5" in p for p in doctor.lock_problems(cut, DECLARED)[0])
    cut = GOOD[: GOOD.index("    outs:")]  # cut at a line boundary: parses, but the outs are gone
    assert any("outs differ" in p for p in doctor.lock_problems(cut, DECLARED)[0])


@pytest.mark.slow
def test_truncated_lock_is_restored_and_nothing_recomputes(repo_copy):
    repo = repo_copy("experiment=smoke", "tracking.enabled=false")
    env = {"PYTHONPATH": str(repo / "src")}
    run(["dvc", "repro", "tok_eval"], repo, env=env)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "repro"], repo)
    lock = (repo / "dvc.lock").read_text()

    for damaged in ("", lock[: len(lock) // 3]):  # what 2 of 10 kills during "Updating lock file" left
        (repo / "dvc.lock").write_text(damaged)
        assert run([sys.executable, "-m", "nanopipe.cli", "doctor", "--check"], repo, env=env, check=False).returncode == 1
        healed = run([sys.executable, "-m", "nanopipe.cli", "doctor"], repo, env=env)
        assert "restored from commit" in healed.stdout, healed.stdout
        assert (repo / "dvc.lock").read_text() == lock
        out = run(["dvc", "repro", "tok_eval"], repo, env=env).stdout
        assert "Running stage" not in out, out
        assert out.count("didn't change, skipping") == 3, out
        assert "up to date" in run(["dvc", "status", "tok_eval"], repo, env=env).stdout
    assert run([sys.executable, "-m", "nanopipe.cli", "doctor", "--check"], repo, env=env).returncode == 0
