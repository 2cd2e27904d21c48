"""Inference below training, evaluation and serving: the Engine (KV-cached sampling with the calculator tool)."""
