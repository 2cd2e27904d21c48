"""Experiment workflows as DVC experiments: the scaling-law study and the depth miniseries.

    python -m nanopipe.experiments scaling --budgets 1e18,2.15e18 --depths 8,10,12 [--run]
    python -m nanopipe.experiments miniseries --depths 10,12,14,16 --ratio 10.5 [--run]
    python -m nanopipe.experiments collect scaling      # -> metrics/scaling/results.csv + scaling.png

`scaling` is nanochat's runs/scaling_laws.sh: for every (FLOP budget, depth) it queues
`dvc exp run --queue -S pretrain.target_flops=F -S model.depth=D ... pretrain`, one named
DVC experiment per pair (`<label>-<F>-d<D>`), so each run is tracked, cached and
reproducible like any other, and lands in MLflow tagged with its experiment name. Pairs
whose experiment already exists are skipped (the script skipped pairs already in its
CSV). `--run` then runs the queue (`dvc exp run --run-all`).

    python -m nanopipe.experiments show [--all-commits] [--params k1,k2]   # the short experiments table
    python -m nanopipe.experiments plots [EXP ...]      # dvc plots diff, without inherited curves

`show` is `dvc exp show` cut to what a researcher reads (at most 15 columns: the name, the params
that differ between the rows, one headline number per stage) and honest about inherited numbers:
a queued experiment that reran only up to pretrain still carries the baseline's sft/rl/chat_eval
metrics files in its commit, and `dvc exp show` lists them as if they were its own. Every metrics
file records the fingerprints of the artifacts it was computed from (`lineage`, written by the
stage contract); a stage whose inputs are not the artifacts this experiment's own upstream stages
produced is *inherited*: its numbers are marked `*` and it is named in the `inherited` column
(docs/decisions.md, D21). `plots` runs `dvc plots diff` once per stage with the curves (dvc.yaml's
top-level `plots:`), over only the experiments whose run of that stage is their own, so that an
experiment that never ran SFT is not drawn with the baseline's SFT curves.

`collect` reads the results from `dvc exp show --json` (each experiment's params and its
metrics/pretrain.json), not from training logs, into a CSV, fits val bpb as a quadratic
in log10(scaling params) per budget to find the compute-optimal model size, and plots
val bpb against params with the fitted optima.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from nanopipe import artifacts, paths

OUT_DIR = Path("metrics")  # results go to metrics/<kind>/
# scaling_laws.sh: budgets 3 per decade, depths 8..20; CORE on full tasks at the last step only.
DEFAULT_BUDGETS = [1e18, 2.15e18, 4.64e18, 1e19]
DEFAULT_DEPTHS = [8, 10, 12, 14, 16, 18, 20]
# Both studies train to a horizon and measure; no samples or intermediate checkpoints.
COMMON_SETS = ["pretrain.sample_every=-1", "pretrain.save_every=-1"]
COLUMNS = ["experiment", "kind", "flops_budget", "target_param_data_ratio", "depth", "model_dim",
           "params_wte", "params_value_embeds", "params_lm_head", "params_transformer", "params_scalars",
           "params_total", "num_scaling_params", "num_iterations", "total_batch_size", "tokens_trained",
           "tokens_per_scaling_param", "flops_per_token", "total_flops", "val_bpb", "min_val_bpb", "core_score",
           "train_time_sec", "wall_time_s", "rev"]


# ----------------------------------------------------------------------------- queueing

def fmt_flops(f: float) -> str:
    """1e18 -> '1e18', 2.15e18 -> '2.15e18' (valid in a git ref, unlike '1e+18')."""
    return f"{f:.3g}".replace("e+", "e")


def _parse_list(text: str, kind=float) -> list:
    try:
        return [kind(float(x)) if kind is int else kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"expected a comma-separated list of numbers, got {text!r}") from None


def scaling_commands(budgets: Iterable[float], depths: Iterable[int], label: str = "scaling",
                     sets: Iterable[str] = (), core: bool = False) -> list[tuple[str, list[str]]]:
    """[(experiment name, dvc argv)] queueing one pretrain run per (budget, depth)."""
    out = []
    core_sets = ["pretrain.core_metric_every=999999", "pretrain.core_metric_max_per_task=-1"] if core \
        else ["pretrain.core_metric_every=-1"]
    for f in budgets:
        for d in depths:
            name = f"{label}-{fmt_flops(f)}-d{d}"
            # the horizon comes from the FLOP budget: num_iterations and the ratio must be off
            s = [f"pretrain.target_flops={f:g}", "pretrain.target_param_data_ratio=-1", "pretrain.num_iterations=-1",
                 f"model.depth={d}", *core_sets, *COMMON_SETS, *sets]
            out.append((name, _queue_argv(name, s)))
    return out


def miniseries_commands(depths: Iterable[int], ratio: float, label: str = "miniseries",
                        sets: Iterable[str] = (), core: bool = False) -> list[tuple[str, list[str]]]:
    """[(experiment name, dvc argv)]: a depth series, each trained to tokens = ratio x scaling params."""
    out = []
    core_sets = ["pretrain.core_metric_every=999999", "pretrain.core_metric_max_per_task=-1"] if core \
        else ["pretrain.core_metric_every=-1"]
    for d in depths:
        name = f"{label}-r{ratio:g}-d{d}"
        s = [f"pretrain.target_param_data_ratio={ratio:g}", "pretrain.target_flops=-1", "pretrain.num_iterations=-1",
             f"model.depth={d}", *core_sets, *COMMON_SETS, *sets]
        out.append((name, _queue_argv(name, s)))
    return out


def _queue_argv(name: str, sets: list[str]) -> list[str]:
    argv = ["dvc", "exp", "run", "--queue", "--name", name]
    for s in sets:
        argv += ["-S", s]
    return argv + ["pretrain"]


def dvc_json(args: list[str], cwd: Path = Path(".")) -> Any:
    p = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"`dvc {' '.join(args)}` failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout or "[]")


def existing_experiments(exp_show: list) -> set[str]:
    return {e.get("name") for base in exp_show or [] for e in (base.get("experiments") or []) if e.get("name")}


def queue(commands: list[tuple[str, list[str]]], cwd: Path, dry_run: bool = False) -> list[str]:
    """Queue the experiments that do not exist yet; returns the names queued."""
    have = set() if dry_run else existing_experiments(dvc_json(["exp", "show", "--json"], cwd))
    queued = []
    for name, argv in commands:
        if name in have:
            print(f"skip {name}: experiment exists (remove it with `dvc exp remove {name}` to rerun)")
            continue
        print("+ " + " ".join(argv), flush=True)
        if not dry_run:
            subprocess.run(argv, cwd=cwd, check=True)
        queued.append(name)
    return queued


def run_queue(cwd: Path, jobs: int) -> None:
    argv = ["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)]
    print("+ " + " ".join(argv), flush=True)
    subprocess.run(argv, cwd=cwd, check=True)


# ----------------------------------------------------------------------------- collecting

def _get(d: Mapping, *keys, default=None):
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return d


def experiment_rows(exp_show: list) -> list[dict[str, Any]]:
    """One dict per finished experiment: {name, rev, params (params.yaml), pretrain (metrics/pretrain.json)}.

    `dvc exp show --json` is a list of baseline commits, each with `experiments`: [{name,
    executor: {state}, revs: [{rev, name, data: {params, metrics}}]}]. Queued, running and
    failed experiments are skipped; so are experiments without metrics/pretrain.json.
    """
    rows = []
    for base in exp_show or []:
        for exp in base.get("experiments") or []:
            state = _get(exp, "executor", "state")
            if state not in (None, "success"):
                continue
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                pretrain = _get(data, "metrics", "metrics/pretrain.json", "data")
                if not pretrain:
                    continue
                rows.append({"name": rev.get("name") or exp.get("name"), "rev": rev.get("rev"),
                             "params": _get(data, "params", "params.yaml", "data", default={}), "pretrain": pretrain})
                break  # the newest rev of an experiment is its result
    return rows


def result_row(exp: Mapping[str, Any], kind: str) -> dict[str, Any]:
    p, m = exp["params"], exp["pretrain"]
    model, pre = p.get("model", {}), p.get("pretrain", {})
    counts = m.get("param_counts") or {}
    depth, ar, hd = model.get("depth"), model.get("aspect_ratio"), model.get("head_dim")
    dim = math.ceil(depth * ar / hd) * hd if depth and ar and hd else None
    return {
        "experiment": exp["name"], "kind": kind, "flops_budget": pre.get("target_flops"),
        "target_param_data_ratio": pre.get("target_param_data_ratio"), "depth": depth, "model_dim": dim,
        "params_wte": counts.get("wte"), "params_value_embeds": counts.get("value_embeds"),
        "params_lm_head": counts.get("lm_head"), "params_transformer": counts.get("transformer_matrices"),
        "params_scalars": counts.get("scalars"), "params_total": m.get("num_params", counts.get("total")),
        "num_scaling_params": m.get("num_scaling_params"),
        "num_iterations": m.get("step"), "total_batch_size": m.get("total_batch_size"),
        "tokens_trained": m.get("total_tokens"), "tokens_per_scaling_param": m.get("tokens_per_scaling_param"),
        "flops_per_token": m.get("flops_per_token"), "total_flops": m.get("total_flops"),
        "val_bpb": m.get("final_val_bpb"), "min_val_bpb": m.get("min_val_bpb"), "core_score": m.get("core_metric"),
        "train_time_sec": m.get("training_time_s"), "wall_time_s": m.get("wall_time_s"), "rev": exp.get("rev"),
    }


def horizon(params: Mapping[str, Any]) -> str:
    """What a run trained to, by pretrain's precedence: num_iterations > target_flops > ratio."""
    p = params.get("pretrain", {})
    if (p.get("num_iterations") or -1) > 0:
        return "num_iterations"
    if (p.get("target_flops") or -1) > 0:
        return "target_flops"
    return "target_param_data_ratio" if (p.get("target_param_data_ratio") or -1) > 0 else "none"


