"""KV cache for incremental decoding, in the layout flash-attention's kvcache API expects
(nanochat nanochat/engine.py @1ec0a34, KVCache).

Contract with the model: every layer of one forward writes at the rows' positions
`cache_seqlens`; the attention module of the LAST layer calls `advance(T)` once, after its write.
`cache_seqlens` is int32 because FA3 requires it.

Two modes (docs/decisions.md, D14):
- shared position (the default; training-time evaluation, Engine.generate): every row sits at
  `get_pos()`, row 0's length, exactly as nanochat's cache;
- per-row positions (`per_row=True`; the serving scheduler): each row has its own length in
  `cache_seqlens`, and the model gives each row its own rotary positions, cache writes and
  causal/window mask. flash_attn_with_kvcache takes per-row `cache_seqlens` natively; the SDPA
  fallback writes row by row (one indexed store) and masks.
`rows(start, stop)` is a view of some rows (same storage, `cache_seqlens` a view too), so a
forward over a slice of the slots advances exactly those rows of the parent cache.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype, per_row=False):
        """num_heads is the number of KV heads (n_kv_head); seq_len is the maximum length."""
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        self.per_row = per_row
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

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as a cache of their own that shares this one's storage (writes and
        `advance` land in this cache)."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop} outside a cache of {self.batch_size} rows")
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.batch_size = stop - start
        view.k_cache = self.k_cache[:, start:stop]
        view.v_cache = self.v_cache[:, start:stop]
        view.cache_seqlens = self.cache_seqlens[start:stop]
        return view

    def move(self, src: int, dst: int, length: int):
        """Copy row `src`'s first `length` entries (and its length) into row `dst`."""
        self.k_cache[:, dst, :length] = self.k_cache[:, src, :length]
        self.v_cache[:, dst, :length] = self.v_cache[:, src, :length]
        self.cache_seqlens[dst] = self.cache_seqlens[src]

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
