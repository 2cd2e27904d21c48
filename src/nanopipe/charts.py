"""The report card's pictures: training curves and accuracy charts as PNG, from the files the stages wrote.

The curves come from the plot files each training stage writes as it runs (`Stage.log(..., plot=)`:
metrics/<stage>/<plot>.csv, DVC plots in dvc.yaml), the accuracies from metrics/chat_eval.json. Each
chart is a function of those files only; matplotlib runs on its Agg backend (no display) and the PNGs
carry no timestamp or version, so the same data gives the same bytes and DVC sees no change.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping

from nanopipe import paths

# (stage, title, [(plot file, column, label, panel)]): panel 0 is the loss panel, 1 the evaluation panel
CURVES = [
    ("pretrain", "pretrain", [("train", "loss_smooth", "train loss (smoothed, nats/token)", 0),
                              ("val", "val_bpb", "val bpb (val shard)", 1)]),
    ("sft", "SFT", [("train", "loss_smooth", "train loss (smoothed, nats/token)", 0),
                    ("val", "val_loss", "val loss (nats/token)", 0),
                    ("val", "val_bpb", "val bpb (SFT val conversations)", 1)]),
    ("rl", "RL", [("reward", "reward", "mean reward", 0), ("pass_at_k", "pass_at_*", "pass@{k}", 1)]),
]
PANEL_Y = {"pretrain": ("loss", "bits per byte"), "sft": ("loss", "bits per byte"), "rl": ("reward", "held-out pass@k")}


def read_curve(path: Path, column: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one column of a plot CSV; rows without a finite value in it are left out."""
    steps, values = [], []
    if not path.exists():
        return steps, values
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                step, value = float(row["step"]), float(row.get(column) or "nan")
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(step) and math.isfinite(value):
                steps.append(step)
                values.append(value)
    return steps, values


def columns(path: Path, prefix: str) -> list[str]:
    """The columns of a plot CSV whose names start with `prefix`, in file order."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return [c for c in header if c.startswith(prefix)]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # no Software/date metadata: the same data gives the same bytes
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def curve_chart(root: Path, stage: str) -> bytes | None:
    """The stage's curves side by side (loss panel, evaluation panel); None when it logged none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, series = next((t, s) for st, t, s in CURVES if st == stage)
    expanded = []
    for plot, column, label, panel in series:
        if column.endswith("*"):  # every pass_at_<k> column the stage wrote (rl.pass_k sets how many)
            for col in columns(root / paths.plot_file(stage, plot), column[:-1]):
                expanded.append((plot, col, label.format(k=col[len(column) - 1:]), panel))
        else:
            expanded.append((plot, column, label, panel))
    data = [(label, panel, *read_curve(root / paths.plot_file(stage, plot), column)) for plot, column, label, panel in expanded]
    data = [d for d in data if d[2]]
    if not data:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for panel, ax in enumerate(axes):
        lines = [d for d in data if d[1] == panel]
        for label, _, steps, values in lines:
            ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(PANEL_Y[stage][panel])
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
            last = lines[-1]
            ax.annotate(f"{last[3][-1]:.4g}", (last[2][-1], last[3][-1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return _png(fig)


def accuracy_chart(counts: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> bytes | None:
    """Accuracy per task, one bar per model, with its confidence interval and passed/total written on
    it; `counts` is {model: {task: {"passed", "total", "lo", "hi"}}} (lo, hi: the interval, as
    fractions). None when no task has problems."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in counts if any(c.get("total") for c in counts[m].values())]
    tasks = sorted({t for m in models for t, c in counts[m].items() if c.get("total")})
    if not tasks:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) * max(1, len(models))), 3.8), constrained_layout=True)
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        xs, accs, below, above, labels = [], [], [], [], []
        for j, task in enumerate(tasks):
            c = counts[model].get(task) or {}
            n, k = c.get("total") or 0, c.get("passed") or 0
            if not n:
                continue
            p = k / n
            xs.append(j + (i - (len(models) - 1) / 2) * width)
            accs.append(100 * p)
            below.append(100 * (p - c["lo"]))
            above.append(100 * (c["hi"] - p))
            labels.append(f"{k}/{n}")
        bars = ax.bar(xs, accs, width * 0.9, yerr=[below, above], capsize=3, label=model)
        for bar, up, label in zip(bars, above, labels):  # above the interval
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height() + up), textcoords="offset points",
                        xytext=(0, 2), ha="center", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy, % (95 % confidence interval)")
    ax.set_ylim(0, 112)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("chat_eval: accuracy per task (passed/problems on each bar)")
    return _png(fig)