def select(exps: list[dict[str, Any]], kind: str, label: str | None) -> list[dict[str, Any]]:
    """The experiments of one study: by horizon (from the params it ran with) and name prefix."""
    want = {"scaling": "target_flops", "miniseries": "target_param_data_ratio"}[kind]
    return [e for e in exps if horizon(e["params"]) == want
            and (label is None or str(e["name"]).startswith(label + "-"))]


def fit_optimum(params: list[float], bpb: list[float]) -> dict[str, Any] | None:
    """Quadratic fit of bpb in log10(params); the vertex is the compute-optimal size.

    With fewer than 3 points, or a fit that opens downward, there is no interior optimum:
    the best measured point is returned, marked fit=False.
    """
    import numpy as np

    pts = sorted((p, b) for p, b in zip(params, bpb) if p and b is not None and math.isfinite(b))
    if not pts:
        return None
    x, y = np.log10([p for p, _ in pts]), np.array([b for _, b in pts])
    best = int(np.argmin(y))
    fallback = {"params": float(10 ** x[best]), "val_bpb": float(y[best]), "fit": False, "coeffs": None}
    if len(pts) < 3:
        return fallback
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        return fallback
    xv = -b / (2 * a)
    # an optimum outside the measured range is an extrapolation; clamp and say so
    inside = x.min() <= xv <= x.max()
    xv = float(min(max(xv, x.min()), x.max()))
    return {"params": float(10 ** xv), "val_bpb": float(a * xv * xv + b * xv + c), "fit": True, "inside": inside,
            "coeffs": [float(a), float(b), float(c)]}


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    artifacts.write_text(path, buf.getvalue())


