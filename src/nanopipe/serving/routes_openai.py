"""The OpenAI-compatible API (base_url http://host:port/v1).

    POST /v1/chat/completions  chat.completion, or chat.completion.chunk SSE ending in data: [DONE]
    GET  /v1/models            the one model, MODEL_NAME

Errors are OpenAI's {"error": {"message", "type", "param", "code"}}: 401 invalid_api_key, 400
naming the field (validation, and a malformed body: schema_error), 503 while loading, 500 if
generation fails. top_k is accepted as an extension; n > 1, top_p < 1 and stop are rejected.
"""
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from nanopipe.serving.schemas import OpenAIChatRequest, validate_openai
from nanopipe.serving.state import UNAUTHORIZED, ServerState, StateDep
from nanopipe.serving.streaming import SSE_HEADERS, Generation, sse, text_events, token_events

MODEL_NAME = "nanopipe"

router = APIRouter(prefix="/v1")


def openai_error(status, message, param=None, type_="invalid_request_error", code=None):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_,
                                                               "param": param, "code": code}})


def schema_error(exc: RequestValidationError):
    """A malformed body as a 400 naming the first offending field (messages[0].role, ...)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    return openai_error(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param)


def finish_reason(finish):
    return "length" if finish == "length" else "stop"


@dataclass
class Reply:
    """The fields every chat.completion / chat.completion.chunk of one answer shares."""
    model: str
    prompt_tokens: int
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, n):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def completion(self, content, finish, n):
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": finish_reason(finish)}],
                "usage": self.usage(n)}

    def chunk(self, delta, finish=None):
        payload = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "system_fingerprint": None,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)

    def usage_chunk(self, n):
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [], "usage": self.usage(n)})


@router.get("/models")
async def list_models(request: Request, state: StateDep):
    if not state.authorized(request):
        return openai_error(401, UNAUTHORIZED, code="invalid_api_key")
    return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "nanopipe"}]}


@router.post("/chat/completions")
async def chat_completions(body: OpenAIChatRequest, request: Request, state: StateDep):
    if not state.authorized(request):
        return openai_error(401, UNAUTHORIZED, code="invalid_api_key")
    state.check_ready()
    conversation, max_tokens = validate_openai(body)
    prompt = state.prompt(conversation)
    gen = state.generation("v1 stream" if body.stream else "v1", prompt, body.temperature, body.top_k, max_tokens,
                           body.seed)
    reply = Reply(body.model or MODEL_NAME, len(prompt), bool((body.stream_options or {}).get("include_usage")))
    if not body.stream:
        return await complete(state, gen, reply)
    return StreamingResponse(stream(state, gen, reply), media_type="text/event-stream", headers=SSE_HEADERS)


async def complete(state: ServerState, gen: Generation, reply: Reply):
    """The whole answer as one chat.completion (a 500 if generation fails)."""
    tokens = []
    async with aclosing(token_events(state.scheduler, gen)) as batches:
        async for batch in batches:
            for ev in batch:
                if ev[0] == "token":
                    tokens.append(ev[1])
                elif ev[0] == "done":
                    gen.finish = ev[1]
                else:
                    return openai_error(500, f"generation failed: {ev[1]}", type_="server_error")
    gen.tokens = len(tokens)
    gen.log()
    return reply.completion(state.tokenizer.decode(tokens), gen.finish, len(tokens))


async def stream(state: ServerState, gen: Generation, reply: Reply):
    """The answer as chat.completion.chunk events: the role, content deltas, the finish reason,
    the usage if asked for (stream_options.include_usage), then [DONE]."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        async with aclosing(text_events(state.scheduler, state.tokenizer, gen)) as batches:
            async for batch in batches:
                out = []
                for kind, value in batch:
                    if kind == "text":
                        out.append(reply.chunk({"content": value}))
                    elif kind == "done":
                        out.append(reply.chunk({}, finish_reason(value)))
                        if reply.include_usage:
                            out.append(reply.usage_chunk(gen.tokens))
                    else:
                        out.append(sse({"error": {"message": value, "type": "server_error", "param": None,
                                                  "code": None}}))
                if out:
                    yield "".join(out)
        yield "data: [DONE]\n\n"
    finally:
        gen.log()
