"""
Chat server: the web UI, nanochat's streaming chat API and an OpenAI-compatible API, all
over the continuous-batching scheduler (many clients decode together; a slow client never
holds up the others).

    GET  /                       chat UI (ui.html)
    GET  /logo.svg               favicon
    POST /chat/completions       nanochat's SSE protocol: data: {"token": ..., "gpu": i} ... data: {"done": true}
    POST /v1/chat/completions    OpenAI chat completions (stream or not)
    GET  /v1/models              OpenAI model list
    GET  /health                 liveness + readiness
    GET  /stats                  workers, queue depth, active sequences, tokens served

Out-of-range parameters are rejected (400 naming the field), never clamped; a malformed
body is a 422 (nanochat API) or a 400 in OpenAI's error shape (/v1). Binds 127.0.0.1 unless
told otherwise; with an API key (config `api_key` or $NANOPIPE_API_KEY) every API route
wants `Authorization: Bearer <key>` (the UI and /health stay open; the UI's /key command sets it).
"""
import asyncio
import json
import logging
import os
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from nanopipe.runtime import compute_dtype
from nanopipe.serve.engine import TextStream
from nanopipe.serve.scheduler import Scheduler, replicate_model

logger = logging.getLogger("nanopipe.serve")
HERE = Path(__file__).parent

# Abuse limits (nanochat's); violations are rejected, not clamped.
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000
MAX_TOTAL_CONVERSATION_LENGTH = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 = full vocabulary
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096

DEFAULTS = dict(host="127.0.0.1", port=8000, workers=0, max_batch=16, temperature=0.8, top_k=50, max_tokens=512,
                api_key="", model_name="nanopipe")


def _cfg(cfg, key):
    """Read `key` from a dict, an OmegaConf node or an object, falling back to DEFAULTS."""
    value = None
    if cfg is not None:
        try:
            value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
        except Exception:  # e.g. an OmegaConf MISSING value
            value = None
    return DEFAULTS[key] if value is None else value

# -----------------------------------------------------------------------------
# Request schemas


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    messages: list[ChatMessage]
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    top_k: Optional[int] = None


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None


class OpenAIChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # logprobs, user, ... are accepted and ignored
    model: Optional[str] = None
    messages: list[OpenAIMessage]
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # extension (nanochat's sampler)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None


class InvalidRequest(Exception):
    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

# -----------------------------------------------------------------------------
# Validation (checks and messages in nanochat's order)


def validate_conversation(messages, roles=("user", "assistant"), field="messages"):
    """messages: list of (role, content). Raises InvalidRequest naming the offending field."""
    if len(messages) == 0:
        raise InvalidRequest("At least one message is required", field)
    if len(messages) > MAX_MESSAGES_PER_REQUEST:
        raise InvalidRequest(f"Too many messages. Maximum {MAX_MESSAGES_PER_REQUEST} messages allowed per request", field)
    total = 0
    for i, (role, content) in enumerate(messages):
        if not content:
            raise InvalidRequest(f"Message {i} has empty content", f"{field}[{i}].content")
        if len(content) > MAX_MESSAGE_LENGTH:
            raise InvalidRequest(f"Message {i} is too long. Maximum {MAX_MESSAGE_LENGTH} characters allowed per message",
                                 f"{field}[{i}].content")
        total += len(content)
    if total > MAX_TOTAL_CONVERSATION_LENGTH:
        raise InvalidRequest(f"Total conversation is too long. Maximum {MAX_TOTAL_CONVERSATION_LENGTH} characters allowed", field)
    for i, (role, _) in enumerate(messages):
        if role not in roles:
            allowed = ", ".join(f"'{r}'" for r in roles)
            raise InvalidRequest(f"Message {i} has invalid role. Must be one of {allowed}", f"{field}[{i}].role")


