"""Task base class, mixtures, the multiple-choice prompt and the Hugging Face loader.

A Task is a logical view (start/stop/step) over a physical list of conversations.
Every task returns conversations in the chat format the tokenizer renders:
`{"messages": [{"role": "user", "content": str}, {"role": "assistant", "content": str | [parts]}...], ...}`
with assistant parts `{"type": "text"|"python"|"python_output", "text": str}`.
Behaviour follows nanochat's tasks/common.py.
"""
from __future__ import annotations

import random
from pathlib import Path


class Task:
    """A view over a task's physical examples: logical index i -> physical start + i*step."""

    def __init__(self, start=0, stop=None, step=1):
        if not (isinstance(start, int) and start >= 0):
            raise ValueError(f"Task start must be a non-negative int, got {start!r}")
        if stop is not None and not (isinstance(stop, int) and stop >= start):
            raise ValueError(f"Task stop must be None or an int >= start ({start}), got {stop!r}")
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"Task step must be an int >= 1, got {step!r}")
        self.start = start
        self.stop = stop
        self.step = step

    @property
    def eval_type(self):
        """'generative' (sample and grade text) or 'categorical' (score the letter logits)."""
        raise NotImplementedError(f"{type(self).__name__} is not an evaluation task (no eval_type)")

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError(f"{type(self).__name__} cannot be evaluated (training-only task)")

    def __len__(self):
        # stop is deliberately not clamped to num_examples() (nanochat): a synthetic task may be read past its size
        stop = self.num_examples() if self.stop is None else self.stop
        num = (stop - self.start + self.step - 1) // self.step  # ceil division
        assert num >= 0, f"negative number of examples: {num}"
        return num

    def __getitem__(self, index: int):
        if not isinstance(index, int):
            raise TypeError(f"{type(self).__name__} index must be an int, got {type(index).__name__}")
        # nanochat does no bounds check; we do, so that `for ex in task` stops and typos fail loudly
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range for length {len(self)}")
        return self.get_example(self.start + index * self.step)


class SyntheticTask(Task):
    """A generated task of `size` examples: example i comes from its own seeded RNG, with train and
    test drawing from disjoint seed ranges, so any example can be regenerated on its own."""

    TEST_RANDOM_SEED_OFFSET = 10_000_000

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"{type(self).__name__} split must be train|test, got {split!r}")
        self.size = size
        self.split = split

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size

    def example_rng(self, index) -> random.Random:
        return random.Random(index if self.split == "train" else self.TEST_RANDOM_SEED_OFFSET + index)


class TaskMixture(Task):
    """All rows of all tasks, interleaved by one deterministic shuffle (Random(42)).

    Oversample a task by listing it more than once. Identical on every rank."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(task) for task in self.tasks]
        self.num_conversations = sum(self.lengths)
        self.index_map = [(ti, li) for ti, n in enumerate(self.lengths) for li in range(n)]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self):
        return self.num_conversations

    def get_example(self, index):
        if not 0 <= index < self.num_conversations:
            raise IndexError(f"index {index} out of range for mixture with {self.num_conversations} conversations")
        task_idx, local_idx = self.index_map[index]
        return self.tasks[task_idx][local_idx]


class TaskSequence(Task):
    """The tasks concatenated in order, no shuffling."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(task) for task in self.tasks]
        self.num_conversations = sum(self.lengths)

    def num_examples(self):
        return self.num_conversations

    def get_example(self, index):
        if not 0 <= index < self.num_conversations:
            raise IndexError(f"index {index} out of range for sequence with {self.num_conversations} conversations")
        for task_idx, task_length in enumerate(self.lengths):
            if index < task_length:
                return self.tasks[task_idx][index]
            index -= task_length


def render_mc(question, letters, choices):
    """The single-turn multiple-choice prompt; the expected reply is the bare letter.

    The letter comes after the choice ("- choice=A") so that, when the model answers,
    the letter is a single token it has just seen next to its choice."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join([f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)])
    query += "\nRespond only with the letter of the correct answer."
    return query


def check_conversation(conversation, allow_system=False):
    """Raise ValueError unless `conversation` is in the chat format the tokenizer renders."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError(f"a conversation is a dict with a 'messages' list, got {conversation!r:.200}")
    messages = conversation["messages"]
    if allow_system and messages and messages[0].get("role") == "system":
        if not isinstance(messages[0].get("content"), str):
            raise ValueError("system message content must be a string")
        messages = messages[1:]
    if len(messages) < 2:
        raise ValueError(f"a conversation needs at least a user and an assistant message, got {len(messages)}")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected:
            raise ValueError(f"message {i} should have role {expected!r}, got {message!r:.200}")
        content = message.get("content")
        if expected == "user" or isinstance(content, str):
            if not isinstance(content, str):
                raise ValueError(f"message {i} ({expected}) content must be a string, got {type(content).__name__}")
            continue
        if not isinstance(content, list) or not content:
            raise ValueError(f"message {i} (assistant) content must be a string or a non-empty list of parts")
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in ("text", "python", "python_output")
                    and isinstance(part.get("text"), str)):
                raise ValueError(f"message {i} part {j} must be {{'type': text|python|python_output, 'text': str}}, got {part!r:.200}")


