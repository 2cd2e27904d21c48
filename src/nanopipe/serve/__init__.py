"""Inference and serving.

engine.py     Engine: KV-cached sampling with the calculator tool (generate / generate_batch)
scheduler.py  continuous batching: a decode thread per model copy, many requests per step
app.py        FastAPI server: chat UI, nanochat's SSE API, OpenAI-compatible /v1 API
chat_cli.py   terminal chat (run_chat)
"""
