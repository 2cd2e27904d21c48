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

Isolation: a failure while admitting one request (seeding its generator, its prefill, its
first sample) or while sampling / stepping the tool state / emitting one row of a step ends
that request with an "error" event and nothing else. Only a failure of the batched forward
itself, which all active rows share, fails every row of that step. Supervision: the decode
thread's loop runs under a supervisor in the same thread; anything that escapes the loop
fails the requests the worker held, the decoder is rebuilt and the loop resumes (at most
MAX_RESTARTS times in RESTART_WINDOW_S seconds). After that, or if the thread is gone, the
worker is dead: `alive` is False, the scheduler stops routing to it, and /health reports the
server unhealthy (503) once no worker is alive.
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

MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
STOP_JOIN_S = 10.0  # how long shutdown waits for each decode thread
TORCH_MIN_SEED, TORCH_MAX_SEED = -2**63, 2**64 - 1  # what torch.Generator.manual_seed takes (negative: 2**64 + seed)


def seeded_generator(device, seed):
    """A torch.Generator on `device` seeded with `seed` (checked first: an int torch can take)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not (TORCH_MIN_SEED <= seed <= TORCH_MAX_SEED):
        raise ValueError(f"seed must be an integer in [{TORCH_MIN_SEED}, {TORCH_MAX_SEED}], got {seed!r}")
    rng = torch.Generator(device=device)
    rng.manual_seed(seed)
    return rng


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
        self.dead = None  # why the worker gave up (restarts exhausted), else None
        self._restarts = deque()  # when the loop was restarted (within RESTART_WINDOW_S)
        self.stats = dict(tokens_generated=0, requests_completed=0, requests_cancelled=0, requests_failed=0,
                          steps=0, max_active_seen=0, rows_decoded=0, restarts=0)

    # --- public (any thread)
    def start(self):
        self._thread = threading.Thread(target=self._run, name=f"decode-worker-{self.id}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.mode is None:
            raise RuntimeError(f"decode worker {self.id} on {self.device} failed to start: {self._start_error}")

    def stop(self, timeout=STOP_JOIN_S):
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def request_stop(self):
        with self._wake:
            self._stop = True
            self._wake.notify()

    @property
    def alive(self):
        """The decode thread is running its loop (False before start, after stop, or once dead)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop and self.dead is None

    def submit(self, request):
        request.worker_id = self.id
        with self._wake:
            if self._stop or self.dead is not None:
                raise RuntimeError(f"decode worker {self.id} is not running")
            self._pending.append(request)
            self._wake.notify()

    def active_count(self):
        return sum(1 for r in list(self._active) if not r.finished)  # a finished row leaves at the step's end

    def load(self):
        return self.active_count() + len(self._pending)

    def snapshot(self):
        return dict(gpu_id=self.id, device=str(self.device), mode=self.mode, max_batch=self.max_batch,
                    context=self.capacity, active=self.active_count(), queued=len(self._pending),
                    alive=self.alive, dead=self.dead, **self.stats)

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
        try:
            self._supervise()
        finally:
            with self._wake:
                left = list(self._active) + list(self._pending)
                self._active, self._pending = [], deque()
            for req in left:
                self._finish(req, "done", "cancelled")

    def _supervise(self):
        """Run the decode loop; if anything escapes it, fail what the worker held and restart it
        (with a fresh decoder), up to MAX_RESTARTS in RESTART_WINDOW_S; then the worker is dead."""
        while True:
            try:
                with torch.inference_mode(), self._autocast():
                    self._loop()
                return  # stopped
            except BaseException as e:
                logger.exception("decode worker %d: decode loop failed", self.id)
                reason = f"{type(e).__name__}: {e}"
                self._fail_all(f"decode worker {self.id} failed: {reason}")
                now = time.monotonic()
                self._restarts.append(now)
                while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
                    self._restarts.popleft()
                if len(self._restarts) > MAX_RESTARTS:
                    self.dead = f"{len(self._restarts)} failures in {RESTART_WINDOW_S:.0f}s, the last: {reason}"
                    logger.error("decode worker %d: giving up (%s)", self.id, self.dead)
                    self._fail_all(f"decode worker {self.id} is dead: {reason}")
                    return
                self.stats["restarts"] += 1
                try:
                    with torch.inference_mode(), self._autocast():
                        self._setup()
                except Exception as e2:
                    self.dead = f"restart failed: {type(e2).__name__}: {e2}"
                    logger.exception("decode worker %d: restart failed", self.id)
                    self._fail_all(f"decode worker {self.id} is dead: {self.dead}")
                    return
                logger.warning("decode worker %d restarted (%d in the last %.0fs)", self.id, len(self._restarts),
                               RESTART_WINDOW_S)

    def _fail_all(self, message):
        with self._wake:
            held = list(self._active) + (list(self._pending) if self.dead is not None else [])
            self._active = []
            if self.dead is not None:
                self._pending = deque()
        for req in held:
            try:
                self._finish(req, "error", message)
            except Exception:  # never let one consumer stop the others from hearing about it
                logger.exception("request %d: could not report the failure", req.id)

    def _wait_for_work(self):
        """Block until there is something to do; False once asked to stop."""
        with self._wake:
            while not self._stop and not self._pending and not self._active:
                self._wake.wait()
            return not self._stop

    def _loop(self):
        while self._wait_for_work():
            self._admit()
            if self._active:
                try:
                    logits = self._forward()
                except Exception as e:  # the shared batched forward: every active row fails, not the server
                    logger.exception("decode worker %d: step failed", self.id)
                    for req in self._active:
                        self._finish(req, "error", f"{type(e).__name__}: {e}")
                    self._active = []
                    continue
                self._sample_rows(logits)

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
            try:  # anything about this one request that fails ends this request only
                req.rng = seeded_generator(self.device, req.seed)
                logits = self.decoder.prefill(slot, req.prompt)
                req.pos = len(req.prompt)
                req.limit = min(req.max_tokens, self.capacity - req.pos)
                self._advance(req, logits.unsqueeze(0))
            except Exception as e:
                logger.exception("decode worker %d: admitting request %d failed", self.id, req.id)
                self._finish(req, "error", f"{type(e).__name__}: {e}")
                continue
            if not req.finished:
                self._active.append(req)  # its K/V sit in `slot`, the next free one
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

    def _forward(self):
        active = self._active
        ids = torch.tensor([r.next_input for r in active], dtype=torch.long, device=self.device)
        positions = torch.tensor([r.pos for r in active], dtype=torch.long, device=self.device)
        logits = self.decoder.step(ids, positions)
        self.stats["steps"] += 1
        self.stats["rows_decoded"] += len(active)
        return logits

    def _sample_rows(self, logits):
        active = self._active
        for i, req in enumerate(active):
            req.pos += 1
            if req.cancelled:
                self._finish(req, "done", "cancelled")
                continue
            try:  # one row's sampling / tool step / emit failing ends that row only
                self._advance(req, logits[i:i + 1])
            except Exception as e:
                logger.exception("decode worker %d: request %d failed", self.id, req.id)
                self._finish(req, "error", f"{type(e).__name__}: {e}")
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
        elif kind == "error":
            self.stats["requests_failed"] += 1
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

    def shutdown(self, timeout=STOP_JOIN_S):
        """Stop every worker (their requests end "cancelled"); waits at most `timeout` seconds in all."""
        for w in self.workers:
            w.request_stop()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.stop(timeout=max(0.0, deadline - time.monotonic()))
        self.started = False

    def alive_workers(self):
        return [w for w in self.workers if w.alive]

    @property
    def healthy(self):
        """Started and at least one decode worker alive."""
        return self.started and bool(self.alive_workers())

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
        if isinstance(seed, bool) or not isinstance(seed, int) or not (TORCH_MIN_SEED <= seed <= TORCH_MAX_SEED):
            raise ValueError(f"seed must be an integer in [{TORCH_MIN_SEED}, {TORCH_MAX_SEED}], got {seed!r}")
        workers = self.alive_workers()
        if not workers:
            raise RuntimeError("no decode worker is running")
        req = Request(prompt, max_tokens, temperature, top_k, seed, emit)
        min(workers, key=lambda w: w.load()).submit(req)
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
            requests_failed=sum(w["requests_failed"] for w in workers),
            alive_workers=sum(1 for w in workers if w["alive"]),
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
