"""From the decode thread to the HTTP response, for both chat APIs.

A Generation is one request's decode: its prompt and sampling parameters, then what happened
(worker, tokens, finish reason) for the log line and the usage counts. token_events carries the
scheduler's events (emitted on the decode thread) into the event loop, a batch at a time;
text_events decodes them to UTF-8-safe text deltas. sse frames a payload as a server-sent event.
"""
import asyncio
import json
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Optional

from nanopipe.inference.engine import TextStream

logger = logging.getLogger("nanopipe.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload):
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class Generation:
    """One request's decode: what to generate, then what happened."""
    kind: str  # for the log line: "chat", "v1", "v1 stream"
    prompt: list
    max_tokens: int
    temperature: float
    top_k: int
    seed: Optional[int] = None
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None  # None = off; k = the chosen token's logprob + the k best (scheduler.py)
    worker_id: Optional[int] = None
    tokens: int = 0
    finish: str = "cancelled"
    t0: float = field(default_factory=time.perf_counter)

    def log(self):
        dt = time.perf_counter() - self.t0
        logger.info("%s: worker %s, %d prompt + %d completion tokens, finish=%s, %.2fs (%.1f tok/s)", self.kind,
                    self.worker_id, len(self.prompt), self.tokens, self.finish, dt, self.tokens / max(dt, 1e-9))


async def token_events(scheduler, gen: Generation):
    """Submit `gen` and yield its scheduler events, every event that arrived since the last yield
    at once (one network write per batch when the server is busy); records the worker on `gen`.
    Cancels the request if the consumer goes away."""
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()  # unbounded: the decode loop never waits for a slow client

    def emit(ev):
        loop.call_soon_threadsafe(events.put_nowait, ev)
    req = scheduler.submit(gen.prompt, emit, max_tokens=gen.max_tokens, temperature=gen.temperature,
                           top_k=gen.top_k, top_p=gen.top_p, seed=gen.seed, presence_penalty=gen.presence_penalty,
                           frequency_penalty=gen.frequency_penalty, logprobs=gen.logprobs)
    try:
        while True:
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            gen.worker_id = req.worker_id
            yield batch
            if batch[-1][0] != "token":  # "done" / "error" always come last
                return
    finally:
        req.cancel()  # no-op when finished; frees the slot on disconnect


async def text_events(scheduler, tokenizer, gen: Generation):
    """token_events decoded: per batch a list of ("text", delta), then ("done", finish_reason) or
    ("error", message); a ("prompt", logprobs) event passes through unchanged (scheduler.py).
    A delta never splits a UTF-8 character; counts tokens and the finish on `gen`."""
    text = TextStream(tokenizer)
    async with aclosing(token_events(scheduler, gen)) as batches:
        async for batch in batches:
            out = []
            for ev in batch:
                if ev[0] == "token":
                    gen.tokens += 1
                    delta = text.push(ev[1])
                    if delta:
                        out.append(("text", delta))
                elif ev[0] == "prompt":  # prompt logprobs: passed on as they are
                    out.append(ev)
                elif ev[0] == "done":
                    gen.finish = ev[1]
                    tail = text.flush()
                    if tail:
                        out.append(("text", tail))
                    out.append(("done", ev[1]))
                else:
                    gen.finish = "error"
                    out.append(("error", ev[1]))
            yield out
