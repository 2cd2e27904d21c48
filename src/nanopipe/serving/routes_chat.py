"""nanochat's own surface: the chat UI, its favicon and nanochat's streaming chat API.

    GET  /                  chat UI (ui.html, its API_URL pointed at this server)
    GET  /logo.svg          favicon
    POST /chat/completions  SSE: [data: {"notice": ...}] data: {"token": ..., "gpu": i} ... data: {"done": true}
                            (or {"error": ...})

The UI holds a conversation, so this route has a rolling context (nanopipe.inference.chat_context,
docs/decisions.md D16): when the conversation plus room for a reply outgrows the model's context,
the oldest exchanges are left out of the prompt and the stream opens with a `notice` event saying
how many messages were dropped; only a newest message that alone does not fit is refused (400).
The OpenAI route keeps OpenAI's semantics (an over-long conversation is a 400).

Errors are {"detail": ...}: 401 without the API key (the UI stays open), 400 / 503 from
validation (InvalidRequest, rendered by the app), FastAPI's 422 for a malformed body.
"""
import logging
from contextlib import aclosing
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse

from nanopipe.inference.chat_context import ContextFull, fit_conversation, notice
from nanopipe.serving.schemas import ChatRequest, InvalidRequest, render_prompt, validate_chat
from nanopipe.serving.state import UNAUTHORIZED, ServerState, StateDep, detail_error
from nanopipe.serving.streaming import SSE_HEADERS, Generation, sse, text_events

logger = logging.getLogger("nanopipe.serve")
HERE = Path(__file__).parent

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def root():
    html = (HERE / "ui.html").read_text(encoding="utf-8")  # re-read: edits show up on reload
    html = html.replace("const API_URL = `http://${window.location.hostname}:8000`;", "const API_URL = '';")
    return HTMLResponse(html)


@router.get("/logo.svg")
async def logo():
    return FileResponse(HERE / "logo.svg", media_type="image/svg+xml")


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: StateDep):
    if not state.authorized(request):
        return detail_error(401, UNAUTHORIZED)
    state.check_ready()
    conversation = validate_chat(body)
    context = state.scheduler.context_length
    max_tokens = state.cfg.max_tokens if body.max_tokens is None else body.max_tokens
    try:
        fitted = fit_conversation(state.tokenizer, conversation, context, max_tokens, render_prompt)
    except ContextFull as e:
        raise InvalidRequest(str(e)[0].upper() + str(e)[1:], "messages") from None
    logger.debug("chat request: %s (%d oldest messages dropped)", conversation, fitted.dropped)
    gen = state.generation("chat", fitted.prompt, body.temperature, body.top_k, fitted.max_tokens)
    opening = {"notice": notice(fitted.dropped, context), "dropped": fitted.dropped} if fitted.dropped else None
    return StreamingResponse(chat_stream(state, gen, opening), media_type="text/event-stream", headers=SSE_HEADERS)


async def chat_stream(state: ServerState, gen: Generation, opening=None):
    """nanochat's SSE events for `gen`, one network write per batch of decoded tokens; `opening`
    (the rolling context's notice) first."""
    if opening is not None:
        yield sse(opening)
    try:
        async with aclosing(text_events(state.scheduler, state.tokenizer, gen)) as batches:
            async for batch in batches:
                out = []
                for kind, value in batch:
                    if kind == "text":
                        out.append(sse({"token": value, "gpu": gen.worker_id}))
                    elif kind == "done":
                        out.append(sse({"done": True}))
                    else:
                        out.append(sse({"error": value}))
                if out:
                    yield "".join(out)
    except Exception as e:  # the headers are sent: report it in the stream (this request only)
        logger.exception("chat stream: generation failed")
        gen.finish = "error"
        yield sse({"error": f"generation failed: {type(e).__name__}: {e}"})
    finally:
        gen.log()
