"""The OpenAI-compatible API (base_url http://host:port/v1).

    POST /v1/chat/completions  chat.completion, or chat.completion.chunk SSE ending in data: [DONE]
    POST /v1/completions       text_completion (legacy completions: prompt strings or token ids, echo,
                               logprobs; what lm-evaluation-harness's local-completions sends)
    GET  /v1/models            the one model, MODEL_NAME, and its aliases (serve.model_aliases)

Both generating routes take n (choice i seeded with seed + i), stop (up to 4 strings, matched in
the decoded text across token boundaries, never emitted; choices.py), temperature, top_p, top_k
(extension), presence/frequency penalties, seed, max_tokens (chat: also max_completion_tokens;
unset: serve.max_tokens), stream, stream_options.include_usage and user (logged). Logprobs are
the model's raw distribution (before temperature, top-k/p and penalties): chat's
logprobs/top_logprobs in OpenAI's `choices[i].logprobs.content` shape, completions' integer
`logprobs` in the legacy shape {tokens, token_logprobs, top_logprobs, text_offset}; with echo,
the prompt's tokens come first (the first one has no logprob), and max_tokens 0 with echo and
logprobs only scores the prompt.

Errors are OpenAI's {"error": {"message", "type", "param", "code"}}: 401 invalid_api_key, 400
naming the field (validation; a malformed body: schema_error; any field the server cannot honour
or does not know: schemas.py), 404 model_not_found, 413/415/400 for a body that is too large, not
JSON or not UTF-8 (guard.py), 429 rate_limit_exceeded with Retry-After when serve.max_queue
requests already wait, 408 request_timeout after serve.request_timeout seconds, 503 while loading,
with no decode worker alive or once the shutdown's grace period is over, 500 if this request's
generation fails. A stream that fails, times out or is cut by the shutdown ends with an error
event ({"error": {...}}) and data: [DONE]; the slots are freed either way (docs/decisions.md, D15).
A non-streaming request whose client hangs up is cancelled at once.
"""
import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from nanopipe.inference.engine import TextStream
from nanopipe.inference.tool_text import ToolText
from nanopipe.serving.choices import Choice, RequestTimeout, ShuttingDown
from nanopipe.serving.schemas import OpenAIChatRequest, OpenAICompletionRequest, validate_completion, validate_openai
from nanopipe.serving.state import MODEL_NAME, UNAUTHORIZED, ServerState, StateDep, openai_error
from nanopipe.serving.streaming import SSE_HEADERS, Generation, sse

__all__ = ["MODEL_NAME", "openai_error", "router", "schema_error"]

logger = logging.getLogger("nanopipe.serve")

router = APIRouter(prefix="/v1")


# pydantic's names for the members of a Union field, which it puts in an error's loc
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|dict|list|[\w-]+\[.*\]|(constrained|function|is-instance)-.*)$")


def _param(loc):
    parts = []
    for p in loc:
        if isinstance(p, int) or str(p).isdigit():
            parts.append(f"[{p}]")
        elif p == "body" and not parts:
            continue
        elif _UNION_MEMBER.match(str(p)):
            break  # messages[0].content (not messages[0].content.str)
        else:
            parts.append(f".{p}")
    return "".join(parts).lstrip(".") or None


def schema_error(exc: RequestValidationError):
    """A malformed body as a 400 naming the first offending field (messages[0].role, ...); of the
    errors a Union field gets (one per member), the first that is not a plain type mismatch."""
    errors = exc.errors()
    err = errors[0]
    if err.get("type") == "json_invalid":
        why = (err.get("ctx") or {}).get("error", "")
        return openai_error(400, f"The request body is not valid JSON: {why} (at character {err['loc'][-1]})")
    param = _param(err.get("loc", ()))
    same_field = [e for e in errors if _param(e.get("loc", ())) == param]
    err = next((e for e in same_field if not e.get("type", "").endswith("_type")), err)
    return openai_error(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param)


def finish_reason(finish):
    return "length" if finish == "length" else "stop"


