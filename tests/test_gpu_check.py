"""bench/gpu_check.py end to end in its CPU mode (--cpu-smoke): every check runs (pretrain and base_eval
on 2 gloo ranks, the cold-cache CORE bundle over local HTTP, 8 streaming clients against the served
model) and lands in the printed table and the JSON, and the exit status follows the verdict.
About a minute on 2 cores."""
import json
import sys

import pytest
from helpers import REPO, run

ROWS = ["attention backend", "fp8", "pretrain", "tok/s", "val bpb", "base_eval", "serve", "d26"]


@pytest.mark.slow
def test_cpu_smoke_end_to_end(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = run([sys.executable, str(REPO / "bench/gpu_check.py"), "--cpu-smoke", "--json", str(out)], tmp_path,
            check=False, timeout=600)
    report = json.loads(out.read_text())
    rows = {r["check"]: r for r in report["checks"]}
    for name in ROWS:
        assert any(name in r for r in rows), f"no {name!r} row in {list(rows)}\n{p.stdout[-3000:]}"
    # the table and its sources are printed, one line per check
    table = p.stdout[p.stdout.index("check "):]
    for r in report["checks"]:
        assert r["check"][:30] in table and r["status"] in ("PASS", "FAIL", "SKIP", "INFO")
    assert "sources:" in table and "karpathy/nanochat@" in table
    # the exit status is the verdict: non-zero exactly when a check FAILed
    failed = [r["check"] for r in report["checks"] if r["status"] == "FAIL"]
    assert report["verdict"] == ("FAIL" if failed else "PASS")
    assert p.returncode == (1 if failed else 0), p.stdout[-3000:] + p.stderr[-3000:]

    def row(prefix):
        return next(r for name, r in rows.items() if name.startswith(prefix))

    # what must work on any CPU: SDPA expected and found, training on 2 ranks, 8 streams served
    assert row("attention backend")["status"] == "PASS"
    assert row("fp8")["status"] == "SKIP" and "not available" in row("fp8")["ours"]
    assert row("d2 pretrain")["status"] == "PASS"
    serve = row("serve 8 streams")
    assert serve["status"] == "PASS" and serve["requests"] == 8 and serve["tokens"] > 0
    assert serve["ttft_p50_ms"] <= serve["ttft_p95_ms"]
    # base_eval ran on 2 ranks from the cold cache and scored the local bundle; the downloads are counted
    # (runtime.fetch_once: one rank per node fetches, so exactly one download)
    ev = row("base_eval 2 ranks")
    assert ev["core"] is not None and ev["downloads"] == 1, ev
    assert report["details"]["base_eval"]["world_size"] == 2
    assert row("d26")["status"] == "SKIP"
