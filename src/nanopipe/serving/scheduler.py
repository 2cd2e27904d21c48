"""
Continuous batching: many requests decode together on one model copy.

A Worker owns one model copy and a background thread running the decode loop:

    loop:
        admit queued requests into free slots (prefill each prompt, batch 1, exactly as
        Engine.generate does) and sample their first token
        one batched forward: every active sequence feeds its last token at its own position
        sample each row with its own generator / temperature / top-k, run the calculator
        tool state machine, hand the token to the request's consumer
        retire finished or cancelled rows, freeing their slots

Sequences sit at different positions, which the model's KV-cache forward does not
support (its rotary offset and cache write position are shared by all rows). The batched
step therefore re-runs GPT.forward's arithmetic for one new token per row with per-row
rotary positions, per-row cache writes and an explicit attention mask (SDPA), reading the
model's own modules. At start-up the worker checks that this step reproduces
model.forward's logits; if it does not (a model with other internals, a test double), it
falls back to decoding each sequence separately with the model's own forward, which is
correct but not batched.

Consumers receive events through a callback (`emit`), called on the worker thread and
never allowed to block it: the server wraps an asyncio queue, `generate` a queue.Queue.
Events: ("token", id, mask) for each emitted token (never the terminator), then exactly
one ("done", finish_reason) with finish_reason "stop" | "length" | "cancelled", or
("error", message).
"""
import copy
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nanopipe.model.gpt import SOFTCAP, apply_rotary_emb, norm
from nanopipe.model.kv_cache import KVCache
from nanopipe.inference.engine import RowState, ToolTokens, kv_cache_dtype, sample_next_token, step_row

logger = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# Decoders: where the KV of each slot lives and how one step over many slots runs


