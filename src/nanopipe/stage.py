"""The stage contract: how every lifecycle step runs.

Each DVC stage is one module `nanopipe.stages.<name>` (named exactly as in dvc.yaml) that declares

    PARAMS = ["model", "pretrain", *DEVICE_PARAMS]   # its `params:` in dvc.yaml, key for key
    def run(st: Stage) -> None: ...                   # the work

and `nanopipe <name>` / `python stages/launch.py <name>` call `main(module)`, which owns the process:

1. params.yaml (+ Hydra overrides) is loaded and validated (`nanopipe.config`); logging is set up once;
2. `st.cfg` holds only the keys the stage declares, so a stage cannot read config that DVC does not
   track for it (`tests/test_layout.py` checks PARAMS against dvc.yaml);
3. `st.dev` (first use) seeds, picks the device and joins the torchrun process group;
4. one MLflow run per execution: `st.log(...)` for curves (also rows of `metrics/<stage>/<plot>.csv`),
   `st.finish(metrics, report_md)` writes `metrics/<stage>.json` and `metrics/sections/<stage>.md`
   atomically on rank 0, the metrics stamped with the fingerprints of the artifacts the stage read and
   wrote (`lineage`, docs/decisions.md D21);
5. on every exit path (an exception, Ctrl-C) the MLflow run is closed (FAILED unless `finish` ran;
   KILLED on SIGTERM, which torchrun and SLURM send) and the process group is torn down; no metrics
   file is written for a failed stage, so DVC never caches half a stage. A run whose process died
   without closing it (kill -9) is marked KILLED when the stage next starts (nanopipe.tracking).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from nanopipe import artifacts, paths
from nanopipe.config import ConfigError, OverrideError, load_config, select
from nanopipe.runtime import (
    Device,
    check_shared_workdir,
    die_with_parent,
    get_dist_info,
    is_multi_node,
    set_progress_interval,
    setup_device,
    setup_logging,
)
from nanopipe.tracking import Tracker, flatten, git_commit, source_tags

log = logging.getLogger("nanopipe")

# The runtime keys a stage that computes on a device declares (they can change its numbers).
DEVICE_PARAMS = ["runtime.device", "runtime.dtype", "runtime.seed", "runtime.threads"]
# ... and a training stage too: the world size changes the data order, hence the weights.
WORLD_PARAMS = [*DEVICE_PARAMS, "runtime.nproc_per_node", "runtime.nnodes"]


class Stage:
    def __init__(self, module: ModuleType, cfg: DictConfig, options: Any = None):
        self.name = module.__name__.rsplit(".", 1)[-1]
        self.cfg = select(cfg, module.PARAMS)
        self.options = options
        _, self.rank, _, self.world_size = get_dist_info()
        self.rank0 = self.rank == 0
        t = cfg.tracking
        self.tracker = Tracker(t.enabled and self.rank0 and getattr(module, "TRACKED", True), t.uri, t.experiment,
                               t.log_artifacts)
        self._dev: Device | None = None
        self._plots: dict[str, list[dict[str, Any]]] = {}
        self._t0 = 0.0

    @property
    def dev(self) -> Device:
        """The device and process group, set up on first use (stages without tensors never pay for it)."""
        if self._dev is None:
            rt = self.cfg.runtime
            self._dev = setup_device(rt.device, rt.dtype, rt.seed, rt.threads)
            check_shared_workdir(Path.cwd())  # several nodes: every one must see the files rank 0 writes
        return self._dev

    def __enter__(self) -> "Stage":
        self._t0 = time.time()
        exp = os.environ.get("DVC_EXP_NAME", "")
        commit = git_commit()
        tags = {"stage": self.name, "git_commit": commit, "dvc_exp": exp or "workspace", "world_size": str(self.world_size),
                **source_tags(self.name, commit)}
        self.tracker.start(run_name=f"{exp}/{self.name}" if exp else self.name, tags=tags,
                           params=flatten(OmegaConf.to_container(self.cfg, resolve=True)),
                           texts={"config.yaml": OmegaConf.to_yaml(self.cfg)})
        log.info("stage %s: started (world size %d)", self.name, self.world_size)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.tracker.end("FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, Terminated) else "FAILED")
        finally:
            if self._dev is not None:
                self._dev.close()
        if exc_type is None:
            log.info("stage %s: done in %.1f s", self.name, time.time() - self._t0)

    # -- curves ---------------------------------------------------------------------------------

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

    # -- outputs --------------------------------------------------------------------------------

    def finish(self, metrics: Mapping[str, Any], report: str = "", name: str | None = None) -> None:
        """Write the stage's metrics file and report section; log both to MLflow. `name` writes them as
        metrics/<name>.json and sections/<name>.md instead: a run that is not the DVC stage's own (base_eval
        of an outside model) must never overwrite the files DVC tracks for the stage."""
        if not self.rank0:
            return
        self.flush_plots()
        name = name or self.name
        metrics = {**metrics, "wall_time_s": round(time.time() - self._t0, 3), "world_size": self.world_size}
        # the DVC stage's own file only: a run under another name (an outside model) read other inputs
        if name == self.name and self.name in paths.LINEAGE:
            metrics["lineage"] = lineage(self.name)
        section = f"## {name}\n\n{report.strip()}\n" if report else f"## {name}\n"
        artifacts.write_text(paths.section_file(name), section)
        artifacts.write_json(paths.metrics_file(name), metrics)
        self.tracker.log_metrics(flatten(metrics))
        self.tracker.log_artifact(paths.metrics_file(name))
        self.tracker.log_artifact(paths.section_file(name))
        for plot in self._plots:
            self.tracker.log_artifact(paths.plot_file(self.name, plot), "plots")


def lineage(stage: str) -> dict[str, dict[str, str | None]]:
    """The fingerprints of the artifacts a stage read and wrote (paths.LINEAGE), recorded in its metrics
    file: `nanopipe.experiments show` flags an experiment's metrics as inherited when the artifacts they
    were computed from are not the ones that experiment produced (docs/decisions.md, D21)."""
    inputs, outputs = paths.LINEAGE[stage]
    return {"inputs": {str(p): artifacts.fingerprint(p) for p in inputs},
            "outputs": {str(p): artifacts.fingerprint(p) for p in outputs}}


def fmt(x, spec: str = ".4f") -> str:
    """A number for a report section: `n/a` when missing or not finite."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def fmt_num(x, decimals: int = 4) -> str:
    """A number rounded for reading: integers with thousands separators; floats to `decimals` places
    below 100, one place below 1000, none above (with separators), in scientific notation when tiny;
    `n/a` when missing or not finite. 1.231232290625794 -> 1.2312, 6321.65 -> 6,322, 162.19 -> 162.2."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return "n/a"
    if x == 0:
        return f"{0:.{decimals}f}"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a < 10 ** -decimals:
        return f"{x:.2e}"
    return f"{x:.{decimals}f}"


def wilson(passed: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy (95 % at z=1.96): unlike p ± z·SE it stays inside
    [0, 1] and is not zero-width at 0/n or n/n, where a small sample says least."""
    p, n = passed / total, total
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fmt_acc(passed: int, total: int) -> str:
    """An accuracy with its sample size and 95 % confidence interval: `4/8 = 50.0 % (95 % CI 21.5-78.5)`."""
    if not total:
        return "n/a (0 problems)"
    lo, hi = wilson(passed, total)
    return f"{passed}/{total} = {100 * passed / total:.1f} % (95 % CI {100 * lo:.1f}-{100 * hi:.1f})"


