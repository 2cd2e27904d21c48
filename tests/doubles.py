"""Test doubles shared by several test modules."""
from types import SimpleNamespace

import torch


class ScriptedModel:
    """Engine double: after any prompt it emits script[i] as its i-th generated token (argmax)."""

    def __init__(self, script, vocab_size):
        self.script, self.vocab_size = script, vocab_size
        self.config = SimpleNamespace(n_kv_head=1, n_head=1, n_embd=8, n_layer=1, sequence_len=8192)
        self.prompt_len = 0

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if kv_cache.get_pos() == 0:
            self.prompt_len = T
        kv_cache.advance(T)
        i = kv_cache.get_pos() - self.prompt_len
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, self.script[min(i, len(self.script) - 1)]] = 50.0
        return logits