def stream_error(message, code=None, type_="server_error"):
    return sse({"error": {"message": message, "type": type_, "param": None, "code": code}})


TIMEOUT_MESSAGE = ("The request took longer than the server's limit of {:g} seconds (serve.request_timeout) and was "
                   "cancelled; ask for fewer tokens (max_tokens) or stream the answer")
SHUTDOWN_MESSAGE = "The server is shutting down; the request was cut off. Retry once it is back"

# -----------------------------------------------------------------------------
# Logprob entries: the scheduler's (token, {"logprob", "top": [(id, lp), ...]}) in OpenAI's shapes


def _token_bytes(tokenizer, token):
    return list(tokenizer.id_to_bytes(token))


def chat_logprob(tokenizer, token, lp):
    """One entry of choices[i].logprobs.content."""
    top = [{"token": tokenizer.decode([t]), "logprob": float(v), "bytes": _token_bytes(tokenizer, t)} for t, v in lp["top"]]
    return {"token": tokenizer.decode([token]), "logprob": float(lp["logprob"]), "bytes": _token_bytes(tokenizer, token),
            "top_logprobs": top}


def legacy_token(tokenizer, token):
    """A token as the legacy shape names it: its text, or "bytes:\\xe2\\x82" when its bytes are not
    valid UTF-8 on their own (part of a character), as OpenAI writes such tokens; so the
    alternatives in top_logprobs never collide."""
    raw = tokenizer.id_to_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class LegacyLogprobs:
    """A completions choice's {tokens, token_logprobs, top_logprobs, text_offset}, built a token at a time."""

    def __init__(self, tokenizer, offset=0):
        self.tokenizer, self.offset = tokenizer, offset
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, token, lp, start):
        self.tokens.append(legacy_token(self.tokenizer, token))
        self.text_offset.append(self.offset + start)
        if lp is None:  # the first prompt token: nothing before it to score it by
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        self.token_logprobs.append(float(lp["logprob"]))
        self.top_logprobs.append({legacy_token(self.tokenizer, t): float(v) for t, v in lp["top"]})

    def take(self):
        """The entries added since the last take (a stream sends each once)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out

    def extend(self, other):
        for key, values in other.items():
            getattr(self, key).extend(values)


def prompt_text_and_offsets(tokenizer, prompt):
    """The prompt's text and each token's start in it (as Choice counts: characters decoded before it)."""
    stream, starts, text = TextStream(tokenizer), [], ""
    for t in prompt:
        starts.append(len(text))
        text += stream.push(t)
    return text + stream.flush(), starts

# -----------------------------------------------------------------------------
# The shared machinery of both routes

CHAT_DECODER = ToolText  # in step with streaming.text_events: calculator calls read "🧮 `expr` → result"


@dataclass
class Job:
    """One /v1 request: its choices (prompt_of[i]: the prompt index of choice i), its
    submission, and the parts of the answer every response shape shares."""
    state: ServerState
    kind: str  # "v1 chat" / "v1 completions"
    prompts: list
    prompt_of: list
    choices: list
    gen: Generation  # the log line and usage counts
    model: str
    include_usage: bool = False
    usage_object: str = ""  # the `object` of the usage chunk that ends a stream
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    sub: object = None
    prompt_lps: dict = field(default_factory=dict)  # choice -> the scheduler's prompt logprobs

    def usage(self):
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def finish_log(self):
        self.gen.tokens = sum(c.tokens for c in self.choices)
        ended = {c.finish for c in self.choices}
        self.gen.finish = ended.pop() if len(ended) == 1 else ",".join(sorted(str(e) for e in ended))
        self.gen.log()
        if self.sub is not None:
            self.state.metrics.observe_job(self.sub, self.gen.tokens)


def start_job(state: ServerState, kind, prompts, sampling, model, include_usage, stream, id_prefix,
              prompt_logprobs=False, user=None):
    """Submit every choice (n per prompt) at once; QueueFull becomes a 429 (InvalidRequest).
    `user` (the request's end-user id) goes into the log line."""
    n = sampling.n
    prompt_of = [p for p in range(len(prompts)) for _ in range(n)]
    specs = [state.submit_spec(prompts[p], sampling, i % n, prompt_logprobs) for i, p in enumerate(prompt_of)]
    # chat answers are decoded as nanochat's chat API decodes them (streaming.text_events' decoder)
    decoder = CHAT_DECODER if id_prefix == "chatcmpl-" else TextStream
    choices = [Choice(i, state.tokenizer, sampling.stop, sampling.logprobs is not None, decoder)
               for i in range(len(specs))]
    label = f"{kind}{' stream' if stream else ''}{f' (user {user!r})' if user else ''}"
    gen = state.generation(label, prompts[0], sampling.temperature, sampling.top_k,
                           sampling.max_tokens, sampling.seed)
    job = Job(state, kind, prompts, prompt_of, choices, gen, model, include_usage,
              usage_object="chat.completion.chunk" if id_prefix == "chatcmpl-" else "text_completion",
              id=f"{id_prefix}{uuid.uuid4().hex}")
    job.sub = state.submit(specs)
    return job


def handle(job: Job, i, ev):
    """Apply event `ev` of choice i -> (delta text, released (token, lp, start) entries). A stop
    match cancels the choice's request (its slot is freed at the next step). A failed generation
    raises GenerationFailed."""
    choice = job.choices[i]
    kind = ev[0]
    if kind == "token":
        delta, entries = choice.token(ev[1], ev[3] if len(ev) > 3 else None)
        if choice.finish == "stop":
            job.sub.cancel(i)
        return delta, entries
    if kind == "prompt":
        job.prompt_lps[i] = ev[1]
        return "", []
    if kind == "done":
        if ev[1] == "cancelled" and not choice.finished:  # not by us: the scheduler is stopping
            raise GenerationFailed("the request was cancelled: the server is stopping", 503, "server_shutdown")
        return choice.done(ev[1])
    raise GenerationFailed(ev[1])


class GenerationFailed(Exception):
    def __init__(self, message, status=500, code=None):
        super().__init__(message)
        self.status, self.code = status, code


async def _cancel_on_disconnect(request: Request, job: Job):
    """A non-streaming request: wait for the client to hang up, then cancel its choices."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.sub.cancel()
            job.state.metrics.disconnects += 1
            return


async def collect(request: Request, job: Job, on_entries):
    """Run `job` to its end for a non-streaming answer: -> (texts, None) or (None, error response).
    on_entries(i, entries) receives each choice's released logprob entries."""
    texts = [[] for _ in job.choices]
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        async for batch in job.sub.batches():
            for i, ev in batch:
                delta, entries = handle(job, i, ev)
                texts[i].append(delta)
                if entries:
                    on_entries(i, entries)
        return ["".join(t) for t in texts], None
    except RequestTimeout:
        for c in job.choices:
            c.finish = c.finish or "timeout"
        return None, openai_error(408, TIMEOUT_MESSAGE.format(job.state.request_timeout), type_="invalid_request_error",
                                  code="request_timeout")
    except ShuttingDown:
        for c in job.choices:
            c.finish = c.finish or "shutdown"
        return None, openai_error(503, SHUTDOWN_MESSAGE, type_="server_error", code="server_shutdown")
    except GenerationFailed as e:
        for c in job.choices:
            c.finish = c.finish or "error"
        if watcher.done():  # the client hung up and we cancelled: nobody reads this answer
            return None, openai_error(499, "the client closed the request", type_="invalid_request_error")
        return None, openai_error(e.status, f"generation failed: {e}", type_="server_error", code=e.code)
    finally:
        watcher.cancel()
        job.sub.cancel()
        job.finish_log()


async def framed(job: Job, events):
    """A stream's body: `events` (async iterator of SSE strings), then the usage chunk if asked
    for and [DONE]; a failure, the timeout or the shutdown ends it with an error event."""
    try:
        async for chunk in events:
            if chunk:
                yield chunk
        if job.include_usage:
            yield _usage_chunk(job)
    except RequestTimeout:
        yield stream_error(TIMEOUT_MESSAGE.format(job.state.request_timeout), "request_timeout",
                           type_="invalid_request_error")
    except ShuttingDown:
        yield stream_error(SHUTDOWN_MESSAGE, "server_shutdown")
    except GenerationFailed as e:
        yield stream_error(f"generation failed: {e}", e.code)
    except Exception as e:  # the headers are sent: report it in the stream
        logger.exception("%s: generation failed", job.kind)
        yield stream_error(f"generation failed: {type(e).__name__}: {e}")
    finally:
        job.sub.cancel()  # also when the client went away (the task is cancelled here)
        for c in job.choices:
            c.finish = c.finish or "cancelled"
        job.finish_log()
    yield "data: [DONE]\n\n"


def _preflight(request: Request, state: ServerState, model):
    if not state.authorized(request):
        return openai_error(401, UNAUTHORIZED, code="invalid_api_key")
    state.check_model(model)
    state.check_ready()
    return None

# -----------------------------------------------------------------------------
# Routes


@router.get("/models")
async def list_models(request: Request, state: StateDep):
    if not state.authorized(request):
        return openai_error(401, UNAUTHORIZED, code="invalid_api_key")
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nanopipe"}
                                       for name in state.model_names]}


