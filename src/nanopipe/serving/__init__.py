"""The chat server (the serve stage runs it; `nanopipe.serving.app.serve`).

app.py            create_app (the FastAPI factory: scheduler, per-app state, CORS, error handlers,
                  routers), serve (uvicorn, blocking), run_in_thread (tests, benchmarks)
routes_chat.py    the chat UI, its logo and nanochat's SSE API (POST /chat/completions)
routes_openai.py  the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)
routes_tokens.py  vLLM's /tokenizer_info, /tokenize, /detokenize (lm-eval's remote tokenizer)
routes_ops.py     /health, /stats and /metrics
choices.py        a /v1 request's scheduler requests (429, timeout, shutdown) and stop strings
metrics.py        the Prometheus exposition and the per-route response counts
schemas.py        request models (every field bounded), abuse limits and validation, prompt rendering
guard.py          the body guard (JSON, UTF-8, size) and the error handlers of last resort
state.py          ServerState (scheduler, tokenizer, serve config, API key) and its FastAPI dependency
streaming.py      decode-thread events into the event loop, UTF-8-safe text deltas, SSE framing
scheduler.py      continuous batching: a decode thread per model copy, many requests per step
sampling.py       the scheduler's batched sampler (temperature, top-k/p, penalties, counter-based seeds)
ui.html, logo.svg the web UI
static/swagger-ui Swagger UI for /docs (vendored, so it works offline)

The Engine (KV-cached sampling and the calculator tool, whose per-row steps the scheduler
shares) lives in nanopipe.inference.engine; the terminal chat in nanopipe.stages.chat.
"""
