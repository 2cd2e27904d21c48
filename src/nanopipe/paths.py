"""Artifact locations, relative to the repo root (where DVC runs every stage).

dvc.yaml names the same paths; tests/test_pipeline.py checks the two agree.
"""
from pathlib import Path

DATA = Path("data")
SHARDS = DATA / "shards"  # parquet shards + manifest.json
MANIFEST = SHARDS / "manifest.json"
MODELS = Path("models")
TOKENIZER = MODELS / "tokenizer"
CHECKPOINTS = {"base": MODELS / "base", "sft": MODELS / "sft", "rl": MODELS / "rl"}
HF_EXPORT = MODELS / "hf"  # the shareable Hugging Face model (export stage)
RESUME = MODELS / "resume"  # in-progress training checkpoints (DVC `persist: true`)
METRICS = Path("metrics")
SECTIONS = METRICS / "sections"  # one markdown report section per stage


# What each stage reads and writes among the artifacts: its data deps and outputs in dvc.yaml (the code deps
# and its own metrics/section aside; tests/test_lineage.py checks the two agree). The stage contract records
# their fingerprints in every metrics file (`lineage`), so a metrics file that an experiment inherited from
# an older run can be told from one computed from the experiment's own artifacts (docs/decisions.md, D21).
# A stage's input that is an option (rl.source=base, export.source=sft) is recorded as dvc.yaml declares it.
_BASE, _SFT, _RL = CHECKPOINTS["base"], CHECKPOINTS["sft"], CHECKPOINTS["rl"]
LINEAGE: dict[str, tuple[list[Path], list[Path]]] = {
    "download": ([], [SHARDS]),
    "tokenizer": ([SHARDS], [TOKENIZER]),
    "tok_eval": ([SHARDS, TOKENIZER], []),
    "pretrain": ([SHARDS, TOKENIZER], [_BASE]),
    "base_eval": ([SHARDS, TOKENIZER, _BASE], []),
    "sft": ([TOKENIZER, _BASE], [_SFT]),
    "rl": ([TOKENIZER, _SFT], [_RL]),
    "chat_eval": ([TOKENIZER, _SFT, _RL], []),
    "export": ([TOKENIZER, _RL, *(METRICS / f"{s}.json" for s in ("pretrain", "base_eval", "sft", "rl", "chat_eval"))],
               [HF_EXPORT]),
    "lm_eval": ([HF_EXPORT], []),
    "report": ([METRICS / f"{s}.json" for s in ("download", "tokenizer", "tok_eval", "pretrain", "base_eval", "sft", "rl",
                                               "chat_eval", "export")]
               + [METRICS / stage / f"{name}.csv" for stage, name in (("pretrain", "train"), ("pretrain", "val"),
                                                                      ("sft", "train"), ("sft", "val"),
                                                                      ("rl", "reward"), ("rl", "pass_at_k"))], []),
}


def metrics_file(stage: str) -> Path:
    return METRICS / f"{stage}.json"


def plot_file(stage: str, name: str) -> Path:
    return METRICS / stage / f"{name}.csv"


def section_file(stage: str) -> Path:
    return SECTIONS / f"{stage}.md"


def checkpoint_dir(source: str) -> Path:
    """models/<source>; `auto` is the newest lifecycle stage that has a model (rl, then sft, then base)."""
    if source != "auto":
        return CHECKPOINTS[source]
    for name in ("rl", "sft", "base"):
        if (CHECKPOINTS[name] / "meta.json").exists():
            return CHECKPOINTS[name]
    raise FileNotFoundError(f"no model found in {', '.join(str(p) for p in CHECKPOINTS.values())}: "
                            "run `dvc repro` first (pretrain writes models/base)")