def validate_sampling(temperature, top_k, max_tokens, max_tokens_field="max_tokens"):
    if temperature is not None and not (MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise InvalidRequest(f"Temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}", "temperature")
    if top_k is not None and not (MIN_TOP_K <= top_k <= MAX_TOP_K):
        raise InvalidRequest(f"top_k must be between {MIN_TOP_K} and {MAX_TOP_K}", "top_k")
    if max_tokens is not None and not (MIN_MAX_TOKENS <= max_tokens <= MAX_MAX_TOKENS):
        raise InvalidRequest(f"{max_tokens_field} must be between {MIN_MAX_TOKENS} and {MAX_MAX_TOKENS}", max_tokens_field)


def openai_conversation(req: OpenAIChatRequest):
    """OpenAI messages -> [(role, text)] with system/developer text folded into the first user
    message (as nanochat's conversation rendering does). Content may be a list of text parts."""
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"Message {i} content part {j}: only text parts are supported",
                                         f"messages[{i}].content[{j}]")
                texts.append(part["text"])
            content = "".join(texts)
        messages.append((m.role, content or ""))
    validate_conversation(messages, roles=("system", "developer", "user", "assistant"))
    system = "\n\n".join(text for role, text in messages if role in ("system", "developer"))
    out = [(role, text) for role, text in messages if role in ("user", "assistant")]
    if system:
        first_user = next((i for i, (role, _) in enumerate(out) if role == "user"), None)
        if first_user is None:
            out.insert(0, ("user", system))
        else:
            out[first_user] = ("user", system + "\n\n" + out[first_user][1])
    return out


def render_prompt(tokenizer, conversation):
    """bos, then <|user_start|>text<|user_end|> / <|assistant_start|>text<|assistant_end|>, then <|assistant_start|>."""
    special = tokenizer.encode_special
    ids = [tokenizer.get_bos_token_id()]
    for role, content in conversation:
        if role == "user":
            ids += [special("<|user_start|>")] + tokenizer.encode(content) + [special("<|user_end|>")]
        else:
            ids += [special("<|assistant_start|>")] + tokenizer.encode(content) + [special("<|assistant_end|>")]
    ids.append(special("<|assistant_start|>"))
    return ids

# -----------------------------------------------------------------------------
# Worker set-up


def worker_models(model, workers=0):
    """One model copy per GPU (workers=0: every visible GPU; N: the first N); one worker on CPU/MPS."""
    device = torch.device(model.get_device())
    if device.type != "cuda":
        if workers not in (0, 1):
            raise ValueError(f"serve.workers={workers}: more than one worker needs CUDA GPUs (the model is on {device})")
        return [model]
    available = torch.cuda.device_count()
    n = available if workers == 0 else workers
    if n > available:
        raise ValueError(f"serve.workers={workers} but only {available} CUDA device(s) are visible")
    if n == 1:
        return [model]
    return replicate_model(model, [f"cuda:{i}" for i in range(n)])

# -----------------------------------------------------------------------------
# The app