@router.post("/chat/completions")
async def chat_completions(body: OpenAIChatRequest, request: Request, state: StateDep):
    refused = _preflight(request, state, body.model)
    if refused is not None:
        return refused
    conversation, sampling = validate_openai(body)
    prompt = state.prompt(conversation)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    job = start_job(state, "v1 chat", [prompt], sampling, body.model or MODEL_NAME, include_usage, body.stream,
                    "chatcmpl-", user=body.user)
    tok = state.tokenizer
    if body.stream:
        return StreamingResponse(framed(job, _chat_chunks(job, sampling.logprobs is not None)),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    logprobs = [[] for _ in job.choices]
    texts, error = await collect(request, job,
                                 lambda i, entries: logprobs[i].extend(chat_logprob(tok, t, lp) for t, lp, _ in entries))
    if error is not None:
        return error
    want = sampling.logprobs is not None
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "system_fingerprint": None,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": texts[c.index], "refusal": None},
                         "logprobs": {"content": logprobs[c.index], "refusal": None} if want else None,
                         "finish_reason": finish_reason(c.finish)} for c in job.choices],
            "usage": job.usage()}


def _chunk(job: Job, obj, choice):
    """One streamed chunk carrying one choice (`usage: null` when the client asked for a usage chunk at the end)."""
    payload = {"id": job.id, "object": obj, "created": job.created, "model": job.model, "system_fingerprint": None,
               "choices": [choice]}
    if job.include_usage:
        payload["usage"] = None
    return sse(payload)


