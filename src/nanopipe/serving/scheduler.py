"""
Continuous batching: many requests decode together on one model copy (docs/decisions.md, D14).

A Worker owns one model copy, one KV cache of `max_batch` slots whose rows sit at their own
positions (KVCache(per_row=True), D14) and a background thread running the decode loop:

    loop:
        admit queued requests into free slots (no compute: a slot is just a cache row)
        prefill: one forward over the next chunk of the oldest admitted request still
            prefilling, and of the ones after it while the forward (padded to its longest chunk)
            stays within `prefill_chunk` tokens; a request whose prompt is done samples and emits
            its first token
        decode: one GPT.forward over every decoding row, each feeding its last token at its
            own position, then one batched sample (serving/sampling.py) of the whole step,
            the calculator tool state machine per row (a forced token wins, as in
            Engine.generate), and the events to each request's consumer
        retire finished or cancelled rows and keep the rest in slots 0..n-1

Running rows therefore wait for at most one prefill forward of `prefill_chunk` tokens per
step, however long the prompts that arrive, and a burst of short prompts is prefilled together
(D14 says why the chunk runs as its own forward rather than packed into the decode forward).
Decoding rows are always slots 0..d-1 and prefilling ones follow them (requests are admitted
and prefilled in order), so each forward is one contiguous view of the cache.

Sampling (serving/sampling.py): per-row temperature (0 = greedy), top-k, top-p,
presence/frequency penalties and a seed; the draws come from a counter-based generator of
(seed, token index), so a seeded request gives the same tokens whatever shares its batch.
Greedy requests give exactly Engine.generate's tokens.

Logprobs are the model's raw distribution: log_softmax of the logits BEFORE temperature,
top-k, top-p and penalties (vLLM's default "raw" logprobs mode), for the token actually emitted
(a forced calculator token too).

Consumers receive events through a callback (`emit`), called on the worker thread and never
allowed to block it: the server wraps an asyncio queue, `generate` a queue.Queue. Events:
    ("prompt", [None, lp_1, ..., lp_{n-1}])  once, before any token, with prompt_logprobs=True:
                                             lp_i scores prompt token i given the tokens before it
    ("token", id, mask, lp)                  each emitted token (never the terminator); mask 1 =
                                             sampled, 0 = forced by the tool; lp None without
                                             logprobs, else {"logprob": float, "top": [(id, logprob),
                                             ...]} (the `logprobs` best, best first; [] for 0)
    ("done", finish_reason)                  exactly once at the end: "stop" | "length" | "cancelled"
    ("error", message)                       instead of "done" when the request failed

Isolation: a failure while admitting or prefilling one request, or while stepping the tool
state / emitting one row, ends that request with an "error" event and nothing else. A failure
of the decode forward or of the batched sample, which all decoding rows share, fails every row
of that step. Supervision: the decode thread's loop runs under a supervisor in the same thread;
anything that escapes the loop fails the requests the worker held, the cache is rebuilt and the
loop resumes (at most MAX_RESTARTS times in RESTART_WINDOW_S seconds). After that, or if the
thread is gone, the worker is dead: `alive` is False, the scheduler stops routing to it, and
/health reports the server unhealthy (503) once no worker is alive.
"""
import copy
import itertools
import logging
import math
import queue
import random
import threading
import time
from collections import deque
from contextlib import nullcontext

import torch

from nanopipe.inference.engine import RowState, ToolTokens, decode_forward, kv_cache_dtype, step_row
from nanopipe.model.kv_cache import KVCache
from nanopipe.serving.sampling import RowParams, sample, split_seed, token_logprobs

logger = logging.getLogger(__name__)

MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
STOP_JOIN_S = 10.0  # how long shutdown waits for each decode thread
TORCH_MIN_SEED, TORCH_MAX_SEED = -2**63, 2**64 - 1  # the seeds torch.Generator.manual_seed takes (kept as the API's range)
PREFILL_CHUNK = 256  # prompt tokens per prefill forward: what a running row may wait per step
RATE_WINDOW_S = 10.0  # tokens_per_s is the decode rate over this many recent seconds
MAX_PENALTY = 2.0  # |presence|, |frequency| at most this (OpenAI's range)


