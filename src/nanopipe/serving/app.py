"""
Chat server: the web UI, nanochat's streaming chat API and an OpenAI-compatible API, all
over the continuous-batching scheduler (many clients decode together; a slow client never
holds up the others).

    GET  /                       chat UI (ui.html)                         routes_chat
    GET  /logo.svg               favicon                                   routes_chat
    POST /chat/completions       nanochat's SSE protocol: data: {"token": ..., "gpu": i} ... data: {"done": true}
    POST /v1/chat/completions    OpenAI chat completions (stream or not)   routes_openai
    GET  /v1/models              OpenAI model list                         routes_openai
    GET  /health                 liveness + readiness                      routes_ops
    GET  /stats                  workers, queue depth, active sequences, tokens served

Out-of-range parameters are rejected (400 naming the field), never clamped; a malformed
body is a 422 (nanochat API) or a 400 in OpenAI's error shape (/v1). Binds 127.0.0.1 unless
told otherwise; with an API key (config `api_key` or $NANOPIPE_API_KEY) every API route
wants `Authorization: Bearer <key>` (the UI and /health stay open; the UI's /key command sets it).

This module holds the factory (create_app: the scheduler over one model copy per GPU, the
per-app ServerState, CORS, the error handlers, the routers) and the ways to run it: serve
(blocking, uvicorn) and run_in_thread (tests, benchmarks). MODEL_NAME, InvalidRequest and
render_prompt are re-exported from the modules that hold them.
"""
import asyncio
import logging
import os
import threading
import time
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware

from nanopipe.config import bad_value
from nanopipe.runtime import compute_dtype
from nanopipe.serving import routes_chat, routes_openai, routes_ops
from nanopipe.serving.routes_openai import MODEL_NAME, openai_error
from nanopipe.serving.scheduler import Scheduler, replicate_model
from nanopipe.serving.schemas import InvalidRequest, render_prompt
from nanopipe.serving.state import ServerState, detail_error

__all__ = ["MODEL_NAME", "InvalidRequest", "create_app", "render_prompt", "run_in_thread", "serve", "worker_models"]

logger = logging.getLogger("nanopipe.serve")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


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
    await asyncio.to_thread(scheduler.shutdown)


def _openai_path(request: Request):
    return request.url.path.startswith("/v1/")


async def on_schema_error(request: Request, exc: RequestValidationError):
    """A malformed body: FastAPI's 422 (loc names the field), or OpenAI's 400 under /v1."""
    if _openai_path(request):
        return routes_openai.schema_error(exc)
    return await request_validation_exception_handler(request, exc)


async def on_invalid_request(request: Request, exc: InvalidRequest):
    """A refused request in the shape of the API that was called."""
    if _openai_path(request):
        return openai_error(exc.status, exc.message, exc.param)
    return detail_error(exc.status, exc.message)


def create_app(model, tokenizer, cfg, scheduler=None, dtype=None):
    """FastAPI app serving `model` (on its device, replicated per GPU) with `tokenizer`.

    cfg: the `serve` config section (conf/serve; its workers, max_batch, temperature, top_k,
    max_tokens and api_key are read here). scheduler: a ready-made Scheduler instead of one over
    `model`. dtype: compute dtype override ('bfloat16', 'float32', ...); default: bf16 autocast on CUDA SM80+.
    """
    if scheduler is None:
        device = torch.device(model.get_device())
        scheduler = Scheduler(worker_models(model, int(cfg.workers)), tokenizer, max_batch=int(cfg.max_batch),
                              autocast_dtype=compute_dtype(device, dtype))
    app = FastAPI(title="nanopipe chat", lifespan=lifespan)
    api_key = cfg.api_key or os.environ.get("NANOPIPE_API_KEY", "")
    app.state.server = ServerState(scheduler, tokenizer, cfg, api_key)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    app.add_exception_handler(RequestValidationError, on_schema_error)
    app.add_exception_handler(InvalidRequest, on_invalid_request)
    for routes in (routes_chat, routes_openai, routes_ops):
        app.include_router(routes.router)
    return app


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
