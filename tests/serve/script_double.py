"""A model double that answers with a script, whatever the prompt (UI and chat-route tests)."""
import weakref

import torch
from serve_doubles import MockModel


class ScriptModel(MockModel):
    """Answers any prompt with `script`: the token at each position after the prompt (the KV cache
    says where a sequence is), whatever the prompt was."""

    def __init__(self, script, context, vocab_size=265):
        super().__init__(vocab_size)
        self.config.sequence_len = context
        self.script, self.start = script, weakref.WeakKeyDictionary()

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if T > 1 or kv_cache not in self.start:  # prefill: the reply starts after these T tokens
            self.start[kv_cache] = kv_cache.get_pos() + T
        kv_cache.advance(T)
        i = min(kv_cache.get_pos() - self.start[kv_cache], len(self.script) - 1)
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, self.script[i]] = 40.0
        return logits
