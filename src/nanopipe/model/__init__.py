"""The model library: GPT, attention backends, KV cache, Muon/AdamW optimizers, checkpoints, FP8."""
from nanopipe.model.gpt import GPT, GPTConfig, config_from_depth, create_model, maybe_compile
from nanopipe.model.kv_cache import KVCache

__all__ = ["GPT", "GPTConfig", "config_from_depth", "create_model", "maybe_compile", "KVCache"]
