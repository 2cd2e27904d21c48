"""
Chat server: the web UI, nanochat's streaming chat API and an OpenAI-compatible API, all
over the continuous-batching scheduler (many clients decode together; a slow client never
holds up the others).

    GET  /                       chat UI (ui.html)                         routes_chat
    GET  /logo.svg               favicon                                   routes_chat
    POST /chat/completions       nanochat's SSE protocol: data: {"token": ..., "gpu": i} ... data: {"done": true}
    POST /v1/chat/completions    OpenAI chat completions (stream or not)   routes_openai
    POST /v1/completions         OpenAI (legacy) completions: lm-eval's local-completions
    GET  /v1/models              OpenAI model list                         routes_openai
    GET  /tokenizer_info         vLLM's tokenizer endpoints (lm-eval's     routes_tokens
    POST /tokenize, /detokenize  tokenizer_backend=remote)
    GET  /health                 liveness + readiness                      routes_ops
    GET  /stats                  workers, queue depth, active sequences, tokens served
    GET  /metrics                the same and more in Prometheus's text format (metrics.py)
    GET  /docs                   Swagger UI, served from the package (static/swagger-ui): works offline

Out-of-range parameters are rejected (400 naming the field), never clamped; a malformed
body is a 422 (nanochat API) or a 400 in OpenAI's error shape (/v1); a body that is too large,
not JSON or not UTF-8 is refused before parsing (413/415/400, guard.py). Every rejection under
/v1 has OpenAI's error shape. Binds 127.0.0.1 unless told otherwise; with an API key (config
`api_key` or $NANOPIPE_API_KEY) every API route wants `Authorization: Bearer <key>` (the UI
and /health stay open; the UI's /key command sets it).

Isolation: one request's failure (refused, or failing while admitted or decoded) ends that
request only; the decode workers are supervised (scheduler.py) and /health answers 503
"unhealthy" once none is alive. Load: at most `serve.max_queue` requests wait for a slot (one
more is a 429 with Retry-After), a /v1 request may take `serve.request_timeout` seconds, and a
client that hangs up has its slots freed at once. CORS is off unless `serve.cors_origins` lists origins (never
with credentials). Shutdown (Ctrl-C / SIGTERM) gives requests in flight `serve.shutdown_timeout`
seconds, then cuts them and stops the workers (at most STOP_JOIN_S more): it always ends. A /v1
stream still in flight just before the grace period ends is ended by the server itself with an
error event and data: [DONE] (DrainingServer tells the routes when the shutdown began; D15).

This module holds the factory (create_app: the scheduler over one model copy per GPU, the
per-app ServerState, the body guard, CORS, the error handlers, the routers) and the ways to
run it: serve (blocking, uvicorn) and run_in_thread (tests, benchmarks). MODEL_NAME,
InvalidRequest and render_prompt are re-exported from the modules that hold them.
"""
import asyncio
import logging
import math
import os
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from nanopipe.config import bad_value
from nanopipe.runtime import compute_dtype
from nanopipe.serving import routes_chat, routes_openai, routes_ops, routes_tokens
from nanopipe.serving.guard import BodyGuard, is_openai_path, on_http_error, on_unexpected
from nanopipe.serving.metrics import HttpMetrics
from nanopipe.serving.scheduler import STOP_JOIN_S, Scheduler, replicate_model
from nanopipe.serving.schemas import InvalidRequest, render_prompt
from nanopipe.serving.state import MODEL_NAME, ServerState, detail_error, openai_error

__all__ = ["MODEL_NAME", "InvalidRequest", "create_app", "render_prompt", "run_in_thread", "serve", "worker_models"]

logger = logging.getLogger("nanopipe.serve")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SWAGGER_UI = Path(__file__).parent / "static" / "swagger-ui"  # swagger-ui-dist, vendored (its README.md)
# the files served from it, licenses included, and their media types
SWAGGER_UI_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "LICENSE": "text/plain",
                    "NOTICE": "text/plain", "swagger-ui-bundle.js.LICENSE.txt": "text/plain", "README.md": "text/markdown"}


def worker_models(model, workers=0):
    """One model copy per GPU (workers=0: every visible GPU; N: the first N); one worker on CPU/MPS."""
    device = torch.device(model.get_device())
    if device.type != "cuda":
        if workers not in (0, 1):
            raise bad_value("serve.workers", workers, f"0 or 1: more workers need CUDA GPUs (the model is on {device})")
        return [model]
    available = torch.cuda.device_count()
    n = available if workers == 0 else workers
    if n > available:
        raise bad_value("serve.workers", workers, f"at most the {available} visible CUDA device(s)")
    if n == 1:
        return [model]
    return replicate_model(model, [f"cuda:{i}" for i in range(n)])


@asynccontextmanager
async def lifespan(app):
    """Start the decode workers before the first request; stop them at shutdown."""
    scheduler = app.state.server.scheduler
    logger.info("starting %d decode worker(s)...", len(scheduler.workers))
    await asyncio.to_thread(scheduler.start)
    logger.info("ready: %s", ", ".join(f"worker {w.id} on {w.device} ({w.mode})" for w in scheduler.workers))
    yield
    await asyncio.to_thread(scheduler.shutdown, STOP_JOIN_S)


async def on_schema_error(request: Request, exc: RequestValidationError):
    """A malformed body: FastAPI's 422 (loc names the field), or OpenAI's 400 under /v1."""
    if is_openai_path(request.url.path):
        return routes_openai.schema_error(exc)
    return await request_validation_exception_handler(request, exc)


