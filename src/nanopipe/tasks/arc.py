"""ARC science questions (allenai/ai2_arc), Easy and Challenge, as multiple choice.

Letters come verbatim from the dataset: usually A-D, sometimes 1-4 or up to E."""
from nanopipe.tasks.common import Task, load_hf_dataset, render_mc


class ARC(Task):

    def __init__(self, subset, split, dataset_dir=None, cache_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy|ARC-Challenge, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train|validation|test, got {split!r}")
        ds = load_hf_dataset("allenai/ai2_arc", subset, split, dataset_dir, cache_dir)
        # same order as nanochat's .shuffle(seed=42); indices kept in memory, so no cache file is written
        self.ds = ds.shuffle(seed=42, keep_in_memory=True)

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        letters = row["choices"]["label"]
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {index}: answer {answer!r} must be one of {letters}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, assistant_response):
        if assistant_response not in conversation["letters"]:
            raise ValueError(f"ARC answer {assistant_response!r} is expected to be one of {conversation['letters']}")
        return assistant_response == conversation["messages"][-1]["content"]
