"""GSM8K grade-school math (openai/gsm8k), rendered with calculator tool calls.

The reference solutions annotate each computation as `<<48/2=24>>`; each annotation
becomes a python part (the expression, supervised) and a python_output part (the result,
which the Engine's calculator injects at inference). The final line `#### 72` is the answer.
"""
import re

from nanopipe.tasks.common import Task, load_hf_dataset

GSM_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(completion):
    """The number after the first `#### `, commas removed, as a string; None if absent."""
    match = GSM_RE.search(completion)
    if match:
        return match.group(1).strip().replace(",", "")
    return None


def answer_to_parts(answer):
    """Split a GSM8K-style answer on `<<expr=result>>` into text/python/python_output parts."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            # split on the last '=' so that `a=b=c` gives expr `a=b`, result `c` (nanochat)
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def grade_final_answer(conversation, assistant_response):
    """1 if the response's `#### n` equals the reference's (last assistant part), else 0.

    String equality after comma stripping, as nanochat: `72.0` != `72`."""
    if not isinstance(assistant_response, str):
        raise TypeError(f"expected the completion as a string, got {type(assistant_response).__name__}")
    assistant_message = conversation["messages"][-1]
    if assistant_message["role"] != "assistant" or not isinstance(assistant_message["content"], list):
        raise ValueError("the reference conversation must end with an assistant message made of parts")
    ref_num = extract_answer(assistant_message["content"][-1]["text"])
    pred_num = extract_answer(assistant_response)
    return int(pred_num == ref_num)


class GSM8K(Task):

    def __init__(self, subset, split, dataset_dir=None, cache_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main|socratic, got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train|test, got {split!r}")
        ds = load_hf_dataset("openai/gsm8k", subset, split, dataset_dir, cache_dir)
        # same order as nanochat's .shuffle(seed=42); indices kept in memory, so no cache file is written
        self.ds = ds.shuffle(seed=42, keep_in_memory=True)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        return grade_final_answer(conversation, assistant_response)

    def reward(self, conversation, assistant_response):
        return float(self.evaluate(conversation, assistant_response))
