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