class QueueFull(Exception):
    """Every slot is busy and `max_queue` requests already wait: try again in `retry_after` seconds."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


def check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, int) or not (TORCH_MIN_SEED <= seed <= TORCH_MAX_SEED):
        raise ValueError(f"seed must be an integer in [{TORCH_MIN_SEED}, {TORCH_MAX_SEED}], got {seed!r}")
    return seed


def _number(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# -----------------------------------------------------------------------------
# Requests


class Request:
    """One generation: its prompt, sampling parameters and decode state. Consumers read its
    events; `cancel()` may be called from any thread and frees the slot at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt, max_tokens, temperature, top_k, seed, emit, top_p=1.0, presence_penalty=0.0,
                 frequency_penalty=0.0, logprobs=None, prompt_logprobs=False):
        self.id = next(Request._ids)
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.seed = seed
        self.emit = emit
        self.cancelled = False
        self.finished = False
        self.worker_id = None
        # decode state (owned by the worker thread)
        self.state = RowState(list(prompt))
        self.seed_words = None
        self.num_generated = 0
        self.limit = 0
        self.slot = None
        self.pos = 0  # tokens in this row's cache
        self.next_input = None  # the token to feed at the next step; None while prefilling
        self.prompt_lps = None  # prompt logprobs so far (prompt_logprobs=True)
        self.carry = None  # logits of the last prompt token of the previous chunk (scores the next chunk's first)
        self.submitted_at = time.perf_counter()
        self.first_token_at = None

    def cancel(self):
        self.cancelled = True

    def sampling_row(self):
        """This row's entry of serving.sampling.RowParams."""
        return (self.temperature, self.top_k or 0, self.top_p, self.presence_penalty, self.frequency_penalty,
                self.seed_words, self.num_generated)


