"""Tasks: conversations for SFT/RL and graded problems for chat evaluation (nanochat's tasks/).

Remote (Hugging Face `datasets`, cached; `dataset_dir=` for local copies): SmolTalk, MMLU, ARC, GSM8K.
Embedded (offline): SpellingBee, SimpleSpelling, HumanEval, CustomJSON (+ the identity set), Arithmetic.

    from nanopipe.tasks import GSM8K, TaskMixture

Names are imported on first use, so `python -m nanopipe.tasks.<module>` runs cleanly and importing
the package costs nothing; `datasets` itself is imported only when a remote task is constructed.
"""
import importlib

_EXPORTS = {
    "Task": "common", "TaskMixture": "common", "TaskSequence": "common", "render_mc": "common",
    "check_conversation": "common", "load_hf_dataset": "common", "DatasetUnavailableError": "common",
    "ARC": "arc", "MMLU": "mmlu", "GSM8K": "gsm8k", "extract_answer": "gsm8k", "SmolTalk": "smoltalk",
    "HumanEval": "humaneval", "CustomJSON": "customjson", "IDENTITY_PATH": "customjson",
    "SpellingBee": "spellingbee", "SimpleSpelling": "spellingbee", "Arithmetic": "arithmetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nanopipe.tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nanopipe.tasks.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
