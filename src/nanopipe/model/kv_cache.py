"""KV cache for incremental decoding, in the layout flash-attention's kvcache API expects
(nanochat nanochat/engine.py @1ec0a34, KVCache).

Contract with the model: every layer of one forward writes at the same position `get_pos()`;
the attention module of the LAST layer calls `advance(T)` once, after its write.
`cache_seqlens` is int32 because FA3 requires it.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        """num_heads is the number of KV heads (n_kv_head); seq_len is the maximum length."""
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    def reset(self):
        self.cache_seqlens.zero_()

    def get_pos(self) -> int:
        return int(self.cache_seqlens[0].item())

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens: int):
        self.cache_seqlens += num_tokens

    def prefill(self, other: "KVCache"):
        """Copy another (typically batch-1) cache into this empty one, broadcasting over rows."""
        assert self.get_pos() == 0, "Cannot prefill a non-empty KV cache"
        assert (self.n_layers, self.n_heads, self.head_dim) == (other.n_layers, other.n_heads, other.head_dim), \
            "KV cache geometry mismatch (layers, heads, head_dim)"
        assert self.max_seq_len >= other.max_seq_len, "cannot prefill from a longer cache"
        pos = other.get_pos()
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