class BatchedGPTDecoder:
    """All slots in one (L, S, T, Hkv, D) cache; one forward per step over the active slots
    (always slots 0..n-1: the worker keeps them compact)."""

    def __init__(self, model, max_batch, capacity, device, dtype):
        m = model.config
        self.model, self.capacity = model, capacity
        self.n_head, self.n_kv_head, self.head_dim = m.n_head, m.n_kv_head, m.n_embd // m.n_head
        shape = (m.n_layer, max_batch, capacity, self.n_kv_head, self.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.device, self.dtype = device, dtype

    @staticmethod
    def supports(model):
        needed = ["transformer", "lm_head", "cos", "sin", "window_sizes", "value_embeds", "resid_lambdas", "x0_lambdas",
                  "rotary_dtype"]
        return all(hasattr(model, name) for name in needed) and hasattr(model.transformer, "h")

    def prefill(self, slot, tokens):
        """Run the prompt through model.forward (as Engine does) and store its K/V in `slot`."""
        cache = _prefill_cache(self.model, tokens, self.device, self.dtype)
        logits = self.model.forward(torch.tensor([tokens], dtype=torch.long, device=self.device), kv_cache=cache)
        n = len(tokens)
        self.k[:, slot, :n] = cache.k_cache[:, 0, :n]
        self.v[:, slot, :n] = cache.v_cache[:, 0, :n]
        return logits[0, -1, :]

    def move(self, src, dst, length):
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]

    def step(self, ids, positions):
        """ids, positions: (n,) long tensors for slots 0..n-1 -> logits (n, V) float32.
        Mirrors GPT.forward for T=1, with row r's token at positions[r]."""
        model = self.model
        n = ids.size(0)
        idx = ids.view(n, 1)
        end = int(positions.max().item()) + 1
        cos = model.cos[0, positions].unsqueeze(1)  # (n, 1, 1, D/2), broadcast over heads
        sin = model.sin[0, positions].unsqueeze(1)
        col = torch.arange(end, device=ids.device).unsqueeze(0)
        behind = positions.unsqueeze(1) - col  # how far back each key is; < 0 = not written yet
        rows = torch.arange(n, device=ids.device)
        x = norm(model.transformer.wte(idx))
        x0 = x
        dtype = model.rotary_dtype(ids.device.type)
        cos, sin = cos.to(dtype), sin.to(dtype)
        for i, block in enumerate(model.transformer.h):
            x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
            ve = model.value_embeds[str(i)](idx) if str(i) in model.value_embeds else None
            window = model.window_sizes[i][0]
            mask = behind >= 0
            if 0 <= window < end:
                mask = mask & (behind <= window)
            x = x + self._attention(block.attn, i, norm(x), ve, cos, sin, rows, positions, end, mask)
            x = x + block.mlp(norm(x))
        x = norm(x)
        logits = model.lm_head(x)[:, 0, :model.config.vocab_size].float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def _attention(self, attn, layer, x, ve, cos, sin, rows, positions, end, mask):
        n = x.size(0)
        q = attn.c_q(x).view(n, 1, self.n_head, self.head_dim)
        k = attn.c_k(x).view(n, 1, self.n_kv_head, self.head_dim)
        v = attn.c_v(x).view(n, 1, self.n_kv_head, self.head_dim)
        if ve is not None:
            ve = ve.view(n, 1, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(attn.ve_gate(x[..., :attn.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        self.k[layer, rows, positions] = k[:, 0].to(self.dtype)
        self.v[layer, rows, positions] = v[:, 0].to(self.dtype)
        keys = self.k[layer, :n, :end].transpose(1, 2)  # (n, Hkv, end, D)
        values = self.v[layer, :n, :end].transpose(1, 2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None, None, :],
                                           enable_gqa=self.n_head != self.n_kv_head)
        y = y.transpose(1, 2).contiguous().view(n, 1, -1)
        return attn.c_proj(y)


class SequentialDecoder:
    """Fallback: each slot has its own batch-1 KVCache and steps through model.forward."""

    def __init__(self, model, max_batch, capacity, device, dtype):
        self.model, self.capacity, self.device, self.dtype = model, capacity, device, dtype
        self.caches = [None] * max_batch

    def prefill(self, slot, tokens):
        m = self.model.config
        cache = KVCache(batch_size=1, num_heads=m.n_kv_head, seq_len=self.capacity, head_dim=m.n_embd // m.n_head,
                        num_layers=m.n_layer, device=self.device, dtype=self.dtype)
        logits = self.model.forward(torch.tensor([tokens], dtype=torch.long, device=self.device), kv_cache=cache)
        self.caches[slot] = cache
        return logits[0, -1, :]

    def move(self, src, dst, length):
        self.caches[dst], self.caches[src] = self.caches[src], None

    def step(self, ids, positions):
        out = []
        for slot in range(ids.size(0)):
            out.append(self.model.forward(ids[slot].view(1, 1), kv_cache=self.caches[slot])[0, -1, :])
        return torch.stack(out)


def _prefill_cache(model, tokens, device, dtype):
    m = model.config
    return KVCache(batch_size=1, num_heads=m.n_kv_head, seq_len=len(tokens), head_dim=m.n_embd // m.n_head,
                   num_layers=m.n_layer, device=device, dtype=dtype)


def _batched_step_matches(model, capacity, device, dtype, vocab_size):
    """Does BatchedGPTDecoder reproduce model.forward? Two rows at different positions are
    compared against separate Engine-style KV-cache decodes."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in (5, 9)]
    nxt = torch.randint(0, vocab_size, (2, 2), generator=gen)
    if max(len(p) for p in prompts) + 2 > capacity:
        return False, "model context too short for the self-check"
    batched = BatchedGPTDecoder(model, 2, capacity, device, dtype)
    sequential = SequentialDecoder(model, 2, capacity, device, dtype)
    worst = 0.0  # worst |difference| relative to the spread of the reference logits
    for slot, p in enumerate(prompts):
        batched.prefill(slot, p)
        sequential.prefill(slot, p)
    positions = torch.tensor([len(p) for p in prompts], device=device)
    for t in range(2):
        ids = nxt[:, t].to(device)
        a, b = batched.step(ids, positions).float(), sequential.step(ids, positions).float()
        worst = max(worst, ((a - b).abs().max() / (b.std(dim=-1).min() + 1e-6)).item())
        positions = positions + 1
    tol = 1e-3 if dtype == torch.float32 else 0.25
    return worst <= tol, f"max |logit diff| / logit std = {worst:.1e} (tolerance {tol:.0e})"

# -----------------------------------------------------------------------------
# Requests


class Request:
    """One generation: its prompt, sampling parameters and decode state. Consumers read its
    events; `cancel()` may be called from any thread and frees the slot at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt, max_tokens, temperature, top_k, seed, emit):
        self.id = next(Request._ids)
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.emit = emit
        self.cancelled = False
        self.finished = False
        self.worker_id = None
        # decode state (owned by the worker thread)
        self.state = RowState(list(prompt))
        self.rng = None
        self.num_generated = 0
        self.limit = 0
        self.pos = 0  # tokens in this row's cache
        self.next_input = None  # the token to feed at the next step
        self.submitted_at = time.perf_counter()
        self.first_token_at = None

    def cancel(self):
        self.cancelled = True


class Worker:
    """One model copy on one device plus its decode thread."""

    def __init__(self, worker_id, model, tokenizer, max_batch=16, max_seq_len=None, autocast_dtype=torch.bfloat16):
        self.id = worker_id
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(model.get_device())
        self.max_batch = max_batch
        self.capacity = max_seq_len or model.config.sequence_len
        self.special = ToolTokens(tokenizer)
        self.autocast_dtype = autocast_dtype
        self._pending = deque()
        self._active = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = None
        self._ready = threading.Event()
        self.decoder = None
        self.mode = None
        self._start_error = None
        self.stats = dict(tokens_generated=0, requests_completed=0, requests_cancelled=0, steps=0,
                          max_active_seen=0, rows_decoded=0)

    # --- public (any thread)
    def start(self):
        self._thread = threading.Thread(target=self._run, name=f"decode-worker-{self.id}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.mode is None:
            raise RuntimeError(f"decode worker {self.id} on {self.device} failed to start: {self._start_error}")

    def stop(self):
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, request):
        request.worker_id = self.id
        with self._wake:
            self._pending.append(request)
            self._wake.notify()

    def active_count(self):
        return sum(1 for r in list(self._active) if not r.finished)  # a finished row leaves at the step's end

    def load(self):
        return self.active_count() + len(self._pending)

    def snapshot(self):
        return dict(gpu_id=self.id, device=str(self.device), mode=self.mode, max_batch=self.max_batch,
                    context=self.capacity, active=self.active_count(), queued=len(self._pending), **self.stats)

    # --- decode thread
    def _autocast(self):
        # autocast is per thread: the decode thread enters it itself (bf16 on CUDA, as training ran)
        if self.device.type == "cuda" and self.autocast_dtype != torch.float32:
            return torch.amp.autocast(device_type="cuda", dtype=self.autocast_dtype)
        return nullcontext()

    def _run(self):
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with torch.inference_mode(), self._autocast():
                self._setup()
        except Exception as e:  # reported by start()
            logger.exception("decode worker %d failed to start", self.id)
            self._start_error = f"{type(e).__name__}: {e}"
            self._ready.set()
            return
        self._ready.set()
        with torch.inference_mode(), self._autocast():
            while True:
                with self._wake:
                    while not self._stop and not self._pending and not self._active:
                        self._wake.wait()
                    if self._stop:
                        break
                try:
                    self._admit()
                    if self._active:
                        self._step()
                except Exception as e:  # a device error fails the requests in flight, not the server
                    logger.exception("decode worker %d: step failed", self.id)
                    for req in self._active:
                        self._finish(req, "error", f"{type(e).__name__}: {e}")
                    self._active = []
        for req in list(self._active) + list(self._pending):
            self._finish(req, "done", "cancelled")

    def _setup(self):
        dtype = kv_cache_dtype(self.device, self.model)
        vocab = self.model.config.vocab_size if hasattr(self.model.config, "vocab_size") else 256
        mode, why = "sequential", "model lacks GPT internals"
        if BatchedGPTDecoder.supports(self.model):
            ok, detail = _batched_step_matches(self.model, self.capacity, self.device, dtype, vocab)
            if ok:
                mode, why = "batched", detail
            else:
                why = f"batched step disagrees with model.forward: {detail}"
                logger.warning("decode worker %d: %s; decoding sequences one at a time", self.id, why)
        cls = BatchedGPTDecoder if mode == "batched" else SequentialDecoder
        self.decoder = cls(self.model, self.max_batch, self.capacity, self.device, dtype)
        self.mode = mode
        logger.info("decode worker %d on %s: %s decoding, up to %d sequences of %d tokens (%s)",
                    self.id, self.device, mode, self.max_batch, self.capacity, why)

    def _admit(self):
        while len(self._active) < self.max_batch:
            with self._wake:
                if not self._pending:
                    return
                req = self._pending.popleft()
            if req.cancelled:
                self._finish(req, "done", "cancelled")
                continue
            slot = len(self._active)
            req.rng = torch.Generator(device=self.device)
            req.rng.manual_seed(req.seed)
            try:
                logits = self.decoder.prefill(slot, req.prompt)
            except Exception as e:
                logger.exception("decode worker %d: prefill failed", self.id)
                self._finish(req, "error", f"{type(e).__name__}: {e}")
                continue
            req.pos = len(req.prompt)
            req.limit = min(req.max_tokens, self.capacity - req.pos)
            self._active.append(req)
            self._advance(req, logits.unsqueeze(0))
            if req.finished:
                self._active.pop()
            self.stats["max_active_seen"] = max(self.stats["max_active_seen"], len(self._active))

    def _advance(self, req, logits):
        """Sample the row's next token (a forced one wins, as in Engine.generate) and emit it."""
        sampled = sample_next_token(logits, req.rng, req.temperature, req.top_k)[0, 0].item()
        token, mask = step_row(req.state, sampled, self.tokenizer, self.special)
        req.num_generated += 1
        self.stats["tokens_generated"] += 1
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if req.state.completed:  # assistant_end or bos: the terminator is not emitted
            self._finish(req, "done", "stop")
            return
        self._send(req, ("token", token, mask))
        req.next_input = token
        if req.num_generated >= req.limit:
            self._finish(req, "done", "length")

    def _step(self):
        active = self._active
        ids = torch.tensor([r.next_input for r in active], dtype=torch.long, device=self.device)
        positions = torch.tensor([r.pos for r in active], dtype=torch.long, device=self.device)
        logits = self.decoder.step(ids, positions)
        self.stats["steps"] += 1
        self.stats["rows_decoded"] += len(active)
        for i, req in enumerate(active):
            req.pos += 1
            if req.cancelled:
                self._finish(req, "done", "cancelled")
            else:
                self._advance(req, logits[i:i + 1])
        # retire finished rows and keep the survivors in slots 0..n-1 (a survivor only moves down)
        survivors = [r for r in active if not r.finished]
        for slot, req in enumerate(survivors):
            old = active.index(req)
            if old != slot:
                self.decoder.move(old, slot, req.pos)
        self._active = survivors

    def _finish(self, req, kind, detail):
        if req.finished:
            return
        req.finished = True
        if kind == "done" and detail == "cancelled":
            self.stats["requests_cancelled"] += 1
        else:
            self.stats["requests_completed"] += 1
        self._send(req, (kind, detail))

    def _send(self, req, event):
        try:
            req.emit(event)
        except Exception:  # e.g. the consumer's event loop is gone: treat as a disconnect
            logger.warning("request %d: consumer callback failed; cancelling", req.id, exc_info=True)
            req.cancelled = True

# -----------------------------------------------------------------------------
# Scheduler: the workers behind one submit()


class Scheduler:
    """Routes each request to the least loaded worker (one per model copy / device)."""

    def __init__(self, models, tokenizer, max_batch=16, max_seq_len=None, autocast_dtype=torch.bfloat16):
        models = models if isinstance(models, (list, tuple)) else [models]
        self.tokenizer = tokenizer
        self.workers = [Worker(i, m, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len,
                               autocast_dtype=autocast_dtype) for i, m in enumerate(models)]
        self.started = False

    @property
    def context_length(self):
        return min(w.capacity for w in self.workers)

    def start(self):
        for w in self.workers:
            w.start()
        self.started = True

    def shutdown(self):
        for w in self.workers:
            w.stop()
        self.started = False

    def submit(self, prompt, emit, max_tokens, temperature=1.0, top_k=None, seed=None):
        """Queue a generation; returns its Request (call .cancel() to abandon it)."""
        if not self.started:
            raise RuntimeError("scheduler is not running (call start())")
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a non-empty list of token ids")
        if len(prompt) >= self.context_length:
            raise ValueError(f"prompt is {len(prompt)} tokens; the model context is {self.context_length} tokens")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {temperature}")
        seed = random.randint(0, 2**31 - 1) if seed is None else seed
        req = Request(prompt, max_tokens, temperature, top_k, seed, emit)
        min(self.workers, key=lambda w: w.load()).submit(req)
        return req

    def generate(self, prompt, max_tokens, temperature=1.0, top_k=None, seed=None, timeout=None):
        """Blocking convenience: (tokens, masks, finish_reason) for one request."""
        events = queue.Queue()
        req = self.submit(prompt, events.put, max_tokens, temperature, top_k, seed)
        tokens, masks = [], []
        try:
            while True:
                ev = events.get(timeout=timeout)
                if ev[0] == "token":
                    tokens.append(ev[1])
                    masks.append(ev[2])
                elif ev[0] == "done":
                    return tokens, masks, ev[1]
                else:
                    raise RuntimeError(f"generation failed: {ev[1]}")
        finally:
            req.cancel()

    def stats(self):
        workers = [w.snapshot() for w in self.workers]
        return dict(
            total_workers=len(workers),
            available_workers=sum(1 for w in workers if w["active"] + w["queued"] < w["max_batch"]),
            busy_workers=sum(1 for w in workers if w["active"] + w["queued"] >= w["max_batch"]),
            active=sum(w["active"] for w in workers),
            queue_depth=sum(w["queued"] for w in workers),
            tokens_served=sum(w["tokens_generated"] for w in workers),
            requests_completed=sum(w["requests_completed"] for w in workers),
            max_batch_seen=max((w["max_active_seen"] for w in workers), default=0),
            workers=workers,
        )


def replicate_model(model, devices):
    """One model copy per device (the given model is used for its own device)."""
    own = torch.device(model.get_device())
    copies = []
    for d in devices:
        d = torch.device(d)
        copies.append(model if d == own else copy.deepcopy(model).to(d))
    return copies
