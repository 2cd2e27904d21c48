"""DVC's run-cache applies to nanopipe's stages (docs/decisions.md, D20): a queued grid run a second time
executes no stage, every one is restored ("Stage ... is cached - skipping run, checking out outputs")."""
import json

import pytest
from helpers import REPO, make_repo_copy, run


def test_no_stage_declares_what_keeps_dvc_from_run_caching_it():
    """DVC saves no run-cache entry for a stage with a `persist` output or a `cache: false` output that is
    not a metric or plot (dvc/stage/__init__.py `Stage.run`, dvc/stage/cache.py `_can_hash`). `report` is
    the one exception, on purpose: metrics/report.md stays in git."""
    from dvc.repo import Repo

    blocked = {}
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            why = [f"{o.def_path} (persist)" for o in stage.outs if o.persist]
            why += [f"{o.def_path} (cache: false)" for o in stage.outs if not o.use_cache and not (o.is_metric or o.is_plot)]
            if why:
                blocked[stage.name] = why
    assert blocked == {"report": ["metrics/report.md (cache: false)", "metrics/report (cache: false)",
                                  "metrics/sections/report.md (cache: false)"]}


def _ran(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


def _cached(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.endswith("is cached - skipping run, checking out outputs")]


@pytest.mark.slow
def test_a_queued_grid_rerun_restores_every_stage_from_the_run_cache(tmp_path):
    repo = make_repo_copy(tmp_path / "repo", "experiment=smoke")
    env = {"PYTHONPATH": str(repo / "src")}
    grid = ["dvc", "exp", "run", "--queue", "-S", "experiment=smoke", "-S", "tokenizer.vocab_size=300,400", "tokenizer"]

    run(grid, repo, env=env)
    first = run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], repo, env=env).stdout
    # the two points share the download: the second experiment already restores it
    assert sorted(_ran(first)) == ["download", "tokenizer", "tokenizer"], first
    assert _cached(first) == ["download"], first

    run(grid, repo, env=env)
    second = run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], repo, env=env).stdout
    assert _ran(second) == [], second
    assert sorted(_cached(second)) == ["download", "download", "tokenizer", "tokenizer"], second

    # MLflow saw three executions, not seven; the restored experiments have their metrics all the same
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["nanopipe"], output_format="list")
    assert sorted(r.data.tags["stage"] for r in runs) == ["download", "tokenizer", "tokenizer"]
    vocab = {}
    for base in json.loads(run(["dvc", "exp", "show", "--json"], repo, env=env).stdout):
        for exp in base.get("experiments") or []:
            data = exp["revs"][0]["data"]
            assert exp["executor"]["state"] == "success", exp
            tok = data["metrics"]["metrics/tokenizer.json"]["data"]
            vocab.setdefault(data["params"]["params.yaml"]["data"]["tokenizer"]["vocab_size"], []).append(tok["lineage"])
    assert sorted(vocab) == [300, 400] and all(len(v) == 2 and v[0] == v[1] for v in vocab.values())
