"""nanopipe: the nanochat LLM lifecycle as a declarative DVC + Hydra + MLflow pipeline."""

__version__ = "0.1.0"
