"""The `chat_eval` stage (nanochat's chat_eval.py): task accuracies and ChatCORE of the chat models.

Each source in chat_eval.sources (models/sft, models/rl, ...) is evaluated on each task by
nanopipe.eval.chatcore. nanochat reports ChatCORE only when all six standard tasks ran; here it is
computed over the tasks that ran and the metrics say which (ChatCORE_tasks, ChatCORE_complete). A
remote task whose data cannot be had (offline, no local copy) is recorded as unavailable with the
reason; a source whose checkpoint is missing is skipped with a note. Arithmetic is the embedded,
offline GSM8K-format task, reported under its own name.

Model-written programs (HumanEval) run in the OS sandbox (chat_eval.sandbox, nanopipe.sandbox), never
unisolated by default: where bubblewrap is missing, `auto` records HumanEval as not run (the reason and
the fix in the metrics and the report) and evaluates the other tasks; `bwrap` makes that an error;
`in_process` opts into the in-interpreter guard. Each source's counts record the isolation its
programs had (counts.HumanEval.isolation).

Outputs: metrics/chat_eval.json ({source: {task: accuracy | null, ChatCORE, ...}}) and the report section.
"""
from __future__ import annotations

import logging

from nanopipe import paths
from nanopipe.eval.chatcore import (
    BASELINES,
    STANDARD_TASKS,
    build_task,
    chatcore,
    evaluate_model,
)
from nanopipe.model.checkpoint import checkpoint_at, load_model
from nanopipe.sandbox import SandboxUnavailableError
from nanopipe.stage import DEVICE_PARAMS, Stage, fmt_acc
from nanopipe.tasks import DatasetUnavailableError
from nanopipe.tokenizer import load_tokenizer

log = logging.getLogger("nanopipe.chat_eval")

PARAMS = ["chat_eval", *DEVICE_PARAMS]


def run(st: Stage) -> None:
    c, dev = st.cfg.chat_eval, st.dev
    tokenizer = load_tokenizer(paths.TOKENIZER)
    tasks, unavailable = {}, {}
    for name in c.tasks:
        try:
            tasks[name] = build_task(name, c.dataset_dir, sandbox=c.sandbox)
        except (DatasetUnavailableError, ImportError, FileNotFoundError) as e:
            unavailable[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            log.warning("%s unavailable: %s", name, unavailable[name])
        except SandboxUnavailableError as e:
            if c.sandbox != "auto":  # OS isolation asked for by name: its absence is an error
                raise
            # auto: the model's code is not run, and the chain goes on (a laptop without bubblewrap still
            # finishes `dvc repro`); the metrics and the report say why and how to get the task back
            unavailable[name] = f"not run, no OS sandbox: {e}"
            log.warning("%s not run: %s", name, e)

    metrics: dict = {"tasks": ",".join(c.tasks), "unavailable": unavailable, "sandbox": c.sandbox}
    report = [f"- tasks: {', '.join(c.tasks)}; max problems per task: {'all' if c.max_problems < 0 else c.max_problems}",
              f"- generative sampling: temperature {c.temperature}, top-k {c.top_k}, {c.num_samples} sample(s), "
              f"max {c.max_new_tokens} new tokens; world size {dev.world_size}"]
    report += [f"- {name}: unavailable ({reason})" for name, reason in unavailable.items()]
    problems, seconds = 0, 0.0
    for source in c.sources:
        ckpt = paths.CHECKPOINTS[source]
        if not (ckpt / "meta.json").exists():
            note = f"{ckpt}: checkpoint not found; run the `{source}` stage to evaluate it"
            log.warning("skipping source %s: %s", source, note)
            metrics[source] = {"skipped": note}
            report += ["", f"### {source}", "", f"Skipped: {note}"]
            continue
        ckpt = checkpoint_at(ckpt, c.step, "chat_eval.step")
        model, meta = load_model(ckpt, dev.device, "eval", tokenizer=tokenizer)
        results = evaluate_model(model, tokenizer, tasks, c, dev.autocast)
        del model
        accuracies = {name: results[name]["accuracy"] if name in results else None for name in c.tasks}
        ran = {k: v for k, v in accuracies.items() if v is not None}
        complete = all(t in ran for t in STANDARD_TASKS)  # then ChatCORE is nanochat's, over the six only
        score, used = chatcore({t: ran[t] for t in STANDARD_TASKS} if complete else ran)
        metrics[source] = {"step": meta.get("step"), **accuracies, "ChatCORE": score,
                           "ChatCORE_tasks": ",".join(used), "ChatCORE_complete": complete,
                           "counts": {k: {f: v[f] for f in ("passed", "total", "time_s", "isolation") if f in v}
                                      for k, v in results.items()}}
        problems += sum(v["total"] for v in results.values())
        seconds += sum(v["time_s"] for v in results.values())
        report += ["", f"### {source} ({ckpt}, step {meta.get('step')})", "",
                   "| task | passed/problems = accuracy (95 % CI) | centred |", "|---|---:|---:|"]
        for name in c.tasks:
            if name in results and results[name]["accuracy"] is not None:
                acc = results[name]["accuracy"]
                centred = (acc - BASELINES[name]) / (1 - BASELINES[name])
                report.append(f"| {name} | {fmt_acc(results[name]['passed'], results[name]['total'])} | {centred:.4f} |")
            else:
                report.append(f"| {name} | unavailable (0 problems) | |")
        report += [f"\nModel-written code of {k} ran under: {v['isolation']} (chat_eval.sandbox={c.sandbox})"
                   for k, v in results.items() if v.get("isolation")]
        scope = "over the six standard tasks" if complete else \
            f"computed over {', '.join(used) or 'no task'} only, not the six standard tasks"
        report += ["", f"ChatCORE: {'n/a' if score is None else f'{score:.4f}'} ({scope})"]
    metrics["problems_per_s"] = problems / seconds if seconds > 0 else None
    st.finish(metrics, "\n".join(report))
