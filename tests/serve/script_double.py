"""A model double that answers with a script, whatever the prompt (UI and chat-route tests)."""
import torch
from serve_doubles import ASSISTANT_START, MockModel


class ScriptModel(MockModel):
    """Answers any prompt with `script`: at each position, the token `script[n]` where n counts the
    tokens since the last <|assistant_start|>. It keeps each row's token ids in its KV cache (where a
    real model keeps keys), so it works with the serving scheduler's per-row cache, whose rows move
    between slots, as with Engine.generate's shared one."""

    def __init__(self, script, context, vocab_size=265):
        super().__init__(vocab_size)
        self.config.sequence_len = context
        self.script = script

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            start = int(kv_cache.cache_seqlens[b]) if kv_cache.per_row else kv_cache.get_pos()
            kv_cache.k_cache[0, b, start:start + T, 0, 0] = ids[b].float()
            history = kv_cache.k_cache[0, b, :start + T, 0, 0].long().tolist()
            last = max((i for i, tok in enumerate(history[:start]) if tok == ASSISTANT_START), default=None)
            for t in range(T):
                if history[start + t] == ASSISTANT_START:
                    last = start + t
                n = start + t - last if last is not None else 0
                logits[b, t, self.script[min(n, len(self.script) - 1)]] = 40.0
        kv_cache.advance(T)
        return logits
