"""The `lm_eval` stage: lm-evaluation-harness tasks on the exported model (models/hf), recorded like
every other metric (metrics/lm_eval.json, its report section, an MLflow run).

    nanopipe lm_eval lm_eval.tasks=[hellaswag,arc_easy] lm_eval.limit=200
    nanopipe lm_eval lm_eval.tasks=[my_task] lm_eval.include_path=my_tasks   # local YAML + JSONL, offline
    dvc repro stages/lm_eval/dvc.yaml                                        # export if stale, then evaluate

It runs lm-eval's own `hf` backend on the directory the export stage wrote (nanopipe.eval.harness),
so the numbers are the ones `lm_eval --model hf --model_args pretrained=models/hf,...` prints.
"""
from __future__ import annotations

import json
import logging

from nanopipe import artifacts, paths
from nanopipe.eval.harness import run_lm_eval, summary
from nanopipe.stage import DEVICE_PARAMS, Stage

log = logging.getLogger("nanopipe.lm_eval")

PARAMS = ["lm_eval", *DEVICE_PARAMS]


def run(st: Stage) -> None:
    c = st.cfg.lm_eval
    artifacts.require(paths.HF_EXPORT / "config.json", "export")
    device = st.dev.device
    results = run_lm_eval(paths.HF_EXPORT, list(c.tasks), include_path=c.include_path or None,
                          limit=None if c.limit == -1 else c.limit,
                          num_fewshot=None if c.num_fewshot == -1 else c.num_fewshot, batch_size=c.batch_size,
                          device=str(device), dtype=c.dtype, apply_chat_template=c.apply_chat_template,
                          seed=st.cfg.runtime.seed)
    out = summary(results)
    provenance = paths.HF_EXPORT / "nanopipe.json"
    model = artifacts.read_json(provenance) if provenance.exists() else {}
    out["model"] = {"path": str(paths.HF_EXPORT), "source": model.get("source"), "step": model.get("step")}
    if st.rank0:
        st.tracker.log_text(json.dumps({k: results[k] for k in ("results", "configs", "n-shot", "n-samples")
                                        if k in results}, indent=2, default=str), "lm_eval_results.json")
    rows = [f"| {task} | {metric} | {value:.4f} |" for task, metrics in out["results"].items()
            for metric, value in metrics.items() if not metric.endswith("_stderr") and "_stderr/" not in metric]
    report = [f"lm-evaluation-harness {out['lm_eval_version']} on `{paths.HF_EXPORT}` "
              f"({out['model']['source'] or 'unknown source'}, step {out['model']['step']})", "",
              "| task | metric | value |", "|---|---|---:|", *rows]
    st.finish(out, "\n".join(report))
