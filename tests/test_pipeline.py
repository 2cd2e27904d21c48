"""The DVC pipeline through real `dvc repro` in a temporary copy of the repo."""
import sys

import yaml
from helpers import REPO, run

from nanopipe import paths


def _ran(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


def test_download_stage_repro_noop_and_param_change(repo_copy):
    repo = repo_copy("experiment=smoke")
    out = run(["dvc", "repro", "download"], repo).stdout
    assert _ran(out) == ["download"]
    assert (repo / "data/shards/manifest.json").exists()
    assert (repo / "metrics/download.json").exists()

    out = run(["dvc", "repro", "download"], repo).stdout
    assert _ran(out) == [], out

    run([sys.executable, "-m", "nanopipe.cli", "compose", "experiment=smoke", "data.seed=7"], repo)
    out = run(["dvc", "repro", "download"], repo).stdout
    assert _ran(out) == ["download"]

    # MLflow: the runs are in the repo's store, with the params and metrics the stage used.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["nanopipe"], filter_string="tags.stage = 'download'")
    assert len(runs) == 2
    latest = runs.iloc[0]
    assert latest["params.data.seed"] == "7" and latest["params.data.source"] == "embedded"
    assert latest["metrics.train_rows"] > 0
    assert latest["tags.dvc_exp"] == "workspace" and len(latest["tags.git_commit"]) == 40


def test_dvc_yaml_paths_match_code():
    """dvc.yaml's outs/metrics are the paths the stages write (nanopipe.paths)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        declared = set()
        for key in ("outs", "metrics", "plots"):
            for item in st.get(key, []):
                declared.add(next(iter(item)) if isinstance(item, dict) else item)
        assert str(paths.metrics_file(name)) in declared, f"stage {name}: metrics file not declared"
        assert str(paths.section_file(name)) in declared, f"stage {name}: report section not declared"
        assert f"python stages/launch.py {name}" in st["cmd"]
