"""lm-evaluation-harness on an exported model (models/hf), as `lm_eval --model hf` runs it.

The export is a plain `transformers` model (trust_remote_code), so lm-eval's own `hf` backend
evaluates it: nothing here re-implements a task or a metric. What this adds for the pipeline:

- `add_bos_token=True`: our models always see <|bos|> first, as in training (lm-eval's default is
  to add no special token);
- local tasks: `include_path` is a directory of task YAMLs, e.g. a JSONL file beside a YAML with
  `dataset_path: json`, which runs offline;
- the results flattened to plain metric names (lm-eval's "acc,none" -> "acc", "exact_match,flex" ->
  "exact_match/flex"): commas are not valid in MLflow metric names.

Running it against the nanopipe server (`lm_eval --model local-completions`) needs a
`/v1/completions` route, which the server does not have yet.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("nanopipe.harness")


class HarnessError(ValueError):
    """lm-eval is missing, a task is unknown, or a task could not be loaded."""


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise HarnessError(f"lm-evaluation-harness is not installed ({e}); pip install 'lm-eval==0.4.13' accelerate "
                           "(or the project's dev extra)") from None
    return lm_eval, TaskManager


def run_lm_eval(hf_dir, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 1, device: str = "cpu", dtype: str = "float32",
                apply_chat_template: bool = False, seed: int = 0, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate on the Hugging Face directory `hf_dir` with model `hf`; returns its
    results dict (with per-sample records when log_samples)."""
    lm_eval, TaskManager = _lm_eval()
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise HarnessError(f"{hf_dir}/config.json: not found; run the `export` stage first (dvc repro export)")
    if not tasks:
        raise HarnessError("no tasks given: name lm-eval tasks (e.g. hellaswag, arc_easy) or local ones under include_path")
    if include_path and not Path(include_path).is_dir():
        raise HarnessError(f"{include_path}: the task include_path is not a directory")
    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or under {include_path}" if include_path else " (local tasks need include_path)"
        raise HarnessError(f"unknown lm-eval task(s) {unknown}: not in lm-eval's registry{where}")
    try:
        return lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(hf_dir.resolve()), "trust_remote_code": True, "add_bos_token": True,
                        "dtype": dtype},
            tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
            task_manager=manager, apply_chat_template=apply_chat_template, log_samples=log_samples,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except (ConnectionError, OSError) as e:
        offline = " (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set)" if os.environ.get("HF_HUB_OFFLINE") or \
            os.environ.get("HF_DATASETS_OFFLINE") else ""
        raise HarnessError(f"lm-eval could not load a task's dataset{offline}: {type(e).__name__}: {e}; "
                           "hub tasks need network access, or run local tasks from include_path") from e


def metric_name(key: str) -> str | None:
    """lm-eval's "acc,none" -> "acc"; "exact_match,strict-match" -> "exact_match/strict-match"; None for
    the non-metric fields (alias, name, sample_len)."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    return metric if filt == "none" else f"{metric}/{filt}"


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval's `results` (numbers only; "N/A" stderrs dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            name = metric_name(key)
            if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                row[name] = float(value)
        out[task] = row
    return out


def summary(results: dict) -> dict[str, Any]:
    """What metrics/lm_eval.json keeps of a run: per-task metrics, sample counts, versions, n-shot."""
    return {
        "results": flatten_results(results),
        "n_samples": {t: n.get("effective", n.get("original")) for t, n in results.get("n-samples", {}).items()},
        "n_shot": dict(results.get("n-shot", {})),
        "versions": {t: str(v) for t, v in results.get("versions", {}).items()},
        "lm_eval_version": results.get("lm_eval_version"),
    }