class Worker:
    """One model copy on one device plus its decode thread."""

    def __init__(self, worker_id, model, tokenizer, max_batch=16, max_seq_len=None, autocast_dtype=torch.bfloat16,
                 prefill_chunk=PREFILL_CHUNK):
        self.id = worker_id
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(model.get_device())
        self.max_batch = max_batch
        self.capacity = max_seq_len or model.config.sequence_len
        rotary = getattr(model, "cos", None)
        if isinstance(rotary, torch.Tensor) and self.capacity > rotary.size(1):
            raise ValueError(f"max_seq_len={self.capacity} is beyond the model's rotary table ({rotary.size(1)} positions)")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.vocab_size = model.config.vocab_size
        self.special = ToolTokens(tokenizer)
        self.autocast_dtype = autocast_dtype
        self._pending = deque()
        self._active = []  # the requests in slots 0..n-1, in slot order: decoding rows, then prefilling ones
        self._wake = threading.Condition()
        self._stop = False
        self._thread = None
        self._ready = threading.Event()
        self.cache = None
        self.counts = None  # (max_batch, V): tokens generated per slot (presence/frequency penalties)
        self.mode = None
        self._start_error = None
        self.dead = None  # why the worker gave up (restarts exhausted), else None
        self._restarts = deque()  # when the loop was restarted (within RESTART_WINDOW_S)
        self._rate_lock = threading.Lock()
        self._recent = deque()  # (time, tokens) of recent steps, for tokens_per_s
        self._started_at = time.monotonic()
        self.stats = dict(tokens_generated=0, requests_completed=0, requests_cancelled=0, requests_failed=0,
                          steps=0, max_active_seen=0, rows_decoded=0, restarts=0, prefill_chunks=0,
                          prefill_forwards=0, ttft_seconds_sum=0.0, ttft_count=0)

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

    def queued_count(self):
        return len(self._pending)

    def load(self):
        return self.active_count() + len(self._pending)

    def tokens_per_s(self):
        """Tokens emitted per second over the last RATE_WINDOW_S seconds (or since start, if shorter)."""
        now = time.monotonic()
        with self._rate_lock:
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()
            tokens = sum(n for _, n in self._recent)
        return tokens / max(min(RATE_WINDOW_S, now - self._started_at), 1e-3)

    def tokens_to_free_slot(self):
        """Tokens the row closest to its limit still has to decode (None with no decoding row)."""
        left = [r.limit - r.num_generated for r in list(self._active) if not r.finished and r.next_input is not None]
        return min(left) if left else None

    def snapshot(self):
        return dict(gpu_id=self.id, device=str(self.device), mode=self.mode, max_batch=self.max_batch,
                    context=self.capacity, active=self.active_count(), queued=len(self._pending),
                    alive=self.alive, dead=self.dead, tokens_per_s=self.tokens_per_s(), **self.stats)

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
        (with a fresh cache), up to MAX_RESTARTS in RESTART_WINDOW_S; then the worker is dead."""
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

    def _setup(self):
        m = self.model.config
        dtype = kv_cache_dtype(self.device, self.model)
        self.cache = KVCache(batch_size=self.max_batch, num_heads=m.n_kv_head, seq_len=self.capacity,
                             head_dim=m.n_embd // m.n_head, num_layers=m.n_layer, device=self.device, dtype=dtype,
                             per_row=True)
        self.counts = torch.zeros(self.max_batch, self.vocab_size, device=self.device)
        self._views = {}
        self._active = []
        self.mode = "batched"
        logger.info("decode worker %d on %s: up to %d sequences of %d tokens, prefill chunks of %d", self.id,
                    self.device, self.max_batch, self.capacity, self.prefill_chunk)

    def _rows(self, start, stop):
        """The cache's rows start..stop-1 (views are kept: they share the cache's storage)."""
        view = self._views.get((start, stop))
        if view is None:
            view = self._views[(start, stop)] = self.cache.rows(start, stop)
        return view

    def _loop(self):
        while self._wait_for_work():
            self._admit()
            self._retire()
            group = self._prefill_group()
            if group:
                self._prefill(group)
                self._retire()
            decoding = [r for r in self._active if r.next_input is not None]
            if decoding:
                self._decode(decoding)
                self._retire()

    def _admit(self):
        """Queued requests take the free slots (their prefill runs a chunk per step); cancelled ones
        leave the queue even while every slot is busy (they no longer count against max_queue)."""
        if self._pending and any(r.cancelled for r in list(self._pending)):
            with self._wake:
                gone = [r for r in self._pending if r.cancelled]
                self._pending = deque(r for r in self._pending if not r.cancelled)
            for req in gone:
                self._finish(req, "done", "cancelled")
        while len(self._active) < self.max_batch:
            with self._wake:
                if not self._pending:
                    return
                req = self._pending.popleft()
            if req.cancelled:
                self._finish(req, "done", "cancelled")
                continue
            try:  # anything about this one request that fails ends this request only
                req.seed_words = split_seed(check_seed(req.seed))
                req.slot = len(self._active)
                req.limit = min(req.max_tokens, self.capacity - len(req.prompt))
                req.prompt_lps = [None] if req.prompt_logprobs else None
                self.cache.cache_seqlens[req.slot] = 0
                self.counts[req.slot].zero_()
            except Exception as e:
                logger.exception("decode worker %d: admitting request %d failed", self.id, req.id)
                self._finish(req, "error", f"{type(e).__name__}: {e}")
                continue
            self._active.append(req)
            self.stats["max_active_seen"] = max(self.stats["max_active_seen"], len(self._active))

    def _prefill_group(self):
        """The prefilling rows (a suffix of the slots, in admission order) whose next chunks go into
        this step's prefill forward: the oldest always, then more while the forward, padded to its
        longest chunk, stays within `prefill_chunk` tokens (and every row within the cache)."""
        group, width = [], 0
        for req in self._active:
            if req.next_input is not None or req.finished:
                continue
            n = min(len(req.prompt) - req.pos, self.prefill_chunk)
            w = max(width, n)
            if group and (w * (len(group) + 1) > self.prefill_chunk
                          or any(r.pos + w > self.capacity for r in group + [req])):
                break
            group.append(req)
            width = w
        return group

    def _prefill(self, group):
        """One forward over the next chunk of every row of `group` (contiguous slots), padded to the
        longest: a row's real tokens never attend to the padding after them, and its length is set
        back to its real end. Then prompt logprobs, the prompt event and the first token of every
        row whose prompt is done. If the shared forward fails, each row is retried alone, so one
        bad prompt fails only itself."""
        try:
            logits, chunks = self._prefill_forward(group)
        except Exception as e:
            if len(group) == 1:
                logger.exception("decode worker %d: prefilling request %d failed", self.id, group[0].id)
                self._finish(group[0], "error", f"{type(e).__name__}: {e}")
                return
            logger.warning("decode worker %d: prefill of %d requests failed (%s: %s); prefilling each alone", self.id,
                           len(group), type(e).__name__, e)
            for req in group:
                self._prefill([req])
            return
        done, last = [], []
        for i, (req, (start, stop)) in enumerate(zip(group, chunks)):
            try:  # one row's scoring / events failing ends that row only
                req.pos = stop
                self.stats["prefill_chunks"] += 1
                if req.prompt_lps is not None:
                    self._score_prompt(req, logits[i, :stop - start], start, stop)
                if stop < len(req.prompt):
                    continue
                if req.prompt_lps is not None:
                    self._send(req, ("prompt", req.prompt_lps))
                if req.limit <= 0:  # max_tokens=0: the prompt's logprobs were all that was asked
                    self._finish(req, "done", "length")
                    continue
                done.append(req)
                last.append(logits[i, stop - start - 1])
            except Exception as e:
                logger.exception("decode worker %d: prefilling request %d failed", self.id, req.id)
                self._finish(req, "error", f"{type(e).__name__}: {e}")
        if done:
            self._sample_and_emit(done, torch.stack(last))

    def _prefill_forward(self, group):
        first = group[0].slot
        assert all(r.slot == first + i for i, r in enumerate(group)), "prefilling rows must be contiguous slots"
        chunks = [(r.pos, min(len(r.prompt), r.pos + self.prefill_chunk)) for r in group]
        width = max(stop - start for start, stop in chunks)
        ids = [r.prompt[start:stop] + [0] * (width - (stop - start)) for r, (start, stop) in zip(group, chunks)]
        view = self._rows(first, first + len(group))
        try:
            logits = decode_forward(self.model, torch.tensor(ids, dtype=torch.long, device=self.device), view,
                                    self.device)
        except Exception:
            view.cache_seqlens.copy_(torch.tensor([start for start, _ in chunks], dtype=torch.int32))
            raise
        if width * len(group) > sum(stop - start for start, stop in chunks):  # padded: back to the real ends
            view.cache_seqlens.copy_(torch.tensor([stop for _, stop in chunks], dtype=torch.int32))
        self.stats["prefill_forwards"] += 1
        return logits, chunks

    def _score_prompt(self, req, logits, start, stop):
        """Append the logprobs of prompt tokens max(start, 1)..stop-1 (token i is scored by the
        logits at i-1: the previous chunk's last row for the chunk's first token)."""
        rows = logits[:-1] if req.carry is None else torch.cat([req.carry, logits[:-1]])
        targets = torch.tensor(req.prompt[max(start, 1):stop], dtype=torch.long, device=self.device)
        req.carry = logits[-1:]
        if targets.numel() == 0:
            return
        k = req.logprobs or 0
        lp, top_lp, top_ids = token_logprobs(rows, targets, k)
        for value, tl, ti in zip(lp.tolist(), top_lp.tolist(), top_ids.tolist()):
            req.prompt_lps.append({"logprob": value, "top": list(zip(ti, tl))})

    def _decode(self, rows):
        """One forward for every decoding row (slots 0..d-1), then their batched sample."""
        n = len(rows)
        assert all(r.slot == i for i, r in enumerate(rows)), "decoding rows must be slots 0..d-1"
        try:
            ids = torch.tensor([[r.next_input] for r in rows], dtype=torch.long, device=self.device)
            logits = decode_forward(self.model, ids, self._rows(0, n), self.device)[:, -1, :]
        except Exception as e:  # the shared forward: every row of it fails, not the server
            logger.exception("decode worker %d: step failed", self.id)
            for req in rows:
                self._finish(req, "error", f"{type(e).__name__}: {e}")
            return
        for req in rows:
            req.pos += 1
        self.stats["steps"] += 1
        self.stats["rows_decoded"] += n
        self._sample_and_emit(rows, logits)

    def _sample_and_emit(self, rows, logits):
        """Sample rows (slots rows[i].slot) from logits (n, V) in one batch, then per row: the tool
        step (a forced token wins), the event, the finish checks."""
        live = [r for r in rows if not r.cancelled]
        for req in rows:
            if req.cancelled:
                self._finish(req, "done", "cancelled")
        if not live:
            return
        if len(live) < len(rows):
            keep = torch.tensor([i for i, r in enumerate(rows) if not r.cancelled], device=self.device)
            logits = logits.index_select(0, keep)
        try:
            params = RowParams([r.sampling_row() for r in live], self.device)
            counts = None
            if params.penalties:
                slots = torch.tensor([r.slot for r in live], dtype=torch.long, device=self.device)
                counts = self.counts.index_select(0, slots)
            chosen = sample(logits.float(), params, counts)
            forced = [r.state.forced_tokens[0] if r.state.forced_tokens else -1 for r in live]
            if any(f >= 0 for f in forced):  # the tool's tokens replace the sample (step_row below agrees)
                forced_t = torch.tensor(forced, dtype=torch.long, device=self.device)
                chosen = torch.where(forced_t >= 0, forced_t, chosen)
            if params.penalties:  # a row's penalties never change, so its counts are complete when it needs them
                self.counts.index_put_((slots, chosen), torch.ones_like(chosen, dtype=self.counts.dtype), accumulate=True)
            k = max((r.logprobs for r in live if r.logprobs is not None), default=None)
            if k is not None:
                lp, top_lp, top_ids = token_logprobs(logits, chosen, k)
                lps = list(zip(lp.tolist(), top_lp.tolist(), top_ids.tolist()))
            tokens = chosen.tolist()
        except Exception as e:  # the shared sample: every row of it fails
            logger.exception("decode worker %d: sampling failed", self.id)
            for req in live:
                self._finish(req, "error", f"{type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        emitted = 0
        for i, req in enumerate(live):
            try:  # one row's tool step / emit failing ends that row only
                token, mask = step_row(req.state, tokens[i], self.tokenizer, self.special)
                req.num_generated += 1
                emitted += 1
                if req.first_token_at is None:
                    req.first_token_at = now
                    self.stats["ttft_seconds_sum"] += now - req.submitted_at
                    self.stats["ttft_count"] += 1
                if req.state.completed:  # assistant_end or bos: the terminator is not emitted
                    self._finish(req, "done", "stop")
                    continue
                lp = None
                if req.logprobs is not None:
                    value, tl, ti = lps[i]
                    lp = {"logprob": value, "top": list(zip(ti[:req.logprobs], tl[:req.logprobs]))}
                self._send(req, ("token", token, mask, lp))
                req.next_input = token
                if req.num_generated >= req.limit:
                    self._finish(req, "done", "length")
            except Exception as e:
                logger.exception("decode worker %d: request %d failed", self.id, req.id)
                self._finish(req, "error", f"{type(e).__name__}: {e}")
        self.stats["tokens_generated"] += emitted
        with self._rate_lock:
            self._recent.append((time.monotonic(), emitted))

    def _retire(self):
        """Drop finished and cancelled rows; survivors move down to keep slots 0..n-1 (a row only
        ever moves to a lower slot, so copying in slot order never overwrites a survivor)."""
        for req in self._active:
            if req.cancelled and not req.finished:
                self._finish(req, "done", "cancelled")
        if all(not r.finished for r in self._active):
            return
        survivors = [r for r in self._active if not r.finished]
        for slot, req in enumerate(survivors):
            if req.slot != slot:
                self.cache.move(req.slot, slot, req.pos)
                self.counts[slot] = self.counts[req.slot]
                req.slot = slot
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
    """Routes each request to the least loaded worker (one per model copy / device).

    max_queue: how many requests may wait for a slot, across workers (None = no bound); past
    it `submit` raises QueueFull, queuing nothing. prefill_chunk: prompt tokens per prefill
    forward (what a running row may wait for per step)."""

    def __init__(self, models, tokenizer, max_batch=16, max_seq_len=None, autocast_dtype=torch.bfloat16,
                 max_queue=None, prefill_chunk=PREFILL_CHUNK):
        models = models if isinstance(models, (list, tuple)) else [models]
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
            raise ValueError(f"max_queue must be None or an integer >= 0, got {max_queue!r}")
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.workers = [Worker(i, m, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len,
                               autocast_dtype=autocast_dtype, prefill_chunk=prefill_chunk) for i, m in enumerate(models)]
        self._submit_lock = threading.Lock()  # the queue bound is checked and taken atomically
        self.started = False

    @property
    def context_length(self):
        return min(w.capacity for w in self.workers)

    @property
    def vocab_size(self):
        return min(w.vocab_size for w in self.workers)

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

    def _validate(self, prompt, max_tokens, temperature, top_k, top_p, seed, presence_penalty, frequency_penalty,
                  logprobs, prompt_logprobs):
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a non-empty list of token ids")
        if not all(0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) >= self.context_length:
            raise ValueError(f"prompt is {len(prompt)} tokens; the model context is {self.context_length} tokens")
        if not isinstance(prompt_logprobs, bool):
            raise ValueError(f"prompt_logprobs must be true or false, got {prompt_logprobs!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        if max_tokens == 0 and not prompt_logprobs:
            raise ValueError("max_tokens must be >= 1 (0 is only meaningful with prompt_logprobs)")
        if _number(temperature, "temperature") < 0:
            raise ValueError(f"temperature must be non-negative, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be None or an integer >= 0 (0 = the whole vocabulary), got {top_k!r}")
        if not 0 < _number(top_p, "top_p") <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if abs(_number(value, name)) > MAX_PENALTY:
                raise ValueError(f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {value}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= self.vocab_size):
            raise ValueError(f"logprobs must be None or an integer in [0, {self.vocab_size}], got {logprobs!r}")
        check_seed(seed)

    def retry_after(self):
        """Seconds until a slot is likely to free up: the tokens the row nearest its limit still
        has to decode, at the recent per-row decode rate (>= 1; 1 with no rate to go by)."""
        rate = sum(w.tokens_per_s() for w in self.workers)
        rows = sum(w.active_count() for w in self.workers)
        left = [t for w in self.workers if (t := w.tokens_to_free_slot()) is not None]
        if rate <= 0 or not rows or not left:
            return 1
        return max(1, math.ceil(min(left) / (rate / rows)))

    def submit(self, prompt, emit, max_tokens, temperature=1.0, top_k=None, top_p=1.0, seed=None,
               presence_penalty=0.0, frequency_penalty=0.0, logprobs=None, prompt_logprobs=False):
        """Queue a generation; returns its Request (call .cancel() to abandon it). Raises
        ValueError for bad parameters, QueueFull when max_queue requests already wait."""
        if not self.started:
            raise RuntimeError("scheduler is not running (call start())")
        seed = random.randint(0, 2**31 - 1) if seed is None else seed
        self._validate(prompt, max_tokens, temperature, top_k, top_p, seed, presence_penalty, frequency_penalty,
                       logprobs, prompt_logprobs)
        workers = self.alive_workers()
        if not workers:
            raise RuntimeError("no decode worker is running")
        req = Request(prompt, max_tokens, float(temperature), top_k, seed, emit, top_p=float(top_p),
                      presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty),
                      logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        with self._submit_lock:
            if self.max_queue is not None:
                free = sum(max(0, w.max_batch - w.load()) for w in workers)
                queued = sum(w.queued_count() for w in workers)
                if not free and queued >= self.max_queue:
                    retry = self.retry_after()
                    raise QueueFull(f"all {sum(w.max_batch for w in workers)} decode slots are busy and {queued} "
                                    f"requests are waiting (max_queue={self.max_queue}); retry in {retry}s", retry)
            min(workers, key=lambda w: w.load()).submit(req)
        return req

    def generate(self, prompt, max_tokens, temperature=1.0, top_k=None, seed=None, timeout=None, **kwargs):
        """Blocking convenience: (tokens, masks, finish_reason) for one request (kwargs: submit's)."""
        events = queue.Queue()
        req = self.submit(prompt, events.put, max_tokens, temperature=temperature, top_k=top_k, seed=seed, **kwargs)
        tokens, masks = [], []
        try:
            while True:
                ev = events.get(timeout=timeout)
                if ev[0] == "token":
                    tokens.append(ev[1])
                    masks.append(ev[2])
                elif ev[0] == "done":
                    return tokens, masks, ev[1]
                elif ev[0] == "error":
                    raise RuntimeError(f"generation failed: {ev[1]}")
        finally:
            req.cancel()

    def stats(self):
        """Counters and gauges for /stats and /metrics. queued: requests waiting for a slot, all
        workers; ttft_seconds_sum / ttft_count: submit-to-first-token time of every request that
        produced a token; tokens_per_s: tokens emitted per second over the last RATE_WINDOW_S."""
        workers = [w.snapshot() for w in self.workers]
        queued = sum(w["queued"] for w in workers)
        return dict(
            total_workers=len(workers),
            available_workers=sum(1 for w in workers if w["active"] + w["queued"] < w["max_batch"]),
            busy_workers=sum(1 for w in workers if w["active"] + w["queued"] >= w["max_batch"]),
            active=sum(w["active"] for w in workers),
            queue_depth=queued,
            queued=queued,
            tokens_served=sum(w["tokens_generated"] for w in workers),
            requests_completed=sum(w["requests_completed"] for w in workers),
            requests_failed=sum(w["requests_failed"] for w in workers),
            alive_workers=sum(1 for w in workers if w["alive"]),
            max_batch_seen=max((w["max_active_seen"] for w in workers), default=0),
            ttft_seconds_sum=sum(w["ttft_seconds_sum"] for w in workers),
            ttft_count=sum(w["ttft_count"] for w in workers),
            tokens_per_s=sum(w["tokens_per_s"] for w in workers),
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