def create_app(model, tokenizer, cfg=None, scheduler=None, dtype=None):
    """FastAPI app serving `model` (on its device, replicated per GPU) with `tokenizer`.

    cfg: the `serve` config section (dict, OmegaConf node or object) with host, port, workers,
    max_batch, temperature, top_k, max_tokens, api_key (all optional; see DEFAULTS).
    dtype: compute dtype override ('bfloat16', 'float32', ...); default: bf16 autocast on CUDA SM80+.
    """
    defaults = {k: _cfg(cfg, k) for k in DEFAULTS}
    api_key = defaults["api_key"] or os.environ.get("NANOPIPE_API_KEY", "")
    if scheduler is None:
        device = torch.device(model.get_device())
        scheduler = Scheduler(worker_models(model, int(defaults["workers"])), tokenizer,
                              max_batch=int(defaults["max_batch"]), autocast_dtype=compute_dtype(device, dtype))
    model_name = str(defaults["model_name"])

    @asynccontextmanager
    async def lifespan(app):
        logger.info("starting %d decode worker(s)...", len(scheduler.workers))
        await asyncio.to_thread(scheduler.start)
        logger.info("ready: %s", ", ".join(f"worker {w.id} on {w.device} ({w.mode})" for w in scheduler.workers))
        yield
        await asyncio.to_thread(scheduler.shutdown)

    app = FastAPI(title="nanopipe chat", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.defaults = defaults
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])

    def authorized(request: Request):
        if not api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())

    def openai_error(status, message, param=None, type_="invalid_request_error", code=None):
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_,
                                                                   "param": param, "code": code}})

    @app.exception_handler(RequestValidationError)
    async def on_schema_error(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith("/v1/"):
            return await request_validation_exception_handler(request, exc)  # FastAPI's 422, loc names the field
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
        return openai_error(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param)

    # --- events from the decode thread into this event loop

    async def token_events(prompt, max_tokens, temperature, top_k, seed):
        """Yield (request, events) for one generation, every event that arrived since the last
        yield at once (one network write per batch when the server is busy). Cancels the
        request if the consumer goes away."""
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()  # unbounded: the decode loop never waits for a slow client

        def emit(ev):
            loop.call_soon_threadsafe(events.put_nowait, ev)
        req = scheduler.submit(prompt, emit, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                yield req, batch
                if batch[-1][0] != "token":  # "done" / "error" always come last
                    return
        finally:
            req.cancel()  # no-op when finished; frees the slot on disconnect

    def check_ready():
        if not scheduler.started:
            raise InvalidRequest("the model is still loading", status=503)

    def check_context(prompt, field="messages"):
        if len(prompt) >= scheduler.context_length:
            raise InvalidRequest(f"The conversation is {len(prompt)} tokens; the model's context is "
                                 f"{scheduler.context_length} tokens", field)

    def log_done(kind, prompt, n_tokens, finish, t0, worker_id):
        dt = time.perf_counter() - t0
        logger.info("%s: worker %s, %d prompt + %d completion tokens, finish=%s, %.2fs (%.1f tok/s)", kind, worker_id,
                    len(prompt), n_tokens, finish, dt, n_tokens / max(dt, 1e-9))

    SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    # --- routes

    @app.get("/", response_class=HTMLResponse)
    async def root():
        html = (HERE / "ui.html").read_text(encoding="utf-8")  # re-read: edits show up on reload
        html = html.replace("const API_URL = `http://${window.location.hostname}:8000`;", "const API_URL = '';")
        return HTMLResponse(html)

    @app.get("/logo.svg")
    async def logo():
        return FileResponse(HERE / "logo.svg", media_type="image/svg+xml")

    @app.get("/health")
    async def health():
        stats = scheduler.stats() if scheduler.started else None
        return {"status": "ok", "ready": bool(scheduler.started), "num_gpus": len(scheduler.workers),
                "available_workers": stats["available_workers"] if stats else 0}

    @app.get("/stats")
    async def stats(request: Request):
        if not authorized(request):
            return JSONResponse(status_code=401, content={"detail": "Invalid or missing API key"})
        return scheduler.stats()

    @app.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if not authorized(request):
            return JSONResponse(status_code=401, content={"detail": "Invalid or missing API key"})
        try:
            check_ready()
            conversation = [(m.role, m.content) for m in body.messages]
            validate_conversation(conversation)
            validate_sampling(body.temperature, body.top_k, body.max_tokens)
            prompt = render_prompt(tokenizer, conversation)
            check_context(prompt)
        except InvalidRequest as e:
            return JSONResponse(status_code=e.status, content={"detail": e.message})
        logger.debug("chat request: %s", conversation)
        temperature = defaults["temperature"] if body.temperature is None else body.temperature
        top_k = defaults["top_k"] if body.top_k is None else body.top_k
        max_tokens = defaults["max_tokens"] if body.max_tokens is None else body.max_tokens

        async def stream():
            t0, n, finish, worker_id = time.perf_counter(), 0, "cancelled", None
            text = TextStream(tokenizer)

            def event(payload):
                return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
            try:
                async for req, batch in token_events(prompt, max_tokens, temperature, top_k, None):
                    worker_id, out = req.worker_id, []
                    for ev in batch:
                        if ev[0] == "token":
                            n += 1
                            delta = text.push(ev[1])
                            if delta:
                                out.append(event({"token": delta, "gpu": worker_id}))
                        elif ev[0] == "done":
                            finish = ev[1]
                            tail = text.flush()
                            if tail:
                                out.append(event({"token": tail, "gpu": worker_id}))
                            out.append(event({"done": True}))
                        else:
                            finish = "error"
                            out.append(event({"error": ev[1]}))
                    if out:
                        yield "".join(out)
            finally:
                log_done("chat", prompt, n, finish, t0, worker_id)
        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/v1/models")
    async def list_models(request: Request):
        if not authorized(request):
            return openai_error(401, "Invalid or missing API key", code="invalid_api_key")
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanopipe"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat(body: OpenAIChatRequest, request: Request):
        if not authorized(request):
            return openai_error(401, "Invalid or missing API key", code="invalid_api_key")
        max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        try:
            check_ready()
            conversation = openai_conversation(body)
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            validate_sampling(body.temperature, body.top_k, max_tokens, max_field)
            if body.n not in (None, 1):
                raise InvalidRequest("n must be 1 (one choice per request)", "n")
            if body.top_p is not None and body.top_p != 1:
                raise InvalidRequest("top_p is not supported (use top_k); leave it unset or 1", "top_p")
            if body.stop:
                raise InvalidRequest("stop sequences are not supported; the model stops at <|assistant_end|>", "stop")
            prompt = render_prompt(tokenizer, conversation)
            check_context(prompt)
        except InvalidRequest as e:
            return openai_error(e.status, e.message, e.param)
        temperature = defaults["temperature"] if body.temperature is None else body.temperature
        top_k = defaults["top_k"] if body.top_k is None else body.top_k
        max_tokens = defaults["max_tokens"] if max_tokens is None else max_tokens
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or model_name
        args = (prompt, max_tokens, temperature, top_k, body.seed)

        def usage(n):
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        def finish_reason(f):
            return "length" if f == "length" else "stop"

        if not body.stream:
            t0, tokens, finish, worker_id = time.perf_counter(), [], "cancelled", None
            async for req, batch in token_events(*args):
                worker_id = req.worker_id
                for ev in batch:
                    if ev[0] == "token":
                        tokens.append(ev[1])
                    elif ev[0] == "done":
                        finish = ev[1]
                    else:
                        return openai_error(500, f"generation failed: {ev[1]}", type_="server_error")
            log_done("v1", prompt, len(tokens), finish, t0, worker_id)
            return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": tokenizer.decode(tokens)},
                                 "logprobs": None, "finish_reason": finish_reason(finish)}],
                    "usage": usage(len(tokens))}

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def sse(payload):
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(delta, finish=None):
            payload = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                       "system_fingerprint": None,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                payload["usage"] = None
            return sse(payload)

        async def stream():
            t0, n, finish, worker_id = time.perf_counter(), 0, "cancelled", None
            text = TextStream(tokenizer)
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for req, batch in token_events(*args):
                    worker_id, out = req.worker_id, []
                    for ev in batch:
                        if ev[0] == "token":
                            n += 1
                            delta = text.push(ev[1])
                            if delta:
                                out.append(chunk({"content": delta}))
                        elif ev[0] == "done":
                            finish = ev[1]
                            tail = text.flush()
                            if tail:
                                out.append(chunk({"content": tail}))
                            out.append(chunk({}, finish_reason(finish)))
                            if include_usage:
                                out.append(sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                                "model": name, "choices": [], "usage": usage(n)}))
                        else:
                            finish = "error"
                            out.append(sse({"error": {"message": ev[1], "type": "server_error", "param": None,
                                                      "code": None}}))
                    if out:
                        yield "".join(out)
                yield "data: [DONE]\n\n"
            finally:
                log_done("v1 stream", prompt, n, finish, t0, worker_id)
        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app

# -----------------------------------------------------------------------------
# Running it


def serve(model, tokenizer, cfg=None, dtype=None):
    """Run the chat server with uvicorn until interrupted (blocking)."""
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    host, port = _cfg(cfg, "host"), int(_cfg(cfg, "port"))
    app = create_app(model, tokenizer, cfg, dtype=dtype)
    has_key = bool(_cfg(cfg, "api_key") or os.environ.get("NANOPIPE_API_KEY"))
    if host not in ("127.0.0.1", "localhost", "::1") and not has_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                       "(set serve.api_key or $NANOPIPE_API_KEY)", host)
    print(f"Starting nanopipe chat server: temperature {_cfg(cfg, 'temperature')}, top-k {_cfg(cfg, 'top_k')}, "
          f"max tokens {_cfg(cfg, 'max_tokens')}")
    print(f"Open http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}/ "
          f"(OpenAI API at /v1, base_url http://{host}:{port}/v1)")
    uvicorn.run(app, host=host, port=port, log_level="info")


def run_in_thread(app, host="127.0.0.1", port=0):
    """Start uvicorn on a background thread (tests, benchmarks). Returns (server, thread, port);
    stop with `server.should_exit = True; thread.join()`."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("uvicorn failed to start (see the log above)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, bound
