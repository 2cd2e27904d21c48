"""The chat server (the serve stage runs it; `nanopipe.serving.app.serve`).

app.py            create_app (the FastAPI factory: scheduler, per-app state, CORS, error handlers,
                  routers), serve (uvicorn, blocking), run_in_thread (tests, benchmarks)
routes_chat.py    the chat UI, its logo and nanochat's SSE API (POST /chat/completions)
routes_openai.py  the OpenAI-compatible API (/v1/chat/completions, /v1/models)
routes_ops.py     /health and /stats
schemas.py        request models (every field bounded), abuse limits and validation, prompt rendering
guard.py          the body guard (JSON, UTF-8, size) and the error handlers of last resort
state.py          ServerState (scheduler, tokenizer, serve config, API key) and its FastAPI dependency
streaming.py      decode-thread events into the event loop, UTF-8-safe text deltas, SSE framing
scheduler.py      continuous batching: a decode thread per model copy, many requests per step
sampling.py       the scheduler's batched sampler (temperature, top-k/p, penalties, counter-based seeds)
ui.html, logo.svg the web UI

The Engine (KV-cached sampling and the calculator tool, whose per-row steps the scheduler
shares) lives in nanopipe.inference.engine; the terminal chat in nanopipe.stages.chat.
"""