def _chat_chunk(job: Job, i, delta, finish=None, logprobs=None):
    return _chunk(job, "chat.completion.chunk", {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})


def _usage_chunk(job: Job):
    return sse({"id": job.id, "object": job.usage_object, "created": job.created, "model": job.model, "choices": [],
                "usage": job.usage()})


async def _chat_chunks(job: Job, want_logprobs):
    """chat.completion.chunk events: each choice's role, its content deltas (with their logprobs),
    its finish reason."""
    tok = job.state.tokenizer
    yield "".join(_chat_chunk(job, c.index, {"role": "assistant", "content": ""}) for c in job.choices)
    async for batch in job.sub.batches():
        out = []
        for i, ev in batch:
            was_finished = job.choices[i].finished
            delta, entries = handle(job, i, ev)
            lps = {"content": [chat_logprob(tok, t, lp) for t, lp, _ in entries], "refusal": None} if want_logprobs else None
            if delta or entries:
                out.append(_chat_chunk(job, i, {"content": delta}, logprobs=lps))
            if job.choices[i].finished and not was_finished:
                out.append(_chat_chunk(job, i, {}, finish_reason(job.choices[i].finish)))
        yield "".join(out)


@router.post("/completions")
async def completions(body: OpenAICompletionRequest, request: Request, state: StateDep):
    refused = _preflight(request, state, body.model)
    if refused is not None:
        return refused
    prompts, sampling, echo = validate_completion(body, state.encode_completion_prompt, state.vocab_size,
                                                  state.scheduler.context_length)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    scored = echo and sampling.logprobs is not None  # the prompt's tokens are scored too
    job = start_job(state, "v1 completions", prompts, sampling, body.model or MODEL_NAME, include_usage, body.stream,
                    "cmpl-", prompt_logprobs=scored, user=body.user)
    echoed = [prompt_text_and_offsets(state.tokenizer, p) if echo else ("", []) for p in prompts]
    if body.stream:
        return StreamingResponse(framed(job, _completion_chunks(job, echoed, sampling.logprobs)),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    legacy = [LegacyLogprobs(state.tokenizer, len(echoed[job.prompt_of[i]][0])) for i in range(len(job.choices))]
    texts, error = await collect(request, job, lambda i, entries: [legacy[i].add(t, lp, s) for t, lp, s in entries])
    if error is not None:
        return error
    out = []
    for c in job.choices:
        prompt_text, starts = echoed[job.prompt_of[c.index]]
        logprobs = None
        if sampling.logprobs is not None:
            generated = legacy[c.index].take()
            logprobs = _echoed_logprobs(job, c.index, starts) if echo else LegacyLogprobs(state.tokenizer).take()
            for key, values in generated.items():
                logprobs[key].extend(values)
        out.append({"index": c.index, "text": prompt_text + texts[c.index], "logprobs": logprobs,
                    "finish_reason": finish_reason(c.finish)})
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "system_fingerprint": None, "choices": out, "usage": job.usage()}