async def on_invalid_request(request: Request, exc: InvalidRequest):
    """A refused request in the shape of the API that was called."""
    if is_openai_path(request.url.path):
        response = openai_error(exc.status, exc.message, exc.param, type_=exc.type_, code=exc.code)
    else:
        response = detail_error(exc.status, exc.message)
    response.headers.update(exc.headers or {})
    return response


def add_cors(app, origins):
    """CORS for the listed origins only ([] = none, the default; "*" = any): GET/POST with the
    Authorization and Content-Type headers, never with credentials (cookies): the API key is a
    bearer header, and a wildcard that echoes origins with credentials would let any site use it."""
    origins = list(origins)
    if not origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                       allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])


def create_app(model, tokenizer, cfg, scheduler=None, dtype=None):
    """FastAPI app serving `model` (on its device, replicated per GPU) with `tokenizer`.

    cfg: the `serve` config section (conf/serve; its workers, max_batch, temperature, top_k,
    max_tokens and api_key are read here). scheduler: a ready-made Scheduler instead of one over
    `model`. dtype: compute dtype override ('bfloat16', 'float32', ...); default: bf16 autocast on CUDA SM80+.
    """
    if scheduler is None:
        device = torch.device(model.get_device())
        scheduler = Scheduler(worker_models(model, int(cfg.workers)), tokenizer, max_batch=int(cfg.max_batch),
                              autocast_dtype=compute_dtype(device, dtype), max_queue=int(cfg.max_queue))
    # FastAPI's own /docs loads Swagger UI from a CDN (blank offline) and /redoc loads ReDoc: both off;
    # /docs is served below from the files shipped in the package
    app = FastAPI(title="nanopipe chat", lifespan=lifespan, docs_url=None, redoc_url=None)
    api_key = cfg.api_key or os.environ.get("NANOPIPE_API_KEY", "")
    app.state.server = ServerState(scheduler, tokenizer, cfg, api_key)
    app.add_middleware(BodyGuard)
    add_cors(app, cfg.cors_origins)  # outside the guard: its headers go on the guard's refusals too
    app.add_middleware(HttpMetrics, metrics=app.state.server.metrics, routes=app.router.routes)  # counts them all
    app.add_exception_handler(RequestValidationError, on_schema_error)
    app.add_exception_handler(InvalidRequest, on_invalid_request)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    for routes in (routes_chat, routes_openai, routes_ops, routes_tokens):
        app.include_router(routes.router)
    add_docs(app)
    return app


def add_docs(app):
    """/docs: Swagger UI from the package's own copy (works offline), favicon the chat logo."""
    @app.get("/static/swagger-ui/{name}", include_in_schema=False)
    async def swagger_ui_file(name: str):
        if name not in SWAGGER_UI_FILES:
            raise HTTPException(404, f"no file {name!r} here")
        return FileResponse(SWAGGER_UI / name, media_type=SWAGGER_UI_FILES[name])

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API docs",
                                   swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui/swagger-ui.css", swagger_favicon_url="/logo.svg")


class DrainingServer:
    """uvicorn.Server that tells the app when a shutdown begins (SIGTERM / Ctrl-C, or should_exit
    set by run_in_thread's caller), so that /v1 streams can end themselves cleanly before
    uvicorn's grace period runs out (ServerState.shutdown_at)."""

    @staticmethod
    def create(app, config):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                _mark_shutdown(app)
                super().handle_exit(sig, frame)

            async def shutdown(self, sockets=None):
                _mark_shutdown(app)  # also for should_exit set directly
                await super().shutdown(sockets)
        return _Server(config)


def _mark_shutdown(app):
    state = app.state.server
    if state.shutdown_started is None:
        state.shutdown_started = time.monotonic()


def serve(model, tokenizer, cfg, dtype=None):
    """Run the chat server with uvicorn on cfg.host:cfg.port until interrupted (blocking)."""
    import uvicorn
    host, port = cfg.host, int(cfg.port)
    app = create_app(model, tokenizer, cfg, dtype=dtype)
    if host not in LOCAL_HOSTS and not app.state.server.api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                       "(set serve.api_key or $NANOPIPE_API_KEY)", host)
    print(f"Starting nanopipe chat server: temperature {cfg.temperature}, top-k {cfg.top_k}, "
          f"max tokens {cfg.max_tokens}")
    print(f"Open http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}/ "
          f"(OpenAI API at /v1, base_url http://{host}:{port}/v1)")
    # Ctrl-C / SIGTERM: stop accepting, give the requests in flight shutdown_timeout seconds, then
    # cancel them (their slots are freed) and stop the decode workers. A second Ctrl-C cuts at once.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=_grace(cfg))
    try:
        DrainingServer.create(app, config).run()
    except KeyboardInterrupt:  # as uvicorn.run: the Ctrl-C was handled (the shutdown above)
        pass


def _grace(cfg):
    return max(1, math.ceil(float(cfg.shutdown_timeout)))  # uvicorn takes whole seconds


def run_in_thread(app, host="127.0.0.1", port=0):
    """Start uvicorn on a background thread (tests, benchmarks). Returns (server, thread, port);
    stop with `server.should_exit = True; thread.join()`."""
    import uvicorn
    server = DrainingServer.create(app, uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                                       timeout_graceful_shutdown=_grace(app.state.server.cfg)))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("uvicorn failed to start (see the log above)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, bound
