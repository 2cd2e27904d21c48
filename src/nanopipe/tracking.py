"""MLflow tracking for every stage, failure-tolerant.

One MLflow run per stage execution, in the experiment named by `tracking.experiment`,
tagged with the stage, the git commit and the DVC experiment name (DVC sets
$DVC_EXP_NAME for `dvc exp run`), MLflow's own source tags (`source_tags`: the UI's "Source" and
"Git commit" columns), and with the process that runs it (`host`, `pid`, `pid_start`): a
run left RUNNING by a process that is gone (kill -9, a lost node) is marked KILLED when the same
stage next starts on that host. The default store is `sqlite:///<repo>/mlflow.db`,
which is what `mlflow ui` opens in the repo root. Queued DVC experiments run in a temp
copy of the repo; DVC points $DVC_ROOT at the real one, so their runs land in the same
store. A tracking failure is logged and ignored: it must never cost a stage its outputs.

The store survives a move of the repo (docs/decisions.md D18): MLflow writes absolute artifact URIs
into the database (the experiment's location, each run's and each logged model's), so a copied or
moved repo would keep writing artifacts into the old folder. Each run re-points those URIs at the
current repo's mlruns/ first (`repoint_artifacts`) when the store is the repo's own mlflow.db.
"""
from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse
from urllib.request import url2pathname

log = logging.getLogger("nanopipe.tracking")


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


# The experiment's kind: MLflow 3.x UIs that read it (`mlflow.experimentKind`, from mlflow's
# server/js ExperimentKind) open the experiment on its runs, not on the GenAI overview and traces.
# MLflow 3.17's UI ignores the tag for a global "workflow type" switch: see the README's MLflow section.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def repo_store(uri: str) -> Path | None:
    """The database file when `uri` is the repo's own sqlite store (<repo>/mlflow.db), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return db if db.resolve() == (repo_root() / "mlflow.db").resolve() else None


def artifact_root() -> str:
    """Where the repo's store keeps its artifacts: <repo>/mlruns, as the file: URI MLflow stores."""
    return (repo_root() / "mlruns").as_uri()


# Every column where MLflow stores an absolute artifact URI (tables and columns absent from an older
# schema are skipped).
_URI_COLUMNS = [("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
                ("model_versions", "source"), ("model_versions", "storage_location")]


def repoint_artifacts(db: Path, old: str, new: str) -> dict[str, int]:
    """Rewrite the artifact locations under the file: URI `old` to the same places under `new`, in one
    transaction; returns the rows changed per table. MLflow stores some as URIs and some as plain paths
    (the Default experiment's, and locations derived from it), so both spellings are rewritten. Old
    runs' artifacts then read back from the moved copy too."""
    changed: dict[str, int] = {}
    prefixes = [(old, new), (url2pathname(urlparse(old).path), url2pathname(urlparse(new).path))]
    con = sqlite3.connect(db, timeout=60)
    try:
        with con:
            con.execute("BEGIN IMMEDIATE")
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, column in _URI_COLUMNS:
                if table not in tables or column not in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                    continue
                for before, after in prefixes:
                    # a prefix test by substr, not LIKE: a path may hold % or _
                    n = con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                                    (after, len(before) + 1, before, len(before) + 1, before + "/")).rowcount
                    if n:
                        changed[table] = changed.get(table, 0) + n
    finally:
        con.close()
    return changed


def follow_repo(uri: str, location: str | None) -> bool:
    """Re-point the store at this repo when it moved: True when it did. Only the repo's own store,
    and only an artifact root of our layout (a file: URI of an `mlruns` folder) somewhere else."""
    db, new = repo_store(uri), artifact_root()
    if db is None or not location or location == new or not location.startswith("file:") \
            or not location.rstrip("/").endswith("/mlruns"):
        return False
    changed = repoint_artifacts(db, location.rstrip("/"), new)
    log.info("MLflow: the repo moved (artifacts were at %s); re-pointed to %s: %s", location, new,
             ", ".join(f"{n} {t}" for t, n in changed.items()) or "nothing")
    return True


