"""MLflow tracking against the real MLflow on the repo's sqlite store: a repo that is copied or moved
keeps its artifacts inside itself, and every run carries MLflow's source tags."""
from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

from helpers import make_cfg

from nanopipe.stage import run_stage
from nanopipe.tracking import repoint_artifacts


def _stage(name: str, text: str):
    """A stage that writes a metrics file and section (both logged as artifacts) and one artifact of its own."""
    def body(st):
        st.tracker.log_text(text, "note.txt")
        st.finish({"x": 1.0}, f"wrote {text}")

    module = types.ModuleType(f"nanopipe.stages.{name}")
    module.PARAMS = ["runtime.seed"]
    module.run = body
    return module


def _git_repo(root):
    root.mkdir()
    for cmd in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"],
                ["commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def _runs(root):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("nanopipe")
    return client, exp, {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}


def test_a_copied_repo_keeps_its_artifacts_inside_itself(tmp_path, monkeypatch):
    """The default store (tracking.uri unset), run in a repo, the repo copied with `cp -a` and the
    original deleted: the copy's next run writes its artifacts into the copy, and every run, old and
    new, reads its artifacts back from the copy."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier test's mlflow.set_tracking_uri
    monkeypatch.delenv("DVC_ROOT", raising=False)
    old, new = tmp_path / "old", tmp_path / "new"
    commit = _git_repo(old)
    monkeypatch.chdir(old)
    run_stage(_stage("first", "before the move"), make_cfg("experiment=smoke"))
    assert (old / "mlflow.db").exists() and any((old / "mlruns").rglob("note.txt"))

    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    shutil.rmtree(old)
    monkeypatch.chdir(new)
    run_stage(_stage("second", "after the move"), make_cfg("experiment=smoke"))

    assert not old.exists(), "a run wrote into the old repo's folder"
    client, exp, runs = _runs(new)
    assert exp.artifact_location == (new / "mlruns").as_uri()
    assert set(runs) == {"first", "second"}
    for stage, text in (("first", "before the move"), ("second", "after the move")):
        run = runs[stage]
        assert run.info.artifact_uri.startswith((new / "mlruns").as_uri() + "/"), run.info.artifact_uri
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"note.txt", f"{stage}.json", f"{stage}.md"} <= logged
        got = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / f"dl-{stage}"))
        assert open(got).read() == text
        # MLflow's own source tags, and ours
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit == tags["git_commit"]
        assert tags["mlflow.source.name"] == f"src/nanopipe/stages/{stage}.py"
        assert tags["mlflow.source.type"] == "LOCAL" and tags["dvc_exp"] == "workspace"
    # the experiment opens on its runs in MLflow UIs that read its kind
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


ECHO_MODEL = """
import mlflow
from mlflow.pyfunc import PythonModel


class Echo(PythonModel):
    def load_context(self, context):
        self.prefix = open(context.artifacts["prefix"]).read()

    def predict(self, context, model_input, params=None):
        return [self.prefix + str(x) for x in model_input.iloc[:, 0]]


mlflow.models.set_model(Echo())
"""


def test_a_logged_model_loads_from_the_moved_repo(tmp_path, monkeypatch):
    """A model logged before the move (MLflow 3 keeps logged models apart from run artifacts, under
    their own stored location) loads from the copy once the original is gone."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    import mlflow.tracking._tracking_service.utils as tracking_utils
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # an earlier test's mlflow.set_tracking_uri()
    old, new = tmp_path / "old", tmp_path / "new"
    _git_repo(old)
    (tmp_path / "echo.py").write_text(ECHO_MODEL)
    (old / "prefix.txt").write_text("moved: ")
    uris = []

    def body(st):
        uris.append(st.tracker.log_pyfunc("echo", tmp_path / "echo.py", {"prefix": "prefix.txt"}, inputs=[(None, "string")],
                                          params=[], pip_requirements=["mlflow"]))
        st.finish({}, "")

    module = types.ModuleType("nanopipe.stages.logs_model")
    module.PARAMS, module.run = ["runtime.seed"], body
    monkeypatch.chdir(old)
    run_stage(module, make_cfg("experiment=smoke"))
    assert uris[0] and uris[0].startswith("models:/")

    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    shutil.rmtree(old)
    monkeypatch.chdir(new)
    run_stage(_stage("after", "x"), make_cfg("experiment=smoke"))

    import mlflow

    with _use_tracking_uri(f"sqlite:///{new / 'mlflow.db'}"):
        model = mlflow.pyfunc.load_model(uris[0])
        assert list(model.predict(["a", "b"])) == ["moved: a", "moved: b"]
        info = mlflow.get_logged_model(uris[0].split("/")[-1])
    assert info.artifact_location.startswith((new / "mlruns").as_uri() + "/")
    _, exp, runs = _runs(new)
    assert info.experiment_id == exp.experiment_id and info.source_run_id == runs["logs_model"].info.run_id
    assert not old.exists()


def test_the_dvc_experiment_names_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "tidal-wave")
    _git_repo(tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    run_stage(_stage("probe", "x"), make_cfg("experiment=smoke"))
    _, _, runs = _runs(tmp_path / "repo")
    assert runs["probe"].data.tags["dvc_exp"] == "tidal-wave" and runs["probe"].info.run_name == "tidal-wave/probe"


def test_a_store_outside_the_repo_is_left_alone(tmp_path, monkeypatch):
    """tracking.uri at a shared store: its artifact root is not this repo's to re-point."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    uri = f"sqlite:///{shared / 'mlflow.db'}"
    for repo in ("a", "b"):
        (tmp_path / repo).mkdir()
        monkeypatch.chdir(tmp_path / repo)
        run_stage(_stage(repo, repo), make_cfg("experiment=smoke", f"tracking.uri={uri}"))
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("nanopipe")
    assert exp.artifact_location == (tmp_path / "a" / "mlruns").as_uri()  # where it was created, not moved
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_repoint_rewrites_prefixes_only(tmp_path):
    """Only locations at or under the old root change, in either spelling MLflow stores (file: URI or
    plain path); a sibling folder whose name starts the same does not, and a path holding SQL wildcard
    characters is matched literally."""
    import sqlite3

    db = tmp_path / "m.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE runs (run_uuid TEXT, artifact_uri TEXT)")
    con.execute("CREATE TABLE experiments (experiment_id INT, artifact_location TEXT)")
    old, new = Path("/a/my_repo%_x/mlruns"), Path("/b/mlruns")
    con.executemany("INSERT INTO runs VALUES (?, ?)", [
        ("1", old.as_uri() + "/r1/artifacts"), ("2", Path("/a/my_repo%_x/mlruns2/x").as_uri()),
        ("3", Path("/a/myxrepo%_x/mlruns/r3/artifacts").as_uri()), ("4", f"{old}/0/r4/artifacts")])
    con.executemany("INSERT INTO experiments VALUES (?, ?)", [(0, f"{old}/0"), (1, old.as_uri())])
    con.commit()
    con.close()

    assert repoint_artifacts(db, old.as_uri(), new.as_uri()) == {"runs": 2, "experiments": 2}
    con = sqlite3.connect(db)
    assert dict(con.execute("SELECT run_uuid, artifact_uri FROM runs")) == {
        "1": "file:///b/mlruns/r1/artifacts", "2": Path("/a/my_repo%_x/mlruns2/x").as_uri(),
        "3": Path("/a/myxrepo%_x/mlruns/r3/artifacts").as_uri(), "4": "/b/mlruns/0/r4/artifacts"}
    assert dict(con.execute("SELECT * FROM experiments")) == {0: "/b/mlruns/0", 1: "file:///b/mlruns"}


def test_repoint_skips_tables_an_older_schema_lacks(tmp_path):
    import sqlite3

    db = tmp_path / "m.db"
    sqlite3.connect(db).execute("CREATE TABLE runs (run_uuid TEXT)").connection.commit()
    assert repoint_artifacts(db, "file:///a/mlruns", "file:///b/mlruns") == {}