def plot(path: Path, rows: list[dict[str, Any]], kind: str, optima: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    group_key = "flops_budget" if kind == "scaling" else "target_param_data_ratio"
    for i, g in enumerate(sorted({r[group_key] for r in rows})):
        pts = sorted((r["num_scaling_params"], r["val_bpb"], r["depth"]) for r in rows
                     if r[group_key] == g and r["val_bpb"] is not None and r["num_scaling_params"])
        if not pts:
            continue
        color = f"C{i % 10}"
        label = f"{g:.3g} FLOPs" if kind == "scaling" else f"ratio {g:g}"
        ax.plot([p for p, _, _ in pts], [b for _, b, _ in pts], "o-" if kind == "miniseries" else "o",
                color=color, label=label)
        for p, b, d in pts:
            ax.annotate(f"d{d}", (p, b), textcoords="offset points", xytext=(3, 3), fontsize=7, color=color)
        opt = next((o for o in optima if o["group"] == g), None)
        if opt and opt.get("coeffs"):
            a, b_, c = opt["coeffs"]
            xs = np.linspace(math.log10(pts[0][0]), math.log10(pts[-1][0]), 100)
            ax.plot(10 ** xs, a * xs * xs + b_ * xs + c, "-", color=color, alpha=0.5)
        if opt:
            ax.plot([opt["params"]], [opt["val_bpb"]], "*", color=color, markersize=14, markeredgecolor="k")
    ax.set_xscale("log")
    ax.set_xlabel("scaling params (transformer matrices + lm_head)")
    ax.set_ylabel("val bpb")
    ax.set_title("val bpb vs model size per FLOP budget (stars: fitted optima)" if kind == "scaling"
                 else "depth miniseries: val bpb vs model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def collect(exp_show: list, kind: str = "scaling", label: str | None = None,
            out_dir: Path | None = None) -> dict[str, Any]:
    """Write metrics/<kind>/results.csv, optima.csv and <kind>.png; return what was written."""
    out_dir = out_dir or OUT_DIR / kind
    rows = [result_row(e, kind) for e in select(experiment_rows(exp_show), kind, label)]
    rows.sort(key=lambda r: (r["flops_budget"] or 0, r["target_param_data_ratio"] or 0, r["depth"] or 0))
    if not rows:
        raise SystemExit(f"no finished {kind} experiments{f' named {label}-*' if label else ''} in `dvc exp show`: "
                         f"queue and run them first (python -m nanopipe.experiments {kind} ... --run)")
    write_csv(out_dir / "results.csv", rows, COLUMNS)

    optima = []
    group_key = "flops_budget" if kind == "scaling" else "target_param_data_ratio"
    for g in sorted({r[group_key] for r in rows}):
        grp = [r for r in rows if r[group_key] == g]
        opt = fit_optimum([r["num_scaling_params"] for r in grp], [r["val_bpb"] for r in grp])
        if opt is None:
            continue
        # tokens at the optimum: log-linear interpolation of tokens vs params within the budget
        pts = sorted((r["num_scaling_params"], r["tokens_trained"]) for r in grp if r["tokens_trained"])
        tokens = _interp_loglog(pts, opt["params"]) if pts else None
        optima.append({"group": g, **opt, "tokens": tokens,
                       "tokens_per_param": tokens / opt["params"] if tokens else None, "points": len(grp)})
    opt_cols = [group_key, "points", "optimal_params", "optimal_val_bpb", "optimal_tokens", "tokens_per_param", "fitted", "inside_range"]
    write_csv(out_dir / "optima.csv", [{group_key: o["group"], "points": o["points"], "optimal_params": round(o["params"]),
                                        "optimal_val_bpb": o["val_bpb"], "optimal_tokens": o["tokens"] and round(o["tokens"]),
                                        "tokens_per_param": o["tokens_per_param"], "fitted": o["fit"],
                                        "inside_range": o.get("inside")} for o in optima], opt_cols)
    plot(out_dir / f"{kind}.png", rows, kind, optima if kind == "scaling" else [])
    return {"rows": rows, "optima": optima, "csv": out_dir / "results.csv", "optima_csv": out_dir / "optima.csv",
            "plot": out_dir / f"{kind}.png"}


def _interp_loglog(pts: list[tuple[float, float]], x: float) -> float:
    import numpy as np

    lx, ly = np.log10([p for p, _ in pts]), np.log10([t for _, t in pts])
    if len(pts) == 1:
        return float(pts[0][1])
    slope, icpt = np.polyfit(lx, ly, 1)
    return float(10 ** (slope * math.log10(x) + icpt))


def print_table(rows: list[dict[str, Any]], optima: list[dict[str, Any]]) -> None:
    cols = ["experiment", "depth", "num_scaling_params", "tokens_trained", "total_flops", "val_bpb", "core_score"]
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{(f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c])):>18}" for c in cols))
    for o in optima:
        where = "" if not o["fit"] else ("" if o.get("inside") else " (at the edge of the measured range)")
        print(f"optimum @ {o['group']:.3g}: {o['params']:.3g} params, val bpb {o['val_bpb']:.4f}"
              + (f", {o['tokens']:.3g} tokens ({o['tokens_per_param']:.1f} tokens/param)" if o["tokens"] else "")
              + ("" if o["fit"] else " (best measured point; fewer than 3 points or no convex fit)") + where)


