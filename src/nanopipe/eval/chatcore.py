"""ChatCORE (nanochat's chat_eval.py): task accuracies of a chat model, and their centred mean.

- categorical tasks (ARC, MMLU): one batched forward over the prompts, then the argmax over
  the logits of the answer letters at the <|assistant_start|> position (no sampling);
- generative tasks (GSM8K, HumanEval, SpellingBee, Arithmetic): sample with the Engine
  (calculator tool live), decode the completion and let the task grade it (HumanEval runs
  the program in the sandbox, isolated as chat_eval.sandbox says; the metrics record which
  isolation it had); a problem passes if any of num_samples samples passes.
Problems are sharded by rank and the counts all-reduced, so 1 and N ranks give the same totals.

ChatCORE = mean over tasks of (accuracy - baseline) / (1 - baseline), baselines 0.25 for the
multiple-choice tasks and 0 for the rest.
"""
from __future__ import annotations

import logging
import time

import torch

from nanopipe.inference.engine import Engine
from nanopipe.runtime import Progress, all_reduce, get_dist_info

log = logging.getLogger("nanopipe.chat_eval")

STANDARD_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")  # ChatCORE's six
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0, "Arithmetic": 0.0}  # random-guess accuracy (0.25 even for 3/5-option ARC rows)


def build_task(name: str, dataset_dir: str | None = None, cache_dir: str | None = None, sandbox: str = "auto"):
    """The evaluation split of a task by name (nanochat's registry, plus Arithmetic).

    sandbox: the isolation of model-written code (chat_eval.sandbox; HumanEval runs programs)."""
    from nanopipe import tasks

    remote = dict(dataset_dir=dataset_dir or None, cache_dir=cache_dir)
    registry = {
        "ARC-Easy": lambda: tasks.ARC("ARC-Easy", "test", **remote),
        "ARC-Challenge": lambda: tasks.ARC("ARC-Challenge", "test", **remote),
        "MMLU": lambda: tasks.MMLU("all", "test", **remote),
        "GSM8K": lambda: tasks.GSM8K("main", "test", **remote),
        "HumanEval": lambda: tasks.HumanEval(sandbox=sandbox),
        "SpellingBee": lambda: tasks.SpellingBee(size=256, split="test"),
        "Arithmetic": lambda: tasks.Arithmetic(size=256, split="test"),
    }
    if name not in registry:
        raise ValueError(f"chat_eval.tasks: unknown task {name!r}; expected some of {list(registry)}")
    return registry[name]()


def _sum_across_ranks(values: list[int], device) -> list[int]:
    return all_reduce(torch.tensor(values, dtype=torch.long, device=device)).tolist()


def _num_problems(task, max_problems: int | None) -> int:
    return len(task) if max_problems is None or max_problems < 0 else min(len(task), max_problems)


@torch.no_grad()
def run_generative_eval(task, tokenizer, engine: Engine, num_samples: int, max_new_tokens: int, temperature: float,
                        top_k: int | None, max_problems: int | None = None) -> tuple[int, int]:
    """(passed, total) over the first max_problems problems, rank r taking r, r+world, ..."""
    _, rank, _, world = get_dist_info()
    device = torch.device(engine.model.get_device())
    passed = total = 0
    n = _num_problems(task, max_problems)
    progress = Progress(f"chat_eval {type(task).__name__}", n, "problem")
    for i in range(rank, n, world):
        progress.update(i)
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        passed += int(any(task.evaluate(conversation, c) for c in completions))
        total += 1
    passed, total = _sum_across_ranks([passed, total], device)
    return passed, total


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size: int, max_problems: int | None = None) -> tuple[int, int]:
    """(passed, total): argmax over the answer letters' logits at the last prompt position.

    Batches of batch_size consecutive problems, right-padded with BOS; batch b runs on rank b % world."""
    _, rank, _, world = get_dist_info()
    device = torch.device(model.get_device())
    bos = tokenizer.get_bos_token_id()
    n = _num_problems(task, max_problems)
    letter_ids: dict[str, int] = {}

    def letter_id(letter: str) -> int:
        if letter not in letter_ids:
            ids = tokenizer.encode(letter)
            if len(ids) != 1:
                raise ValueError(f"{type(task).__name__}: answer letter {letter!r} encodes to {len(ids)} tokens {ids}; "
                                 "categorical evaluation needs each letter to be a single token")
            letter_ids[letter] = ids[0]
        return letter_ids[letter]

    passed = total = 0
    progress = Progress(f"chat_eval {type(task).__name__}", n, "problem")
    for b in range(rank, -(-n // batch_size), world):
        progress.update(b * batch_size)
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)  # (B, T, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            choice = logits[row, len(prompt) - 1, [letter_id(x) for x in letters]].argmax().item()
            passed += int(bool(task.evaluate(conversation, letters[choice])))
            total += 1
    passed, total = _sum_across_ranks([passed, total], device)
    return passed, total


def chatcore(accuracies: dict[str, float]) -> tuple[float | None, list[str]]:
    """Mean baseline-centred accuracy over the tasks given (those with a known baseline)."""
    used = [t for t in accuracies if t in BASELINES and accuracies[t] is not None]
    if not used:
        return None, []
    centred = [(accuracies[t] - BASELINES[t]) / (1.0 - BASELINES[t]) for t in used]
    return sum(centred) / len(centred), used


def evaluate_model(model, tokenizer, tasks: dict, c, autocast) -> dict:
    """{task: {"accuracy", "passed", "total", "time_s"}} for one model over the loaded tasks, plus
    "isolation" for a task that runs model-written code (what its programs ran under, e.g. "bwrap")."""
    engine = Engine(model, tokenizer)
    max_problems = None if c.max_problems < 0 else c.max_problems
    out = {}
    for name, task in tasks.items():
        t0 = time.time()
        used = getattr(task, "isolations_used", None)
        if used is not None:
            used.clear()
        with autocast():
            if task.eval_type == "categorical":
                passed, total = run_categorical_eval(task, tokenizer, model, c.batch_size, max_problems)
            elif task.eval_type == "generative":
                passed, total = run_generative_eval(task, tokenizer, engine, c.num_samples, c.max_new_tokens,
                                                    c.temperature, c.top_k or None, max_problems)
            else:
                raise ValueError(f"task {name}: unsupported eval_type {task.eval_type!r}")
        out[name] = {"accuracy": passed / total if total else None, "passed": passed, "total": total,
                     "time_s": round(time.time() - t0, 3)}
        if used is not None:
            out[name]["isolation"] = ",".join(sorted(used)) or None  # None: no program ran
        log.info("%s: %d/%d (%.2f%%) in %.1f s", name, passed, total, 100 * passed / max(total, 1), out[name]["time_s"])
    return out
