"""The OpenAI-compatible API (base_url http://host:port/v1).

    POST /v1/chat/completions  chat.completion, or chat.completion.chunk SSE ending in data: [DONE]
    GET  /v1/models            the one model, MODEL_NAME, and its aliases (serve.model_aliases)

Errors are OpenAI's {"error": {"message", "type", "param", "code"}}: 401 invalid_api_key, 400
naming the field (validation, and a malformed body: schema_error), 404 model_not_found for a
model that is neither MODEL_NAME nor an alias, 413/415/400 for a body that is too large, not
JSON or not UTF-8 (guard.py), 503 while loading or with no decode worker alive, 500 if this
request's generation fails. A streamed answer whose generation fails ends with an error event
({"error": {...}}) and data: [DONE]; either way only that request is affected. top_k is
accepted as an extension; n > 1, top_p < 1, stop, logit_bias, penalties and logprobs are rejected.
"""
import logging
import re
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from nanopipe.serving.schemas import OpenAIChatRequest, validate_openai
from nanopipe.serving.state import MODEL_NAME, UNAUTHORIZED, ServerState, StateDep, openai_error
from nanopipe.serving.streaming import SSE_HEADERS, Generation, sse, text_events, token_events

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
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nanopipe"}
                                       for name in state.model_names]}


@router.post("/chat/completions")
async def chat_completions(body: OpenAIChatRequest, request: Request, state: StateDep):
    if not state.authorized(request):
        return openai_error(401, UNAUTHORIZED, code="invalid_api_key")
    state.check_model(body.model)
    state.check_ready()
    conversation, max_tokens = validate_openai(body)
    prompt = state.prompt(conversation)
    gen = state.generation("v1 stream" if body.stream else "v1", prompt, body.temperature, body.top_k, max_tokens,
                           body.seed)
    reply = Reply(body.model or MODEL_NAME, len(prompt), bool(body.stream_options and body.stream_options.include_usage))
    if not body.stream:
        return await complete(state, gen, reply)
    return StreamingResponse(stream(state, gen, reply), media_type="text/event-stream", headers=SSE_HEADERS)


async def complete(state: ServerState, gen: Generation, reply: Reply):
    """The whole answer as one chat.completion (a 500 server_error if this generation fails)."""
    tokens = []
    try:
        async with aclosing(token_events(state.scheduler, gen)) as batches:
            async for batch in batches:
                for ev in batch:
                    if ev[0] == "token":
                        tokens.append(ev[1])
                    elif ev[0] == "done":
                        gen.finish = ev[1]
                    else:
                        gen.finish = "error"
                        return openai_error(500, f"generation failed: {ev[1]}", type_="server_error")
    except Exception as e:  # e.g. no worker left to take it
        logger.exception("v1: generation failed")
        gen.finish = "error"
        return openai_error(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")
    finally:
        gen.tokens = len(tokens)
        gen.log()
    return reply.completion(state.tokenizer.decode(tokens), gen.finish, len(tokens))


def stream_error(message):
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


async def stream(state: ServerState, gen: Generation, reply: Reply):
    """The answer as chat.completion.chunk events: the role, content deltas, the finish reason,
    the usage if asked for (stream_options.include_usage), then [DONE]. If this generation fails,
    an error event takes the finish reason's place (then [DONE])."""
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
                        out.append(stream_error(value))
                if out:
                    yield "".join(out)
    except Exception as e:  # the headers are sent: report it in the stream
        logger.exception("v1 stream: generation failed")
        gen.finish = "error"
        yield stream_error(f"generation failed: {type(e).__name__}: {e}")
    finally:
        gen.log()
    yield "data: [DONE]\n\n"
