"""Per-app state shared by the routers, and the FastAPI dependency that hands it to them.

ServerState holds what one app serves with: the scheduler, the tokenizer, the `serve` config
section (the sampling defaults) and the API key. It answers the checks every generating route
makes (auth, readiness, context length) and turns a request's sampling parameters into a
Generation. create_app stores it on app.state.server; a route takes it as `state: StateDep`
(Annotated[ServerState, Depends(server_state)]). detail_error is the error shape of nanochat's
API (and of the routes outside /v1), openai_error OpenAI's.

Model names: /v1 serves one model, MODEL_NAME, also known by the names in `serve.model_aliases`;
a request that names any other model is refused as OpenAI does (404, code model_not_found),
one that names none gets the served model.
"""
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from nanopipe.serving.choices import Submission
from nanopipe.serving.metrics import Metrics
from nanopipe.serving.scheduler import QueueFull, Scheduler
from nanopipe.serving.schemas import InvalidRequest, render_prompt
from nanopipe.serving.streaming import Generation

UNAUTHORIZED = "Invalid or missing API key"
MODEL_NAME = "nanopipe"


@dataclass
class ServerState:
    scheduler: Scheduler
    tokenizer: Any
    cfg: Any  # the validated `serve` config section
    api_key: str  # "" = no auth
    metrics: Metrics = field(default_factory=Metrics)
    shutdown_started: Optional[float] = None  # time.monotonic() of SIGTERM / Ctrl-C (app.DrainingServer)

    def authorized(self, request: Request) -> bool:
        """True without an API key; else the request must carry `Authorization: Bearer <key>`."""
        if not self.api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    @property
    def model_names(self):
        """The names /v1 answers to: MODEL_NAME first, then the configured aliases."""
        return [MODEL_NAME] + [a for a in self.cfg.model_aliases if a != MODEL_NAME]

    def check_model(self, name):
        """A request's `model`: None or one of model_names; anything else is a 404 model_not_found."""
        if name is not None and name not in self.model_names:
            raise InvalidRequest(f"The model `{name}` does not exist or you do not have access to it. "
                                 f"This server serves: {', '.join(self.model_names)}", "model", status=404,
                                 code="model_not_found")

    def check_ready(self):
        if not self.scheduler.started:
            raise InvalidRequest("the model is still loading", status=503)
        if not self.scheduler.healthy:
            raise InvalidRequest("no decode worker is running (see /health)", status=503)

    def prompt(self, conversation, field="messages"):
        """The conversation's prompt tokens; it must leave room in the model's context for a reply."""
        prompt = render_prompt(self.tokenizer, conversation)
        if len(prompt) >= self.scheduler.context_length:
            raise InvalidRequest(f"The conversation is {len(prompt)} tokens; the model's context is "
                                 f"{self.scheduler.context_length} tokens", field)
        return prompt

    @property
    def request_timeout(self):
        return float(self.cfg.request_timeout)

    def shutdown_at(self):
        """When requests in flight are cut for the shutdown (time.monotonic()), or None: half a
        second before uvicorn's grace period (serve.shutdown_timeout) ends, so that each stream
        still gets to send its error event and [DONE] (docs/decisions.md, D15)."""
        if self.shutdown_started is None:
            return None
        return self.shutdown_started + max(0.0, float(self.cfg.shutdown_timeout) - 0.5)

    def submit_spec(self, prompt, sampling, i, prompt_logprobs=False):
        """Scheduler.submit's arguments for choice i of a /v1 request (unset values from the config)."""
        cfg = self.cfg
        return dict(prompt=prompt, max_tokens=cfg.max_tokens if sampling.max_tokens is None else sampling.max_tokens,
                    temperature=cfg.temperature if sampling.temperature is None else sampling.temperature,
                    top_k=cfg.top_k if sampling.top_k is None else sampling.top_k, top_p=sampling.top_p,
                    seed=sampling.seed_for(i), presence_penalty=sampling.presence_penalty,
                    frequency_penalty=sampling.frequency_penalty, logprobs=sampling.logprobs,
                    prompt_logprobs=prompt_logprobs)

    def submit(self, specs):
        """Submit every spec at once (all or none); a full queue is a 429 with Retry-After."""
        try:
            return Submission(self.scheduler, specs, time.monotonic() + self.request_timeout, self.shutdown_at)
        except QueueFull as e:
            raise InvalidRequest(f"The server is busy: {e}. Retry after {e.retry_after} s", status=429,
                                 code="rate_limit_exceeded", type_="requests",
                                 headers={"Retry-After": str(int(e.retry_after))}) from None

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size()

    def encode_text(self, text, add_special_tokens=True):
        """Text -> token ids as an HF tokenizer (and vLLM) does for raw completions: special-token
        text (<|bos|>, ...) becomes the special token, and add_special_tokens puts <|bos|> first
        (docs/decisions.md, D15). The chat routes never do this: a message's text is only ever text."""
        specials = sorted(self.tokenizer.get_special_tokens(), key=len, reverse=True)
        ids = [self.tokenizer.get_bos_token_id()] if add_special_tokens else []
        pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
        for i, piece in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self.tokenizer.encode_special(piece))
            elif piece:
                ids += self.tokenizer.encode(piece)
        return ids

    def encode_completion_prompt(self, text):
        return self.encode_text(text, add_special_tokens=True)

    def generation(self, kind, prompt, temperature, top_k, max_tokens, seed=None):
        """A Generation of `prompt`; the sampling parameters the request left unset (None) come from the config."""
        cfg = self.cfg
        return Generation(kind, prompt, max_tokens=cfg.max_tokens if max_tokens is None else max_tokens,
                          temperature=cfg.temperature if temperature is None else temperature,
                          top_k=cfg.top_k if top_k is None else top_k, seed=seed)


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the ServerState of the app serving this request."""
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(server_state)]


def _printable(text):
    """`text` safe to encode as UTF-8 (a lone surrogate a client sent becomes \\udxxx)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else text


def detail_error(status, message):
    """nanochat's error body: {"detail": message}."""
    return JSONResponse(status_code=status, content={"detail": _printable(message)})


def openai_error(status, message, param=None, type_="invalid_request_error", code=None):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(status_code=status, content={"error": {"message": _printable(message), "type": type_,
                                                               "param": _printable(param), "code": code}})
