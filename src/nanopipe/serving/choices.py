"""The /v1 routes' generations: several scheduler requests (one per choice) submitted together,
their events into the event loop, and each choice's text cut at its stop strings.

Submission submits every choice before the route answers anything, so a full queue is a 429
(QueueFull) and never a stream that breaks after its 200. Its events arrive in batches (everything
since the last wait); waiting ends early when the request's time is up (serve.request_timeout,
RequestTimeout) or the server is shutting down (ShuttingDown), and every request it holds is
cancelled when it closes: finished, cut off, or its client gone.

Choice turns one choice's token events into text deltas and logprob entries. Stop strings
(StopText) are matched in the decoded text, so a stop string that spans several tokens is found;
text that may be the start of a stop string is held back until it cannot be, the stop string
itself is never emitted, and once one matched the choice ends with finish_reason "stop" (the
route cancels its request, freeing the slot). A token's logprob entry is released with the first
text at or after the token's start; at a stop, the tokens that start after the cut are dropped.
"""
import asyncio
import time
from collections import deque
from functools import partial

from nanopipe.inference.engine import TextStream

POLL_S = 0.25  # how often a wait looks at the clock (request deadline, shutdown)


class RequestTimeout(Exception):
    """The request ran longer than serve.request_timeout."""


class ShuttingDown(Exception):
    """The server is shutting down and this request's grace period is over."""


class StopText:
    """A text stream cut before the first occurrence of any of `stops`, safely for streaming:
    push() returns only text that can no longer turn into a stop string."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.matched = False

    def push(self, text):
        """-> (text safe to emit, matched). After a match everything is swallowed."""
        if self.matched:
            return "", True
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.matched = self.buf[:min(hits)], "", True
            return out, True
        hold = 0  # the longest end of buf that begins some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self):
        """The held text at the end of the stream (it never became a stop string)."""
        out, self.buf = ("" if self.matched else self.buf), ""
        return out


class Choice:
    """One choice's decode: token events in, (text delta, released logprob entries) out."""

    def __init__(self, index, tokenizer, stops, want_logprobs, decoder=TextStream):
        """decoder: tokens -> text deltas (push / flush), TextStream's interface."""
        self.index = index
        self.text = decoder(tokenizer)
        self.stop = StopText(stops)
        self.want_logprobs = want_logprobs
        self.decoded = 0  # characters decoded so far, before the stop cut
        self.emitted = 0  # characters handed out
        self.pending = deque()  # (start, (token, lp, start)) not yet released; start: characters before the token
        self.tokens = 0  # completion tokens the model generated for this choice
        self.finish = None  # "stop" | "length" once ended; "cancelled" / "error" if cut

    @property
    def finished(self):
        return self.finish is not None

    def token(self, token, lp):
        """A generated token -> (delta, entries: [(token, lp, start)]); after a stop match the
        choice is finished."""
        if self.finished:
            return "", []
        self.tokens += 1
        if self.want_logprobs:
            if lp is None:
                raise RuntimeError("the scheduler sent a token without its logprob although logprobs were asked for")
            self.pending.append((self.decoded, (token, lp, self.decoded)))
        piece = self.text.push(token)
        self.decoded += len(piece)
        out, matched = self.stop.push(piece)
        if matched:
            self.finish = "stop"
        return self._release(out, everything=False)

    def done(self, reason):
        """The scheduler's end of this choice ("stop" | "length" | "cancelled") -> (delta, entries)."""
        if self.finished:
            return "", []
        out, matched = self.stop.push(self.text.flush())
        if matched:
            self.finish = "stop"
            return self._release(out, everything=False)
        out += self.stop.flush()
        self.finish = reason
        return self._release(out, everything=True)

    def _release(self, out, everything):
        self.emitted += len(out)
        entries = []
        while self.pending and (everything or self.pending[0][0] < self.emitted):
            entries.append(self.pending.popleft()[1])
        if self.finish == "stop":
            self.pending.clear()  # tokens that start after the cut
        return out, entries


class Submission:
    """Scheduler requests submitted together (one per spec, a dict of submit's keyword
    arguments with its `prompt`); their events come back tagged with the spec's index."""

    def __init__(self, scheduler, specs, deadline, shutdown_at):
        """deadline: time.monotonic() at which the request times out; shutdown_at(): the
        monotonic time at which requests in flight are cut for the shutdown, or None."""
        loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()  # unbounded: the decode loop never waits for a slow client
        self.deadline, self.shutdown_at = deadline, shutdown_at
        self.requests = []
        self.submitted_at, self.first_event_at = time.perf_counter(), None
        try:
            for i, spec in enumerate(specs):
                spec = dict(spec)
                prompt = spec.pop("prompt")
                self.requests.append(scheduler.submit(prompt, partial(self._emit, loop, i), **spec))
        except BaseException:
            self.cancel()  # those already queued: all or none
            raise
        self.open = set(range(len(specs)))

    def _emit(self, loop, i, ev):  # the decode thread
        loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))

    def cancel(self, i=None):
        """Cancel request i (None: all); frees its slot at the next step. Safe to repeat."""
        for req in (self.requests if i is None else [self.requests[i]]):
            req.cancel()

    async def batches(self):
        """Yield lists of (index, event), everything that arrived since the last yield, until
        every request has ended ("done" / "error"). Raises RequestTimeout / ShuttingDown."""
        while self.open:
            now = time.monotonic()
            cut = self.shutdown_at()
            if cut is not None and now >= cut:
                raise ShuttingDown()
            if now >= self.deadline:
                raise RequestTimeout()
            try:
                first = await asyncio.wait_for(self.queue.get(), timeout=min(POLL_S, self.deadline - now))
            except (asyncio.TimeoutError, TimeoutError):
                continue
            batch = [first]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            if self.first_event_at is None:
                self.first_event_at = time.perf_counter()
            for i, ev in batch:
                if ev[0] in ("done", "error"):
                    self.open.discard(i)
            yield batch
