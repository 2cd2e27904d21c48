"""Batched sampling for the serving scheduler: one call samples every row of a decode step.

Each row has its own temperature (0 = greedy), top-k, top-p, presence/frequency penalties and
seed; the whole batch is a few tensor ops with no per-row host sync (the caller reads the ids
back with one `.tolist()`). The Engine keeps its own sampler (inference/engine.py,
`sample_next_token`, one torch.Generator per call): its seeded outputs are pinned by training,
evaluation and their tests. This one is the server's (docs/decisions.md, D14).

Order of operations for a row (as vLLM's sampler):
    logits -> presence/frequency penalties -> greedy? argmax
           -> / temperature -> top-k -> softmax -> top-p -> draw
- penalties (OpenAI's definition): logit[t] -= presence * (count[t] > 0) + frequency * count[t],
  count = how often t was generated so far in this request (the prompt does not count);
- top-k: keep the k largest (None or 0 = all; k >= V = all);
- top-p: keep the smallest prefix of the tokens sorted by probability whose mass reaches p
  (token i is kept when the mass of the tokens before it is < p: at an exact boundary the
  tokens after it are cut);
- the draw inverts the CDF at one uniform per row, from a counter-based generator:
  u = hash(seed, step), step = the index of the token in the request. A request's draws
  therefore depend only on its own seed and logits, never on what else shares the batch, the
  slot it sits in, or the device, and need no generator state at all.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64, without int64 overflow: c is split
    into its top bit and the rest (< 2**31), so each product stays below 2**63."""
    lo, hi = c & 0x7FFFFFFF, c >> 31
    return (x * lo + ((x & 1) << 31) * hi) & MASK32


def _hash32(x):
    """A 32-bit integer mix (Wellons' lowbias32: full avalanche) on int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """A seed (any int torch.Generator would take: [-2**63, 2**64)) as two 32-bit words."""
    seed %= 2**64
    return seed & MASK32, seed >> 32


def counter_uniform(seed_lo, seed_hi, step):
    """One float32 in [0, 1) per row from int64 tensors (seed words, step), a pure function of
    the three: hash(seed_lo ^ hash(seed_hi ^ hash(step ^ k)))."""
    x = _hash32((step & MASK32) ^ 0x9E3779B9)
    x = _hash32(seed_hi ^ x)
    x = _hash32(seed_lo ^ x)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 bits: exact in float32


class RowParams:
    """The sampling parameters of the rows of one step, as tensors on `device`, plus what the
    host knows about them (which stages any row needs, so unused ones cost nothing)."""

    def __init__(self, rows, device):
        """rows: per row (temperature, top_k, top_p, presence, frequency, seed_lo, seed_hi, step)."""
        floats = torch.tensor([r[:5] for r in rows], dtype=torch.float32)
        ints = torch.tensor([r[5:] for r in rows], dtype=torch.int64)
        self.temperature, self.top_k, self.top_p, self.presence, self.frequency = floats.to(device).unbind(1)
        self.seed_lo, self.seed_hi, self.step = ints.to(device).unbind(1)
        sampling = [r for r in rows if r[0] > 0]
        self.all_greedy = not sampling
        self.penalties = any(r[3] != 0 or r[4] != 0 for r in rows)
        self.any_top_p = any(r[2] < 1.0 for r in sampling)
        self.max_top_k = max((int(r[1]) for r in sampling if r[1] > 0), default=0)
        self.every_row_top_k = bool(sampling) and all(r[1] > 0 for r in sampling)


def apply_penalties(logits, counts, presence, frequency):
    """logits (n, V) minus presence * (count > 0) + frequency * count, per row."""
    return logits - presence.unsqueeze(1) * (counts > 0).to(logits.dtype) - frequency.unsqueeze(1) * counts


def sample(logits, params: RowParams, counts=None):
    """One token id per row of logits (n, V) float32 -> (n,) int64 on the logits' device.
    counts (n, V): tokens generated so far per row (needed when any row has a penalty)."""
    if params.penalties:
        logits = apply_penalties(logits, counts, params.presence, params.frequency)
    greedy = logits.argmax(dim=-1)
    if params.all_greedy:
        return greedy
    V = logits.size(-1)
    temperature = torch.where(params.temperature > 0, params.temperature, torch.ones_like(params.temperature))
    scaled = logits / temperature.unsqueeze(1)
    if params.any_top_p or (params.max_top_k and not params.every_row_top_k):
        ranked, order = scaled.sort(dim=-1, descending=True)  # some row needs the whole ranking
    elif params.max_top_k:
        ranked, order = scaled.topk(min(params.max_top_k, V), dim=-1)  # every row keeps at most max_top_k
    else:
        ranked, order = scaled, None  # no truncation anywhere: sample the softmax as it is
    K = ranked.size(-1)
    if order is not None:
        k = torch.where(params.top_k > 0, params.top_k.clamp(max=K), torch.full_like(params.top_k, K))
        ranked = ranked.masked_fill(torch.arange(K, device=ranked.device) >= k.unsqueeze(1), float("-inf"))
    probs = torch.softmax(ranked, dim=-1)
    if params.any_top_p:
        before = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked above each one
        probs = probs.masked_fill(before >= params.top_p.unsqueeze(1), 0.0)
    u = counter_uniform(params.seed_lo, params.seed_hi, params.step)
    cdf = probs.cumsum(dim=-1)
    u = (u * cdf[:, -1]).unsqueeze(1)  # scaled to the row's kept mass (top-k/top-p need no renormalising)
    pick = torch.searchsorted(cdf, u, right=True)
    kept = (probs > 0).sum(dim=-1, keepdim=True)  # kept tokens are a prefix when ranked
    pick = torch.minimum(pick, kept - 1) if order is not None else pick.clamp_(max=K - 1)
    ids = pick.squeeze(1) if order is None else order.gather(1, pick).squeeze(1)
    return torch.where(params.temperature > 0, ids, greedy)


def token_logprobs(logits, chosen, k):
    """Raw logprobs (log_softmax of the model's logits, before any sampling transform) of the
    chosen token per row and, with k > 0, the k best: (chosen_lp (n,), top_lp (n, k), top_ids (n, k))."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = lp.gather(1, chosen.unsqueeze(1)).squeeze(1)
    if k > 0:
        top_lp, top_ids = lp.topk(min(k, lp.size(-1)), dim=-1)
    else:
        top_lp = top_ids = lp.new_empty((lp.size(0), 0))
    return chosen_lp, top_lp, top_ids
