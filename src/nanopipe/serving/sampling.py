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


def _hash32(x: int) -> int:
    """A 32-bit integer mix (Wellons' lowbias32: full avalanche)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """A seed (any int torch.Generator would take: [-2**63, 2**64)) as two 32-bit words."""
    seed %= 2**64
    return seed & MASK32, seed >> 32


def counter_uniform(seed_words: tuple[int, int], step: int) -> float:
    """A float in [0, 1), a pure function of (seed, step): hash(lo ^ hash(hi ^ hash(step ^ k))),
    24 bits (exact in float32). Computed on the host, a microsecond a row: cheaper than a dozen
    tiny integer kernels per step, and the same on every device."""
    lo, hi = seed_words
    x = _hash32(lo ^ _hash32(hi ^ _hash32((step & MASK32) ^ 0x9E3779B9)))
    return (x >> 8) / (1 << 24)


class RowParams:
    """The sampling parameters of the rows of one step as (n, 1) columns on `device` (one
    host-to-device copy), plus what the host knows about them, so stages no row needs cost
    nothing (a step is a handful of kernels: this runs once per decoded token)."""

    def __init__(self, rows, device):
        """rows: per row (temperature, top_k, top_p, presence, frequency, (seed_lo, seed_hi), step)."""
        table = torch.tensor([(t if t > 0 else 1.0, k, p, pr, fr, counter_uniform(seed, step), t == 0)
                              for t, k, p, pr, fr, seed, step in rows], dtype=torch.float32).to(device)
        (self.temperature, self.top_k, self.top_p, self.presence, self.frequency, self.uniform,
         self.greedy) = table.split(1, dim=1)  # (n, 1) columns; greedy is 1.0 for temperature 0
        sampling = [r for r in rows if r[0] > 0]
        self.all_greedy = not sampling
        self.any_greedy = len(sampling) < len(rows)
        self.unit_temperature = all(r[0] in (0, 1) for r in rows)
        self.penalties = any(r[3] != 0 or r[4] != 0 for r in rows)
        self.any_top_p = any(r[2] < 1.0 for r in sampling)
        ks = {int(r[1]) for r in sampling}
        self.max_top_k = 0 if 0 in ks else max(ks, default=0)  # > 0: every sampling row keeps at most this many
        self.any_top_k = any(k > 0 for k in ks)
        self.one_top_k = len(ks) == 1  # every sampling row has the same top_k (no per-row mask needed)


def apply_penalties(logits, counts, presence, frequency):
    """logits (n, V) minus presence * (count > 0) + frequency * count, per row (presence,
    frequency: (n, 1))."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def sample(logits, params: RowParams, counts=None):
    """One token id per row of logits (n, V) float32 -> (n,) int64 on the logits' device.
    counts (n, V): tokens generated so far per row (needed when any row has a penalty)."""
    if params.penalties:
        logits = apply_penalties(logits, counts, params.presence, params.frequency)
    if params.all_greedy:
        return logits.argmax(dim=-1)
    scaled = logits if params.unit_temperature else logits / params.temperature
    # exact: the ranking holds exactly the tokens every sampling row keeps (the same top-k for all)
    exact = bool(params.max_top_k) and params.one_top_k and not params.any_top_p
    if params.any_top_p or (params.any_top_k and not params.max_top_k):
        ranked, order = scaled.sort(dim=-1, descending=True)  # some row needs the whole ranking
    elif params.max_top_k:
        ranked, order = scaled.topk(min(params.max_top_k, scaled.size(-1)), dim=-1)  # no row keeps more
    else:
        ranked, order = scaled, None  # no truncation anywhere: sample the softmax as it is
    K = ranked.size(-1)
    if params.any_top_k and not exact:  # rows keep fewer tokens than the ranking holds
        k = torch.where(params.top_k > 0, params.top_k.clamp(max=K), K)
        ranked = ranked.masked_fill(torch.arange(K, device=ranked.device) >= k, float("-inf"))
    probs = torch.softmax(ranked, dim=-1)
    if params.any_top_p:
        before = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked above each one
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    u = params.uniform * cdf[:, -1:]  # scaled to the row's kept mass (top-k/top-p need no renormalising)
    pick = torch.searchsorted(cdf, u, right=True)
    if order is None or exact:
        pick = pick.clamp_(max=K - 1)  # every token of the row is kept (u rounding up to the total lands here)
    else:  # the kept tokens are a prefix of the ranking: never step past the last one
        pick = torch.minimum(pick, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    ids = pick if order is None else order.gather(1, pick)
    if params.any_greedy:
        ids = torch.where(params.greedy > 0, logits.argmax(dim=-1, keepdim=True), ids)
    return ids.squeeze(1)


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
