"""MMLU multiple choice (cais/mmlu): `auxiliary_train` teaches the format in SFT, `all/test` is evaluated."""
from nanopipe.tasks.common import Task, load_hf_dataset, render_mc


class MMLU(Task):

    letters = ("A", "B", "C", "D")
    groups = ("abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
              "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
              "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
              "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
              "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
              "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
              "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
              "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
              "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
              "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
              "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
              "world_religions")

    def __init__(self, subset, split, dataset_dir=None, cache_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be all|auxiliary_train, got {subset!r}")
        if split not in ("train", "validation", "dev", "test"):
            raise ValueError(f"MMLU split must be train|validation|dev|test, got {split!r}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError(f"MMLU auxiliary_train only has split 'train', got {split!r}")
        self.subset = subset
        self.split = split
        ds = load_hf_dataset("cais/mmlu", subset, split, dataset_dir, cache_dir)
        # same order as nanochat's .shuffle(seed=42); indices kept in memory, so no cache file is written
        self.ds = ds.shuffle(seed=42, keep_in_memory=True)
        if subset == "auxiliary_train":
            # the aux-train rows are nested under a 'train' column; unwrapped after the shuffle (nanochat)
            self.ds = self.ds.map(lambda row: row["train"], remove_columns=["train"])

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        choices = row["choices"]
        if len(choices) != 4:
            raise ValueError(f"MMLU row {index} should have 4 choices, got {len(choices)}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], self.letters, choices)},
            {"role": "assistant", "content": self.letters[row["answer"]]},
        ]
        return {"messages": messages, "subject": row["subject"], "letters": self.letters}

    def evaluate(self, conversation, assistant_response):
        if assistant_response not in self.letters:
            raise ValueError(f"MMLU answer {assistant_response!r} is expected to be one of {self.letters}")
        return assistant_response == conversation["messages"][-1]["content"]