def _echoed_logprobs(job: Job, i, starts):
    """The legacy logprobs of choice i's prompt tokens (its echo): the scheduler's prompt logprobs."""
    prompt = job.prompts[job.prompt_of[i]]
    lps = job.prompt_lps.get(i)
    if lps is None or len(lps) != len(prompt):
        raise RuntimeError(f"the scheduler sent {None if lps is None else len(lps)} prompt logprobs for a "
                           f"{len(prompt)}-token prompt")
    legacy = LegacyLogprobs(job.state.tokenizer)
    for t, lp, s in zip(prompt, lps, starts):
        legacy.add(t, lp, s)
    return legacy.take()


def _completion_chunk(job: Job, i, text, logprobs=None, finish=None):
    return _chunk(job, "text_completion", {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})


async def _completion_chunks(job: Job, echoed, want_logprobs):
    """text_completion chunks: with echo, each choice's prompt first (with its logprobs once the
    scheduler sent them), then its text deltas, then its finish reason."""
    tok = job.state.tokenizer
    echo_pending = {i for i in range(len(job.choices)) if echoed[job.prompt_of[i]][0]}
    if want_logprobs is None:  # without logprobs the prompt's text goes out at once
        yield "".join(_completion_chunk(job, i, echoed[job.prompt_of[i]][0]) for i in sorted(echo_pending))
        echo_pending = set()
    async for batch in job.sub.batches():
        out = []
        for i, ev in batch:
            was_finished = job.choices[i].finished
            delta, entries = handle(job, i, ev)
            if ev[0] == "prompt" and i in echo_pending:
                echo_pending.discard(i)
                text, starts = echoed[job.prompt_of[i]]
                out.append(_completion_chunk(job, i, text, _echoed_logprobs(job, i, starts)))
            legacy = LegacyLogprobs(tok, len(echoed[job.prompt_of[i]][0]))
            for t, lp, s in entries:
                legacy.add(t, lp, s)
            if delta or entries:
                out.append(_completion_chunk(job, i, delta, legacy.take() if want_logprobs is not None else None))
            if job.choices[i].finished and not was_finished:
                out.append(_completion_chunk(job, i, "", finish=finish_reason(job.choices[i].finish)))
        yield "".join(out)
