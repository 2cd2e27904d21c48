"""MLflow tracking for every stage, failure-tolerant.

One MLflow run per stage execution, in the experiment named by `tracking.experiment`,
tagged with the stage, the git commit and the DVC experiment name (DVC sets
$DVC_EXP_NAME for `dvc exp run`). The default store is `sqlite:///<repo>/mlflow.db`,
which is what `mlflow ui` opens in the repo root. Queued DVC experiments run in a temp
copy of the repo; DVC points $DVC_ROOT at the real one, so their runs land in the same
store. A tracking failure is logged and ignored: it must never cost a stage its outputs.
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("nanopipe.tracking")


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


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


class Tracker:
    """Thin wrapper over the MLflow fluent API; every call swallows tracking errors."""

    def __init__(self, enabled: bool, uri: str | None, experiment: str, log_artifacts: bool = True):
        self.enabled = enabled
        self.uri = tracking_uri(uri) if enabled else None
        self.experiment = experiment
        self.log_artifacts = log_artifacts
        self.run_id: str | None = None
        self._mlflow = None

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled or self._mlflow is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never break a stage
            log.warning("MLflow %s failed (%s: %s); continuing without it", what, type(e).__name__, e)
            return None

    def start(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            import mlflow

            for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
                logging.getLogger(name).setLevel(logging.WARNING)
            mlflow.set_tracking_uri(self.uri)
            if self.uri.startswith("sqlite:") and mlflow.get_experiment_by_name(self.experiment) is None:
                # Artifacts next to the store, not in the cwd: queued `dvc exp run`s execute in temp
                # copies of the repo that DVC deletes afterwards.
                try:
                    mlflow.create_experiment(self.experiment, artifact_location=(repo_root() / "mlruns").as_uri())
                except Exception:  # noqa: BLE001 - another stage may have created it meanwhile
                    pass
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=run_name, tags=dict(tags))
            self.run_id = run.info.run_id
            self._mlflow = mlflow
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow unavailable at %s (%s: %s); this stage runs untracked", self.uri, type(e).__name__, e)
            self._mlflow = None
            return
        # MLflow caps param values at 6000 chars; long lists are not worth truncating silently.
        safe = {k: (str(v) if len(str(v)) <= 6000 else str(v)[:5990] + "...") for k, v in params.items()}
        self._call("log_params", self._mlflow.log_params, safe)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self._call("log_metrics", self._mlflow.log_metrics if self._mlflow else None, numeric, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.log_artifacts and Path(path).exists():
            self._call("log_artifact", self._mlflow.log_artifact if self._mlflow else None, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.log_artifacts:
            self._call("log_text", self._mlflow.log_text if self._mlflow else None, text, name)

    def end(self, status: str = "FINISHED") -> None:
        self._call("end_run", self._mlflow.end_run if self._mlflow else None, status=status)
        self._mlflow = None
