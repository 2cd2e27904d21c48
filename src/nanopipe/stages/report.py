"""The `report` stage: metrics/report.md, the run's report card (nanochat's report.py).

Every stage writes its own section (metrics/sections/<stage>.md) and metrics file
(metrics/<stage>.json) when it finishes; this stage only assembles them:

1. a header: git commit and dirty state, hardware (CPU, GPUs via torch.cuda), Python,
   torch and key dependency versions, and the size of the code in src/;
2. every lifecycle stage's section, in lifecycle order. A stage without a section is
   listed as "not run", never silently dropped (nanochat dropped its SFT section over a
   name mismatch); sections on disk under any other name are appended too;
3. a summary: the headline metrics (val bpb, CORE, per-task accuracies with their sample sizes and
   confidence intervals, and ChatCORE per chat model), stage wall times and a cost estimate from the configured hourly rates;
4. pictures beside the sections (nanopipe.charts): the training curves of pretrain, SFT and RL from
   their plot files (metrics/<stage>/*.csv) and chat_eval's accuracies, as metrics/report/<stage>.png.

It reads metrics and plot files only, never checkpoints or data, and writes only its own outputs
(metrics/report.md, metrics/report.json, metrics/sections/report.md, metrics/report/), so running it
never invalidates an upstream stage.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping

from nanopipe import artifacts, charts, paths
from nanopipe.stage import Stage, fmt_acc, fmt_num, wilson

log = logging.getLogger("nanopipe.report")

PARAMS = ["report"]

# The lifecycle, in order. The report shows each one, run or not.
STAGES = ["download", "tokenizer", "tok_eval", "pretrain", "base_eval", "sft", "rl", "chat_eval", "export"]
REPORT = paths.METRICS / "report.md"
IMAGES = paths.METRICS / "report"  # the charts, linked from report.md as report/<stage>.png
CHART_STAGES = ["pretrain", "sft", "rl", "chat_eval"]
KEY_PACKAGES = ["torch", "dvc", "hydra-core", "omegaconf", "mlflow", "tokenizers", "tiktoken", "rustbpe",
                "pyarrow", "numpy", "datasets", "fastapi", "uvicorn"]
CODE_SUFFIXES = {".py", ".html", ".md", ".yaml", ".toml", ".sh", ".js", ".css"}
# Keys of a chat model's metrics that are bookkeeping, not a score.
CHAT_BOOKKEEPING = {"step", "wall_time_s", "world_size", "problems_per_s", "num_problems", "time_s"}


# ----------------------------------------------------------------------------- header

def run_command(cmd: list[str], cwd: Path, strip: bool = True) -> str | None:
    """stdout of a short command ('' when it printed nothing), None when it failed."""
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return None
    return p.stdout.strip() if strip else p.stdout


def git_info(root: Path) -> dict[str, Any]:
    """Commit, branch, message and dirty state of the checkout at `root`.

    Dirty means code or config the commit does not describe: modified or untracked files,
    except what the pipeline itself writes while it runs (dvc.lock, the metrics/ tree and
    the .gitignore files DVC adds for its outputs), or every pipeline run would be dirty.
    """
    commit = run_command(["git", "rev-parse", "HEAD"], root)
    if not commit:
        return {"commit": "unknown", "short": "unknown", "branch": "unknown", "message": "", "dirty": None, "changed": []}
    # "XY path" lines: the leading columns matter, so no strip; every untracked file, not just its dir
    status = run_command(["git", "status", "--porcelain", "--untracked-files=all"], root, strip=False)
    changed = [p for line in (status or "").splitlines() if not _pipeline_output(p := line[3:].strip('"'))]
    return {
        "commit": commit,
        "short": commit[:7],
        "branch": run_command(["git", "rev-parse", "--abbrev-ref", "HEAD"], root) or "unknown",
        "message": (run_command(["git", "log", "-1", "--pretty=%B"], root) or "").split("\n")[0][:80],
        "dirty": None if status is None else bool(changed),
        "changed": changed,
    }


def _pipeline_output(path: str) -> bool:
    path = path.split(" -> ")[-1]  # renames: "old -> new"
    return path == "dvc.lock" or path.startswith(f"{paths.METRICS}/") or Path(path).name == ".gitignore"


def gpu_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"available": False, "count": 0}
    if not torch.cuda.is_available():
        return {"available": False, "count": 0}
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {"available": True, "count": len(props), "names": [p.name for p in props],
            "memory_gb": [p.total_memory / 1024**3 for p in props], "cuda_version": torch.version.cuda or "unknown"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info() -> dict[str, Any]:
    import psutil

    return {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": psutil.cpu_count(logical=False),
            "cpu_count_logical": psutil.cpu_count(logical=True), "memory_gb": psutil.virtual_memory().total / 1024**3,
            "python": platform.python_version()}


def package_versions(names: list[str] = KEY_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def code_size(src: Path) -> dict[str, int]:
    """Files, lines and characters of the source tree (nanochat's "bloat" numbers)."""
    files = lines = chars = 0
    for path in sorted(src.rglob("*")):
        parts = path.relative_to(src).parts
        if not path.is_file() or path.suffix not in CODE_SUFFIXES or any(
                p == "__pycache__" or p.endswith(".egg-info") or p.startswith(".") for p in parts):
            continue
        data = path.read_bytes()
        files += 1
        lines += data.count(b"\n")
        chars += len(data)
    return {"files": files, "lines": lines, "chars": chars, "tokens_approx": chars // 4}


def header(git: Mapping[str, Any], gpu: Mapping[str, Any], system: Mapping[str, Any],
           versions: Mapping[str, str], code: Mapping[str, int], rate_line: str) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    exp = os.environ.get("DVC_EXP_NAME")
    dirty = {True: f"dirty: {len(git['changed'])} changed path(s)", False: "clean", None: "state unknown"}[git["dirty"]]
    lines = ["# nanopipe run report", "", f"Generated: {now}" + (f" (DVC experiment `{exp}`)" if exp else ""), "",
             "## Environment", "", "### Git", "",
             f"- Branch: {git['branch']}", f"- Commit: {git['commit']} ({dirty})", f"- Message: {git['message']}"]
    if git["dirty"]:
        shown = git["changed"][:10]
        lines.append(f"- Changed: {', '.join(shown)}" + (f" and {len(git['changed']) - 10} more" if len(git["changed"]) > 10 else ""))
    lines += ["", "### Hardware", "", f"- Platform: {system['platform']}",
              f"- CPU: {system['cpu']}, {system['cpu_count']} cores ({system['cpu_count_logical']} logical)",
              f"- Memory: {system['memory_gb']:.1f} GB"]
    if gpu["available"]:
        lines += [f"- GPUs: {gpu['count']}x {', '.join(sorted(set(gpu['names'])))}",
                  f"- GPU memory: {sum(gpu['memory_gb']):.1f} GB total", f"- CUDA: {gpu['cuda_version']}"]
    else:
        lines.append("- GPUs: none available")
    lines += [f"- Hourly rate: {rate_line}", "", "### Software", "", f"- Python: {system['python']}"]
    lines += [f"- {name}: {v}" for name, v in versions.items()]
    lines += ["", "### Code size (src/)", "", f"- Files: {code['files']:,}", f"- Lines: {code['lines']:,}",
              f"- Characters: {code['chars']:,}", f"- Tokens (approx): {code['tokens_approx']:,}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- cost

def hourly_rate(gpus_per_node: int, gpu_hourly_rate: float, cpu_hourly_rate: float) -> tuple[float, str]:
    """USD per hour of one node, and how it was reckoned."""
    if gpus_per_node > 0:
        rate = gpus_per_node * gpu_hourly_rate
        return rate, f"${rate:.2f}/hour ({gpus_per_node} GPU x ${gpu_hourly_rate:.2f})"
    return cpu_hourly_rate, f"${cpu_hourly_rate:.2f}/hour (CPU)"


def stage_cost(wall_time_s: float, world_size: int, gpus_per_node: int, gpu_hourly_rate: float,
               cpu_hourly_rate: float) -> dict[str, float]:
    """Device-hours and USD of one stage.

    On GPUs a stage is billed for its world size (one GPU per rank), but never for less
    than one whole node: a single-process stage on an 8-GPU node still holds the node.
    On CPU, cpu_hourly_rate is per machine and the ranks of a stage share it.
    """
    hours = wall_time_s / 3600
    if gpus_per_node > 0:
        gpus = max(world_size, gpus_per_node)
        return {"hours": hours, "device_hours": hours * gpus, "cost_usd": hours * gpus * gpu_hourly_rate}
    return {"hours": hours, "device_hours": hours, "cost_usd": hours * cpu_hourly_rate}


def fmt_usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------- reading stage outputs

def read_stage(root: Path, stage: str) -> dict[str, Any]:
    """{'section': text | None, 'metrics': dict | None, 'error': str | None} of one stage."""
    out: dict[str, Any] = {"section": None, "metrics": None, "error": None}
    section, metrics = root / paths.section_file(stage), root / paths.metrics_file(stage)
    if section.exists():
        out["section"] = section.read_text(encoding="utf-8")
    if metrics.exists():
        try:
            data = json.loads(metrics.read_text(encoding="utf-8"))
            out["metrics"] = data if isinstance(data, dict) else None
            if out["metrics"] is None:
                out["error"] = f"{metrics}: expected a JSON object"
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            out["error"] = f"{metrics}: not valid JSON ({e})"
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return float(v)


def chat_scores(chat: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """{model: {task: score}} from metrics/chat_eval.json.

    chat_eval writes {source: {task: accuracy, "ChatCORE": ..., ...}, ...}. Read
    defensively: every numeric entry of a per-model object counts as a score, except
    bookkeeping (step, timings); nested objects (per-task counts) and strings are skipped.
    Numeric top-level entries that look like scores go in a `chat` column.
    """
    if not chat:
        return {}
    columns: dict[str, dict[str, float]] = {}
    for key, value in chat.items():
        if isinstance(value, Mapping):
            scores = {k: n for k, v in value.items()
                      if k not in CHAT_BOOKKEEPING and not k.endswith("_s") and (n := _number(v)) is not None}
            if scores:
                columns[key] = scores
        elif key not in CHAT_BOOKKEEPING and not key.endswith("_s") and (n := _number(value)) is not None:
            columns.setdefault("chat", {})[key] = n
    return columns


def chat_counts(chat: Mapping[str, Any] | None) -> dict[str, dict[str, dict[str, int]]]:
    """{model: {task: {"passed", "total"}}} from metrics/chat_eval.json's per-model `counts`."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for key, value in (chat or {}).items():
        if isinstance(value, Mapping) and isinstance(value.get("counts"), Mapping):
            out[key] = {t: {"passed": int(c["passed"]), "total": int(c["total"])} for t, c in value["counts"].items()
                        if isinstance(c, Mapping) and _number(c.get("passed")) is not None and _number(c.get("total"))}
    return out


def bpb_note(stage_data: Mapping[str, Mapping[str, Any]]) -> str | None:
    """What the summary's "val bpb" is, and pretrain's own val bpb beside it: both are bits per byte on
    the val shard, but base_eval measures the final base model over base_eval.eval_tokens, pretrain
    its in-training estimate over pretrain.eval_tokens (fewer, by default), so the two differ."""
    pre, base = (stage_data.get("pretrain", {}).get("metrics") or {}), (stage_data.get("base_eval", {}).get("metrics") or {})

    def tokens(m):
        return f" over the first {m['val_bpb_tokens']:,} tokens" if isinstance(m.get("val_bpb_tokens"), int) else ""

    parts = []
    if _number(base.get("val_bpb")) is not None:
        parts.append(f"val bpb (base_eval): bits per byte of the final base model on the val shard{tokens(base)}")
        if _number(pre.get("final_val_bpb")) is not None:
            parts.append(f"pretrain's own val bpb, {fmt_num(pre['final_val_bpb'])}, is its in-training estimate{tokens(pre)}")
    elif _number(pre.get("final_val_bpb")) is not None:
        parts.append(f"val bpb (pretrain): pretrain's in-training estimate on the val shard{tokens(pre)} (base_eval has not run)")
    return "; ".join(parts) + "." if parts else None


def not_measured(stage_data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per headline number that could not be measured (CORE without its bundle, a chat task
    without its data or sandbox), with the reason the stage recorded, so an absent row is explained."""
    lines = []
    base = stage_data.get("base_eval", {}).get("metrics") or {}
    if base and base.get("core_metric") is None and isinstance(base.get("core_unavailable"), str):
        lines.append(f"CORE: not measured: {base['core_unavailable']}")
    unavailable = (stage_data.get("chat_eval", {}).get("metrics") or {}).get("unavailable")
    if isinstance(unavailable, Mapping):
        lines += [f"{task}: not measured: {reason}" for task, reason in unavailable.items()]
    return lines


def build_charts(root: Path) -> dict[str, bytes]:
    """{file name: PNG} of the charts the stage outputs under `root` allow: a stage with its metrics file
    and curves (or, for chat_eval, counts) has one."""
    images = {}
    for stage in CHART_STAGES:
        metrics = read_stage(root, stage)["metrics"]
        if metrics is None:  # not run (or failed: no metrics file): its plot files, if any, are not a result
            continue
        if stage == "chat_eval":
            counts = {m: {t: {**c, **dict(zip(("lo", "hi"), wilson(c["passed"], c["total"])))} for t, c in tasks.items()}
                      for m, tasks in chat_counts(metrics).items()}
            png = charts.accuracy_chart(counts)
        else:
            png = charts.curve_chart(root, stage)
        if png:
            images[f"{stage}.png"] = png
    return images


def headline(stage_data: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The summary table: {column: {metric: value}}; columns base, then the chat models."""
    def metric(stage: str, key: str) -> float | None:
        return _number((stage_data.get(stage, {}).get("metrics") or {}).get(key))

    base: dict[str, float] = {}
    # base_eval measures on more tokens than pretrain's final eval; fall back to pretrain's.
    for name, candidates in (("val bpb", [("base_eval", "val_bpb"), ("pretrain", "final_val_bpb")]),
                             ("train bpb", [("base_eval", "train_bpb")]),
                             ("CORE", [("base_eval", "core_metric"), ("pretrain", "core_metric")])):
        for stage, key in candidates:
            if (v := metric(stage, key)) is not None:
                base[name] = v
                break
    table = {"base": base} if base else {}
    table.update(chat_scores(stage_data.get("chat_eval", {}).get("metrics")))
    return table


def _row_order(name: str) -> tuple:
    # nanochat's order (CORE first, ChatCORE last), with the bpb rows ahead of CORE
    return (name not in ("val bpb", "train bpb"), name != "CORE", name == "ChatCORE", name.lower())


def summary_table(table: Mapping[str, Mapping[str, float]], counts: Mapping[str, Mapping[str, Mapping[str, int]]] = {},
                  labels: Mapping[str, str] = {}) -> str:
    """The headline table: numbers rounded (fmt_num), an accuracy with its sample size and standard
    error where chat_eval recorded its counts (fmt_acc), a row shown under `labels[row]` if given."""
    if not table:
        return "_No headline metrics yet (pretrain, base_eval or chat_eval has not run)._\n"
    columns = sorted(table, key=lambda c: (["base", "sft", "rl"].index(c) if c in ("base", "sft", "rl") else 3, c))
    rows = sorted({m for c in columns for m in table[c]}, key=_row_order)

    def cell(c, r):
        if r not in table[c]:
            return "-"
        n = (counts.get(c) or {}).get(r)
        return fmt_acc(n["passed"], n["total"]) if n else fmt_num(table[c][r])

    cells = {(c, r): cell(c, r) for c in columns for r in rows}
    width = max(15, *(len(labels.get(r, r)) for r in rows))
    widths = {c: max(8, len(c), *(len(cells[c, r]) for r in rows)) for c in columns}
    lines = [f"| {'Metric'.ljust(width)} |" + "".join(f" {c.upper():<{widths[c]}} |" for c in columns),
             f"|{'-' * (width + 2)}|" + "".join(f"{'-' * (widths[c] + 2)}|" for c in columns)]
    for r in rows:
        lines.append(f"| {labels.get(r, r).ljust(width)} |" + "".join(f" {cells[c, r]:<{widths[c]}} |" for c in columns))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- assembly

def build(root: Path, gpu_hourly_rate: float, cpu_hourly_rate: float, gpus_per_node: int = -1,
          env: Mapping[str, Any] | None = None, images: Any = ()) -> tuple[str, str, dict[str, Any]]:
    """(report markdown, summary markdown, metrics) from the stage outputs under `root`.

    `env` replaces the probes of this machine (git, gpu, system, versions, code), for tests. `images`:
    the chart file names written to IMAGES (build_charts), each linked under its stage's section.
    """
    env = dict(env or {})
    git = env.get("git") or git_info(root)
    gpu = env.get("gpu") or gpu_info()
    if gpus_per_node < 0:
        gpus_per_node = gpu["count"]
    rate, rate_line = hourly_rate(gpus_per_node, gpu_hourly_rate, cpu_hourly_rate)
    code = env.get("code") or code_size(root / "src")
    top = header(git, gpu, env.get("system") or system_info(), env.get("versions") or package_versions(), code, rate_line)

    data = {s: read_stage(root, s) for s in STAGES}
    known = {f"{s}.md" for s in [*STAGES, "report"]}
    extra = sorted(p.stem for p in (root / paths.SECTIONS).glob("*.md") if p.name not in known) \
        if (root / paths.SECTIONS).is_dir() else []
    for s in extra:  # a section under a name we do not know is still shown, never dropped
        data[s] = read_stage(root, s)

    status_rows, body, costs = [], [], {}
    for s in [*STAGES, *extra]:
        d, m = data[s], data[s]["metrics"] or {}
        if d["section"] is None and d["metrics"] is None and d["error"] is None:
            status_rows.append(f"| {s} | not run | - | - | - |")
            body.append(f"## {s}\n\n_not run_: no {paths.section_file(s)} or {paths.metrics_file(s)}\n")
            continue
        wall, world = _number(m.get("wall_time_s")), int(_number(m.get("world_size")) or 1)
        if wall is not None:
            costs[s] = stage_cost(wall, world, gpus_per_node, gpu_hourly_rate, cpu_hourly_rate)
        status = "ok" if d["section"] is not None and d["metrics"] is not None else \
            ("metrics unreadable" if d["error"] else ("no metrics file" if d["metrics"] is None else "no section"))
        status_rows.append(f"| {s} | {status} | {fmt_duration(wall) if wall is not None else '-'} | {world} | "
                           f"{fmt_usd(costs[s]['cost_usd']) if s in costs else '-'} |")
        section = (d["section"] or f"## {s}\n\n_{paths.section_file(s)} is missing; the metrics file exists._\n").rstrip()
        if d["error"]:
            section += f"\n\n_{d['error']}_"
        if f"{s}.png" in images:
            section += f"\n\n![{s} charts]({IMAGES.name}/{s}.png)"
        body.append(section + "\n")

    table = headline(data)
    counts = chat_counts(data["chat_eval"]["metrics"])
    base = data["base_eval"]["metrics"] or {}
    labels = {"val bpb": "val bpb (base_eval)" if _number(base.get("val_bpb")) is not None else "val bpb (pretrain)",
              "train bpb": "train bpb (base_eval)"}
    note = bpb_note(data)
    total_s = sum(c["hours"] for c in costs.values()) * 3600
    total_cost = sum(c["cost_usd"] for c in costs.values())
    device_hours = sum(c["device_hours"] for c in costs.values())
    missing = [s for s in STAGES if data[s]["section"] is None and data[s]["metrics"] is None]
    summary = "\n".join([
        summary_table(table, counts, labels).rstrip(), "",
        *([note, ""] if note else []),
        *(["Accuracies: passed/problems = accuracy (95 % Wilson confidence interval).", ""] if counts else []),
        *([*(f"- {line}" for line in not_measured(data)), ""] if not_measured(data) else []),
        f"Total wall clock time: {fmt_duration(total_s)} over {len(costs)} stage(s) "
        f"({device_hours:.2f} {'GPU' if gpus_per_node > 0 else 'machine'}-hours)",
        f"Estimated cost: {fmt_usd(total_cost)} at {rate_line}",
        f"Not run: {', '.join(missing)}" if missing else "All stages ran.",
    ])
    stages_table = "\n".join(["## Stages", "", "| stage | status | wall time | world size | cost |",
                              "|---|---|---:|---:|---:|", *status_rows, ""])
    report = "\n".join([top, stages_table, "---", "", *body, "## Summary", "", summary, ""])
    # numbers only (DVC compares metrics files); the commit and the missing stages' names are in
    # report.md and in the MLflow run's tags
    metrics = {
        "stages_run": len(STAGES) - len(missing), "stages_not_run": len(missing),
        "total_wall_time_s": round(total_s, 3), "device_hours": device_hours, "estimated_cost_usd": total_cost,
        "hourly_rate_usd": rate, "gpus_per_node": gpus_per_node, "code_lines": code["lines"], "code_files": code["files"],
        **({"git_dirty": int(git["dirty"])} if git["dirty"] is not None else {}), "summary": table,
    }
    return report, summary, metrics


def run(st: Stage) -> None:
    r = st.cfg.report
    images = build_charts(Path.cwd())
    report, summary, metrics = build(Path.cwd(), r.gpu_hourly_rate, r.cpu_hourly_rate, r.gpus_per_node, images=images)
    with artifacts.atomic_dir(IMAGES) as tmp:  # the whole folder at once: no stale chart of a stage that did not run
        for name, png in images.items():
            (tmp / name).write_bytes(png)
    artifacts.write_text(REPORT, report)
    st.tracker.log_artifact(REPORT)
    st.tracker.log_dir(IMAGES, IMAGES.name)
    log.info("wrote %s (%d of %d stages ran)", REPORT, metrics["stages_run"], len(STAGES))
    print(summary)
    st.finish(metrics, summary)