def source_tags(stage: str, commit: str) -> dict[str, str]:
    """MLflow's own source tags (mlflow.utils.mlflow_tags): the run's source and git commit in the UI."""
    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": f"src/nanopipe/stages/{stage}.py",
            "mlflow.source.git.commit": commit}


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), telling a reused pid apart; '' elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Which process runs a stage: what tells, later, whether that run is still alive."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "pid_start": _pid_start(os.getpid())}


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process in a run's `process_tags` still runs: None where this host cannot tell."""
    if tags.get("host") != socket.gethostname() or not str(tags.get("pid", "")).isdigit():
        return None
    pid = int(tags["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists (another user's)
    except OSError:
        return None
    start = tags.get("pid_start")
    return not start or _pid_start(pid) in ("", start)


def mark_dead_runs(client, experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the runs of `stage` still RUNNING although their process is gone; returns their ids."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.stage = '{stage}' and attributes.status = 'RUNNING'",
                              max_results=1000)
    dead = []
    for r in runs:
        if process_alive(r.data.tags) is False:
            client.set_tag(r.info.run_id, "killed", "its process was gone when the stage next started")
            client.set_terminated(r.info.run_id, status="KILLED")
            log.warning("MLflow run %s (%s) was left RUNNING by pid %s, which is gone: marked KILLED", r.info.run_id,
                        r.info.run_name, r.data.tags.get("pid"))
            dead.append(r.info.run_id)
    return dead


class Tracker:
    """MLflow through its client API (thread-safe, explicit run id); every call swallows tracking errors."""

    def __init__(self, enabled: bool, uri: str | None, experiment: str, log_artifacts: bool = True):
        self.enabled = enabled
        self.uri = tracking_uri(uri) if enabled else None
        self.experiment = experiment
        self.log_artifacts = log_artifacts
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None
        self._starting: threading.Thread | None = None

    def start(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any], texts: Mapping[str, str] = {}) -> None:
        """Open the run on a background thread: importing MLflow and opening its store take ~2 s,
        which then overlap with the stage's own start-up. Every later call waits for it."""
        if self.enabled:
            self._starting = threading.Thread(target=self._start, args=(run_name, dict(tags), dict(params), dict(texts)), daemon=True)
            self._starting.start()

    def _start(self, run_name: str, tags: dict, params: dict, texts: dict) -> None:
        try:
            for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
                logging.getLogger(name).setLevel(logging.WARNING)
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is not None:
                exp_id = exp.experiment_id
                follow_repo(self.uri, exp.artifact_location)
                for key, value in EXPERIMENT_TAGS.items():
                    if key not in exp.tags:  # experiments made before the tag; a user's own choice stays
                        client.set_experiment_tag(exp_id, key, value)
            else:
                # Artifacts next to the store, not in the cwd: queued `dvc exp run`s execute in temp
                # copies of the repo that DVC deletes afterwards.
                location = artifact_root() if self.uri.startswith("sqlite:") else None
                try:
                    exp_id = client.create_experiment(self.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
                except Exception:  # noqa: BLE001 - another stage created it meanwhile
                    exp_id = client.get_experiment_by_name(self.experiment).experiment_id
            if tags.get("stage"):
                try:
                    mark_dead_runs(client, exp_id, tags["stage"])
                except Exception as e:  # noqa: BLE001
                    log.warning("MLflow: could not check for runs left RUNNING (%s: %s)", type(e).__name__, e)
            self.run_id = client.create_run(exp_id, run_name=run_name, tags={**tags, **process_tags()}).info.run_id
            self.experiment_id = exp_id
            self._client = client
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow unavailable at %s (%s: %s); this stage runs untracked", self.uri, type(e).__name__, e)
            return
        # MLflow caps param values at 6000 chars and a batch at 100 params.
        items = [Param(k, str(v) if len(str(v)) <= 6000 else str(v)[:5990] + "...") for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("log_batch", "log_batch", params=items[i : i + 100], wait=False)
        for name, text in texts.items():
            self.log_text(text, name, wait=False)

    def _call(self, what: str, fn_name: str, *args, wait: bool = True, **kwargs):
        if wait and self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._client is None:
            return None
        try:
            return getattr(self._client, fn_name)(self.run_id, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never break a stage
            log.warning("MLflow %s failed (%s: %s); continuing without it", what, type(e).__name__, e)
            return None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from_numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if from_numbers and self.enabled:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            batch = [Metric(k, v, ts, step or 0) for k, v in from_numbers.items()]
            for i in range(0, len(batch), 1000):
                self._call("log_metrics", "log_batch", metrics=batch[i : i + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.log_artifacts and Path(path).exists():
            self._call("log_artifact", "log_artifact", str(path), artifact_path)

    def log_dir(self, local_dir: str | os.PathLike, artifact_path: str, exclude: tuple[str, ...] = ()) -> list[str]:
        """Log every file of `local_dir` (recursively) under `artifact_path`, except the names in
        `exclude`; returns the relative paths logged."""
        logged: list[str] = []
        root = Path(local_dir)
        if not (self.enabled and self.log_artifacts) or not root.is_dir():
            return logged
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = f.relative_to(root)
            if rel.name in exclude:
                continue
            sub = "/".join([artifact_path, *rel.parent.parts])
            self._call("log_artifact", "log_artifact", str(f), sub)
            logged.append(rel.as_posix())
        return logged

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._call("set_tag", "set_tag", key, str(value))

    def log_text(self, text: str, name: str, wait: bool = True) -> None:
        if self.log_artifacts:
            self._call("log_text", "log_text", text, name, wait=wait)

    def log_pyfunc(self, name: str, code: str | os.PathLike, artifacts: Mapping[str, str],
                   inputs: list[tuple[str | None, str]], params: list[tuple[str, str, Any]],
                   pip_requirements: list[str]) -> str | None:
        """Log an MLflow pyfunc model "from code" (`code` defines the PythonModel and calls
        mlflow.models.set_model) with this run; its `models:/<id>` URI, None where tracking is off or
        failed (logged). The signature: `inputs` columns (name or None, MLflow type) in, one string per row out,
        `params` (name, MLflow type, default). Requirements are given, not inferred: inferring them
        loads the model in a subprocess."""
        if not (self.enabled and self.log_artifacts):
            return None
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._client is None:
            return None
        try:
            import mlflow
            from mlflow.models import ModelSignature
            from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

            signature = ModelSignature(inputs=Schema([ColSpec(t, n) for n, t in inputs]), outputs=Schema([ColSpec("string")]),
                                       params=ParamSchema([ParamSpec(n, t, d) for n, t, d in params]))
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri

            # Model.log logs through the fluent API's global store: ours for this call only, so the
            # process's own MLflow setting (and $MLFLOW_TRACKING_URI, which set_tracking_uri exports) stays
            # the model entity first, in the run's experiment: given only run_id, Model.log would file it
            # under the Default experiment (it asks the fluent API's active experiment)
            model = self._client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                     params=self._client.get_run(self.run_id).data.params)
            with _use_tracking_uri(self.uri):
                info = mlflow.models.Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=self.run_id,
                                               model_id=model.model_id, python_model=str(code), artifacts=dict(artifacts),
                                               signature=signature, pip_requirements=pip_requirements)
            return info.model_uri
        except Exception as e:  # noqa: BLE001 - tracking must never break a stage
            log.warning("MLflow log_model %s failed (%s: %s); continuing without it", name, type(e).__name__, e)
            return None

    def end(self, status: str = "FINISHED") -> None:
        self._call("end_run", "set_terminated", status=status)
        self._client = None