# -----------------------------------------------------------------------------
# Remote datasets (Hugging Face hub) with an offline escape hatch

class DatasetUnavailableError(RuntimeError):
    """A remote dataset could neither be fetched nor found locally."""


def _local_split_files(root: Path, subset, split):
    """Find `split` in a local copy laid out like the hub repo (or saved with save_to_disk).

    Searched, in order: <root>/<subset>/, <root>/data/, <root>/. Accepted:
    a `save_to_disk` DatasetDict or Dataset, or files named <split>.<ext> / <split>-*.<ext>
    with ext parquet, arrow, jsonl, json (the hub's `main/train-00000-of-00001.parquet`)."""
    candidates = [root / subset] if subset else []
    candidates += [root / "data", root]
    for d in candidates:
        if not d.is_dir():
            continue
        if (d / "dataset_dict.json").exists() and (d / split).is_dir():
            return "disk", d / split
        if (d / split / "state.json").exists():
            return "disk", d / split
        for ext, builder in (("parquet", "parquet"), ("arrow", "arrow"), ("jsonl", "json"), ("json", "json")):
            files = sorted(d.glob(f"{split}.{ext}")) + sorted(d.glob(f"{split}-*.{ext}"))
            if files:
                return builder, [str(f) for f in files]
    return None, candidates


def load_hf_dataset(hub_path, subset, split, dataset_dir=None, cache_dir=None):
    """load_dataset(hub_path, subset, split), or the same rows from a local copy.

    dataset_dir: a directory holding local copies as <dataset_dir>/<hub_path>/ in the hub
    repo layout (e.g. `hf download --repo-type dataset openai/gsm8k --local-dir
    <dataset_dir>/openai/gsm8k`). When given, the hub is never contacted.
    cache_dir: the datasets cache (default: HF_DATASETS_CACHE, i.e. $HF_HOME/datasets).

    Every rank calls this. Under torch.distributed one rank per node downloads (or builds the arrow
    cache of a local copy) first, under a file lock in the datasets cache, and the others then load
    from that cache (runtime.fetch_once): not N concurrent hub downloads, and if it fails, every rank
    raises the same DatasetUnavailableError, so all take the same branch (chat_eval records the task
    as unavailable on all ranks, not on some while the others wait in a collective)."""
    import datasets  # imported lazily: the embedded tasks must not pay for it

    from nanopipe.runtime import fetch_once

    cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE)
    lock = cache / f".nanopipe-{hub_path.replace('/', '--')}.lock"  # per dataset: others may load meanwhile
    return fetch_once(lambda: _load_hf_dataset(hub_path, subset, split, dataset_dir, cache_dir), lock)


def _load_hf_dataset(hub_path, subset, split, dataset_dir, cache_dir):
    """load_hf_dataset's work in one process."""
    import datasets

    name = f"{hub_path}" + (f" (config {subset!r})" if subset else "")
    if dataset_dir:
        root = Path(dataset_dir) / hub_path
        kind, found = _local_split_files(root, subset, split)
        if kind is None:
            searched = ", ".join(str(c) for c in found)
            raise DatasetUnavailableError(
                f"dataset {name}, split {split!r}: no local copy under {root}. Searched {searched} for "
                f"{split}.parquet|arrow|jsonl|json, {split}-*.parquet (hub layout) or a save_to_disk directory. "
                f"Fill it on a connected machine with: hf download --repo-type dataset {hub_path} --local-dir {root}")
        if kind == "disk":
            return datasets.load_from_disk(str(found))
        return datasets.load_dataset(kind, data_files=found, split="train", cache_dir=cache_dir)
    try:
        return datasets.load_dataset(hub_path, subset, split=split, cache_dir=cache_dir)
    except Exception as e:  # the hub boundary: offline, unknown repo, gated, ...
        cache = cache_dir or datasets.config.HF_DATASETS_CACHE
        raise DatasetUnavailableError(
            f"could not load dataset {name}, split {split!r} from the Hugging Face hub: {type(e).__name__}: {e}\n"
            f"  datasets cache in use: {cache} (set by HF_DATASETS_CACHE, or HF_HOME/datasets).\n"
            f"  If this machine is offline, either pre-fill that cache on a connected machine with\n"
            f"    HF_DATASETS_CACHE={cache} python -c \"import datasets; datasets.load_dataset('{hub_path}'"
            + (f", '{subset}'" if subset else "") + f", split='{split}')\"\n"
            f"  and run here with HF_DATASETS_OFFLINE=1, or download the files with\n"
            f"    hf download --repo-type dataset {hub_path} --local-dir <dataset_dir>/{hub_path}\n"
            f"  and pass dataset_dir=<dataset_dir> (the stages' `dataset_dir` setting)."
        ) from e