def run_stage(module: ModuleType, cfg: DictConfig, options: Any = None) -> None:
    """Run one stage module on a validated config, inside the contract."""
    with Stage(module, cfg, options) as st:
        if is_multi_node():
            st.dev  # noqa: B018 (a property with an effect:) join the other nodes and check they share the working directory before anyone reads an input
        module.run(st)


class Terminated(SystemExit):
    """SIGTERM (torchrun ending the other ranks of a failed run, SLURM's scancel, a plain `kill`): unwinds the
    stage like an exception, so the contract closes its MLflow run (KILLED) and its process group."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated(128 + signum)


def main(module: ModuleType, argv: list[str]) -> None:
    """`nanopipe <stage> [--option ...] [key=value ...]`: the stage on params.yaml plus overrides."""
    setup_logging()
    die_with_parent()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    # before CUDA's allocator starts; nanochat base_train.py @1ec0a34 sets it (fragmentation OOMs without it)
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    name = module.__name__.rsplit(".", 1)[-1]
    try:
        options, overrides = _split_options(argv)
        if options and not hasattr(module, "parse_options"):
            raise ConfigError(f"takes no options ({' '.join(options)}); configure it with key=value overrides")
        cfg = load_config(overrides)
        set_progress_interval(cfg.runtime.progress_interval)  # read outside PARAMS on purpose (D17)
        parsed = module.parse_options(options, select(cfg, module.PARAMS)) if hasattr(module, "parse_options") else None
        run_stage(module, cfg, parsed)
    # bad input, a full disk, a diverged loss: one line naming the key, the file or the step, no traceback
    except OverrideError as e:  # a mistyped command line: a usage error, exit 2 as argparse
        print(f"nanopipe {name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ConfigError, artifacts.MissingInput, artifacts.StageFailed) as e:
        raise SystemExit(f"nanopipe {name}: {e}") from None


def _split_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """Options of the command itself (`--name value`, `--name=value`) come before the overrides."""
    rest, options = list(argv), []
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        options.append(opt)
        if "=" not in opt and rest:
            options.append(rest.pop(0))
    return options, rest