# ----------------------------------------------------------------------------- the short table, with lineage

# One headline number per stage: (column, stage, key path in metrics/<stage>.json).
HEADLINES = [("tok_eval bytes/tok", "tok_eval", ("bytes_per_token_val",)),
             ("pretrain val_bpb", "pretrain", ("final_val_bpb",)),
             ("base_eval CORE", "base_eval", ("core_metric",)),
             ("sft val_bpb", "sft", ("val_bpb",)),
             ("rl pass@1", "rl", ("pass_at_k_end", "pass_at_1")),
             ("chat ChatCORE", "chat_eval", ("rl", "ChatCORE")),
             ("report wall_s", "report", ("total_wall_time_s",))]
MAX_PARAM_COLUMNS = 6  # with the name, the headlines and `inherited`: 15 columns at most
OWN, INHERITED, UNKNOWN = "own", "inherited", "unknown"


def _worst(a: str, b: str) -> str:
    order = [OWN, UNKNOWN, INHERITED]
    return max(a, b, key=order.index)


def stage_origins(metrics: Mapping[str, Any]) -> dict[str, str]:
    """For one experiment's metrics ({stage: parsed metrics/<stage>.json}), whether each stage's numbers are
    its own: `own` when every artifact the stage recorded as its input (lineage.inputs) is the one this
    experiment's producing stage recorded as its output, and that producer is own too; `inherited` when one
    differs (the stage ran on another run's artifact: its metrics file came along from an older commit);
    `unknown` when a file in the chain records no lineage (written before D21)."""
    producer = {str(p): s for s, (_, outs) in paths.LINEAGE.items() for p in outs}
    origins: dict[str, str] = {}

    def origin(stage: str) -> str:
        if stage in origins:
            return origins[stage]
        lin = (metrics.get(stage) or {}).get("lineage")
        if not isinstance(lin, Mapping):
            origins[stage] = UNKNOWN
            return UNKNOWN
        result = OWN
        for path, recorded in (lin.get("inputs") or {}).items():
            p = Path(path)
            is_metrics = p.parent == paths.METRICS and p.suffix == ".json"  # another stage's metrics file (export)
            src = p.stem if is_metrics else producer.get(path)
            if src is None:
                continue  # not an artifact of this pipeline
            if src not in metrics:
                current = None  # its producer never ran here
            elif is_metrics:
                current = artifacts.json_fingerprint(metrics[src])
            else:
                src_lineage = metrics[src].get("lineage")
                if not isinstance(src_lineage, Mapping):
                    result = _worst(result, UNKNOWN)
                    continue
                current = (src_lineage.get("outputs") or {}).get(path)
            if recorded != current:
                result = INHERITED
            elif src in metrics:
                result = _worst(result, origin(src))
        origins[stage] = result
        return result

    for stage in metrics:
        if stage in paths.LINEAGE:
            origin(stage)
    return origins


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def _rows(exp_show: list) -> list[dict[str, Any]]:
    """[{name, rev, params (flat), metrics: {stage: data}}]: the workspace, each baseline commit, and each
    baseline's experiments (their newest rev), in `dvc exp show` order."""

    def row(name, rev, data):
        ms = (data or {}).get("metrics") or {}
        metrics = {Path(path).stem: (m or {}).get("data") for path, m in ms.items()
                   if Path(path).parent == paths.METRICS and (m or {}).get("data") is not None}
        params = _flat(_get(data or {}, "params", "params.yaml", "data", default={}))
        return {"name": name, "rev": rev, "params": params, "metrics": metrics}

    rows = []
    for base in exp_show or []:
        rev = base.get("rev")
        rows.append(row(base.get("name") or (rev[:7] if rev != "workspace" else "workspace"), rev, base.get("data")))
        for exp in base.get("experiments") or []:
            if _get(exp, "executor", "state") not in (None, "success"):
                continue
            for r in exp.get("revs") or []:
                rows.append(row(r.get("name") or exp.get("name") or r.get("rev", "")[:7], r.get("rev"), r.get("data")))
                break
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def show_table(exp_show: list, params: list[str] | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) of the short experiments table."""
    rows = _rows(exp_show)
    notes = []
    if params is None:
        keys = sorted({k for r in rows for k in r["params"]})
        params = [k for k in keys if len({repr(r["params"].get(k)) for r in rows}) > 1]
        if len(params) > MAX_PARAM_COLUMNS:
            notes.append(f"{len(params) - MAX_PARAM_COLUMNS} more params differ between the rows, not shown: "
                         + ", ".join(params[MAX_PARAM_COLUMNS:]) + " (choose with --params)")
            params = params[:MAX_PARAM_COLUMNS]
    header = ["experiment", *params, *(h for h, _, _ in HEADLINES), "inherited"]
    table = []
    for r in rows:
        origins = stage_origins(r["metrics"])
        cells = [r["name"], *(_cell(r["params"].get(k)) for k in params)]
        for _, stage, keys in HEADLINES:
            v = _get(r["metrics"].get(stage) or {}, *keys) if stage in r["metrics"] else None
            mark = "*" if origins.get(stage) == INHERITED else "?" if origins.get(stage) == UNKNOWN else ""
            cells.append(_cell(v) + mark if stage in r["metrics"] else "-")
        inherited = [s for s, o in origins.items() if o == INHERITED]
        cells.append(",".join(inherited) or "-")
        table.append(cells)
    notes.append("*: inherited, computed from artifacts this experiment did not produce (an older run's metrics file "
                 "carried along in its commit); ?: no lineage recorded (docs/decisions.md, D21)")
    return header, table, notes


# dvc.yaml's top-level plot ids, by the stage that wrote their CSVs
PLOT_IDS = {"pretrain": ["pretrain_loss", "pretrain_val_bpb"], "sft": ["sft_loss"], "rl": ["rl_reward", "rl_pass_at_k"]}


def plots_commands(exp_show: list, names: list[str] | None, out_dir: Path) -> tuple[list[list[str]], list[str]]:
    """(`dvc plots diff` argvs, notes): per stage with curves, the rows (experiments, baselines, the workspace;
    default: all) whose metrics for that stage are their own; the others are named in a note, never drawn."""
    rows = {r["name"]: r for r in _rows(exp_show)}
    names = names or list(rows)
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"not in `dvc exp show`: {', '.join(unknown)} (names: {', '.join(rows)})")
    argvs, notes = [], []
    for stage, ids in PLOT_IDS.items():
        origins = {n: stage_origins(rows[n]["metrics"]).get(stage, "not run") for n in names}
        own = [n for n in names if origins[n] == OWN]  # row names are revs DVC resolves (experiment, branch, sha)
        left_out = [f"{n} ({origins[n]})" for n in names if origins[n] != OWN]
        if left_out:
            notes.append(f"{stage} curves: left out {', '.join(left_out)}")
        if own == ["workspace"]:
            argvs.append(["dvc", "plots", "show", *ids, "-o", str(out_dir / stage)])
        elif own:
            # `dvc plots diff REV` alone compares REV with the workspace (dvc/repo/plots/diff.py): name it twice
            revs = own * 2 if len(own) == 1 else own
            argvs.append(["dvc", "plots", "diff", *revs, "--targets", *ids, "-o", str(out_dir / stage)])
    return argvs, notes


def print_show(header: list[str], table: list[list[str]], notes: list[str]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
    for line in [header, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    for n in notes:
        print(n)


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nanopipe.experiments", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--label", help="experiment name prefix")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="extra `dvc exp run -S` override, repeatable (e.g. experiment=d12, pretrain.eval_tokens=52428800)")
        p.add_argument("--core", action="store_true", help="CORE on full tasks at the last step (needs the eval bundle)")
        p.add_argument("--run", action="store_true", help="run the queue after queueing (dvc exp run --run-all)")
        p.add_argument("--jobs", type=int, default=1, help="parallel queue workers for --run (one per GPU node!)")
        p.add_argument("--dry-run", action="store_true", help="print the dvc commands only")

    p = sub.add_parser("scaling", help="queue the scaling-law grid (budgets x depths)")
    p.add_argument("--budgets", default=",".join(fmt_flops(b) for b in DEFAULT_BUDGETS))
    p.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)))
    common(p)
    p = sub.add_parser("miniseries", help="queue a depth series at a fixed tokens:params ratio")
    p.add_argument("--depths", default="10,12,14,16,18,20")
    p.add_argument("--ratio", type=float, default=10.5)
    common(p)
    p = sub.add_parser("collect", help="results from `dvc exp show --json` -> metrics/<kind>/results.csv + plot")
    p.add_argument("kind", nargs="?", default="scaling", choices=["scaling", "miniseries"])
    p.add_argument("--label", help="only experiments named <label>-*")
    p.add_argument("--all-commits", action="store_true", help="include experiments of every commit, not just HEAD")
    p.add_argument("--from-json", type=Path, help="read a saved `dvc exp show --json` instead of running dvc")
    p = sub.add_parser("show", help="the short `dvc exp show`: changed params, headline metrics, inherited stages")
    p.add_argument("--all-commits", action="store_true", help="experiments of every commit, not just HEAD")
    p.add_argument("--params", help="comma-separated param columns (default: those that differ between the rows)")
    p.add_argument("--from-json", type=Path, help="read a saved `dvc exp show --json` instead of running dvc")
    p = sub.add_parser("plots", help="`dvc plots diff` per stage, leaving out experiments whose curves are inherited")
    p.add_argument("names", nargs="*", help="experiments / branches / revs as `show` names them (default: every row)")
    p.add_argument("--out", type=Path, default=Path("dvc_plots"), help="one page per stage: OUT/<stage>/index.html")
    args = ap.parse_args(argv)
    cwd = Path(".")

    if args.command == "plots":
        data = dvc_json(["exp", "show", "--json"], cwd)
        argvs, notes = plots_commands(data, args.names, args.out)
        args.out.mkdir(parents=True, exist_ok=True)  # dvc plots -o creates the page's directory, not its parents
        for cmd in argvs:
            print("+ " + " ".join(cmd), flush=True)
            if subprocess.run(cmd, cwd=cwd).returncode != 0:
                raise SystemExit(f"`{' '.join(cmd)}` failed (its error is above)")
        for n in notes:
            print(n)
        return

    if args.command == "show":
        data = json.loads(args.from_json.read_text()) if args.from_json else \
            dvc_json(["exp", "show", "--json", *(["--all-commits"] if args.all_commits else [])], cwd)
        print_show(*show_table(data, args.params.split(",") if args.params else None))
        return

    if args.command == "collect":
        if args.from_json:
            data = json.loads(args.from_json.read_text())
        else:
            data = dvc_json(["exp", "show", "--json", *(["--all-commits"] if args.all_commits else [])], cwd)
        result = collect(data, args.kind, args.label)
        print_table(result["rows"], result["optima"])
        print(f"wrote {result['csv']}, {result['optima_csv']} and {result['plot']}")
        return

    if args.command == "scaling":
        cmds = scaling_commands(_parse_list(args.budgets), _parse_list(args.depths, int), args.label or "scaling",
                                args.sets, args.core)
    else:
        cmds = miniseries_commands(_parse_list(args.depths, int), args.ratio, args.label or "miniseries", args.sets, args.core)
    queued = queue(cmds, cwd, args.dry_run)
    print(f"queued {len(queued)} experiment(s); {len(cmds) - len(queued)} already existed")
    if args.run and not args.dry_run:
        run_queue(cwd, args.jobs)
        print(f"done: `python -m nanopipe.experiments collect {args.command}` writes the table and plot")


if __name__ == "__main__":
    main(sys.argv[1:])
