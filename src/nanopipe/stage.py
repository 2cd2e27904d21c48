"""The stage contract every lifecycle step follows.

    with Stage("download", cfg, sections=["data"]) as st:
        ...work...                      # st.log({...}, step) for curves, st.rank0 gates writes
        st.finish(metrics, report_md)   # metrics/<stage>.json + metrics/sections/<stage>.md

One MLflow run per execution (params = the config sections the stage reads, plus
runtime), periodic metrics to MLflow and to the stage's plot CSVs, and the final
metrics file and report section written atomically on rank 0 only. If the work raises,
the MLflow run is marked FAILED and no metrics file is written, so DVC never caches a
half-finished stage.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
import time
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from nanopipe import artifacts, paths
from nanopipe.tracking import Tracker, flatten, git_commit

log = logging.getLogger("nanopipe")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [{'rank%d' % rank if 'RANK' in os.environ else 'nanopipe'}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("rustbpe").setLevel(logging.WARNING)  # per-merge progress lines


class Stage:
    def __init__(self, name: str, cfg: DictConfig, sections: Iterable[str]):
        self.name = name
        self.cfg = cfg
        self.sections = list(sections)
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank0 = self.rank == 0
        t = cfg.tracking
        self.tracker = Tracker(t.enabled and self.rank0, t.uri, t.experiment, t.log_artifacts)
        self._plots: dict[str, list[dict[str, Any]]] = {}
        self._t0 = 0.0

    def params(self) -> dict[str, Any]:
        """The config this stage depends on, flattened (`model.depth`, ...)."""
        used = {s: OmegaConf.to_container(self.cfg[s], resolve=True) for s in [*self.sections, "runtime"]}
        return flatten(used)

    def __enter__(self) -> "Stage":
        self._t0 = time.time()
        exp = os.environ.get("DVC_EXP_NAME", "")
        tags = {"stage": self.name, "git_commit": git_commit(), "dvc_exp": exp or "workspace", "world_size": str(self.world_size)}
        self.tracker.start(run_name=f"{exp}/{self.name}" if exp else self.name, tags=tags, params=self.params(),
                           texts={"config.yaml": OmegaConf.to_yaml(self.cfg)})
        log.info("stage %s: started (world size %d)", self.name, self.world_size)
        return self

    def log(self, metrics: Mapping[str, Any], step: int | None = None, plot: str | None = None) -> None:
        """Record step metrics: to MLflow, and as a row of `metrics/<stage>/<plot>.csv`."""
        if not self.rank0:
            return
        self.tracker.log_metrics(metrics, step=step)
        if plot is not None:
            row = {"step": step, **metrics} if step is not None else dict(metrics)
            self._plots.setdefault(plot, []).append(row)

    def plot_rows(self) -> dict[str, list[dict[str, Any]]]:
        """The plot rows logged so far (saved in resume checkpoints)."""
        return {name: list(rows) for name, rows in self._plots.items()}

    def restore_plots(self, rows: dict[str, list[dict[str, Any]]], before_step: int) -> None:
        """Take back the rows of an interrupted run, up to the step it resumes from."""
        self._plots = {name: [r for r in rs if r.get("step") is None or r["step"] < before_step] for name, rs in rows.items()}

    def flush_plots(self) -> None:
        """Rewrite the plot CSVs (atomically) from the rows logged so far."""
        if not self.rank0:
            return
        for name, rows in self._plots.items():
            fields: list[str] = []
            for r in rows:
                fields += [k for k in r if k not in fields]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
            artifacts.write_text(paths.plot_file(self.name, name), buf.getvalue())

    def finish(self, metrics: Mapping[str, Any], report: str = "") -> None:
        """Write the stage's metrics file and report section; log both to MLflow."""
        if not self.rank0:
            return
        self.flush_plots()
        metrics = {**metrics, "wall_time_s": round(time.time() - self._t0, 3), "world_size": self.world_size}
        section = f"## {self.name}\n\n{report.strip()}\n" if report else f"## {self.name}\n"
        artifacts.write_text(paths.section_file(self.name), section)
        artifacts.write_json(paths.metrics_file(self.name), metrics)
        self.tracker.log_metrics(flatten(metrics))
        self.tracker.log_artifact(paths.metrics_file(self.name))
        self.tracker.log_artifact(paths.section_file(self.name))
        for name in self._plots:
            self.tracker.log_artifact(paths.plot_file(self.name, name), "plots")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.tracker.end("FAILED" if exc_type else "FINISHED")
        if exc_type is None:
            log.info("stage %s: done in %.1f s", self.name, time.time() - self._t0)
