"""SmolTalk general chat (HuggingFaceTB/smol-smoltalk). Training and bpb only: no evaluate.

Rows may start with a system message; it is kept (the tokenizer folds it into the first user turn)."""
from nanopipe.tasks.common import Task, load_hf_dataset


class SmolTalk(Task):

    def __init__(self, split, dataset_dir=None, cache_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train|test, got {split!r}")
        ds = load_hf_dataset("HuggingFaceTB/smol-smoltalk", None, split, dataset_dir, cache_dir)
        # same order as nanochat's .shuffle(seed=42); indices kept in memory, so no cache file is written
        self.ds = ds.shuffle(seed=42, keep_in_memory=True)
        self.length = len(self.ds)

    def num_examples(self):
        return self.length

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        if len(messages) < 1:
            raise ValueError(f"SmolTalk row {index} has no messages")
        rest = messages[1:] if messages[0]["role"] == "system" else messages
        if len(rest) < 2:
            raise ValueError(f"SmolTalk row {index} must have at least 2 non-system messages, got {len(rest)}")
        for i, message in enumerate(rest):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"SmolTalk row {index}: message {i} has role {message['role']!r}, expected {expected!r}")
            if not isinstance(message["content"], str):
                raise ValueError(f"SmolTalk row {index}: message {i} content must be a string")
        # only role/content travel on (the hub rows have no other keys today, but be explicit)
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
