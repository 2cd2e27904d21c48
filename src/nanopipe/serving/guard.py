"""What reaches the routers: the request body guard and the error handlers of last resort.

BodyGuard is a pure ASGI middleware in front of the routes that take a body (every POST under
/v1/, POST /chat/completions, /tokenize and /detokenize). Before FastAPI parses anything it reads the whole body and
refuses it unless it is
    JSON by its Content-Type (application/json or */*+json; a missing Content-Type is taken as
    JSON, as FastAPI does)                                               415
    at most MAX_BODY_BYTES (Content-Length first, then counted while reading, so a chunked
    body cannot get past it)                                             413
    valid UTF-8 (RFC 8259; json.loads would otherwise guess UTF-16/32)   400
then replays it to the app. The remaining body errors come from FastAPI's parser: malformed
JSON is a RequestValidationError (app.on_schema_error), JSON nested too deeply for the parser
or an integer of more than 4300 digits an HTTPException(400), rendered by on_http_error.

Every refusal takes the shape of the API that was called: OpenAI's
{"error": {"message", "type", "param", "code"}} under /v1, {"detail": ...} elsewhere.
on_http_error does the same for Starlette's own errors (404 unknown route, 405, ...), and
on_unexpected for an exception no route handled (a 500, logged with its traceback).
"""
import email.message

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException

from nanopipe.serving.schemas import MAX_BODY_BYTES
from nanopipe.serving.state import detail_error, openai_error


def is_openai_path(path):
    return path.startswith("/v1/")


GUARDED_PATHS = ("/chat/completions", "/tokenize", "/detokenize")


def _guarded(scope):
    return (scope["type"] == "http" and scope["method"] == "POST"
            and (is_openai_path(scope["path"]) or scope["path"] in GUARDED_PATHS))


def _is_json(content_type):
    if content_type is None:
        return True
    msg = email.message.Message()
    msg["content-type"] = content_type
    subtype = msg.get_content_subtype()
    return msg.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def refusal(path, status, message, param=None, code=None):
    """An error response in the shape of the API at `path`."""
    if is_openai_path(path):
        type_ = "invalid_request_error" if status < 500 else "server_error"
        return openai_error(status, message, param, type_=type_, code=code)
    return detail_error(status, message)


class BodyGuard:
    """ASGI middleware: a generating route only ever sees a JSON, UTF-8 body of bounded size."""

    def __init__(self, app, max_bytes=MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if not _guarded(scope):
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        too_large = f"The request body is larger than the limit of {self.max_bytes} bytes"
        if not _is_json(headers.get("content-type")):
            return await refusal(path, 415, f"Content-Type must be application/json, got "
                                 f"{headers['content-type'][:100]!r}", code="unsupported_media_type")(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            return await refusal(path, 413, too_large, code="request_too_large")(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await refusal(path, 413, too_large, code="request_too_large")(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await refusal(path, 400, f"The request body is not valid UTF-8 (byte {e.start}: {e.reason})",
                                 code="invalid_encoding")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel (http.disconnect)
        await self.app(scope, replay, send)


async def on_http_error(request: Request, exc: HTTPException):
    """Starlette's and FastAPI's HTTP errors (unknown route, wrong method, unparsable body) in OpenAI's shape under /v1."""
    if is_openai_path(request.url.path):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            cause = exc.__cause__
            why = ("JSON nested too deeply" if isinstance(cause, RecursionError)
                   else f"{type(cause).__name__}: {cause}" if cause is not None else "")
            message = f"The request body is not valid JSON{': ' + why if why else ''}"
        response = refusal(request.url.path, exc.status_code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response
    return await http_exception_handler(request, exc)


async def on_unexpected(request: Request, exc: Exception):
    """An exception no route handled: a 500 in the API's shape (Starlette logs the traceback)."""
    return refusal(request.url.path, 500, f"internal error: {type(exc).__name__}")
