"""Per-app state shared by the routers, and the FastAPI dependency that hands it to them.

ServerState holds what one app serves with: the scheduler, the tokenizer, the `serve` config
section (the sampling defaults) and the API key. It answers the checks every generating route
makes (auth, readiness, context length) and turns a request's sampling parameters into a
Generation. create_app stores it on app.state.server; a route takes it as `state: StateDep`
(Annotated[ServerState, Depends(server_state)]). detail_error is the error shape of nanochat's
API (and of the routes outside /v1).
"""
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from nanopipe.serving.scheduler import Scheduler
from nanopipe.serving.schemas import InvalidRequest, render_prompt
from nanopipe.serving.streaming import Generation

UNAUTHORIZED = "Invalid or missing API key"


@dataclass
class ServerState:
    scheduler: Scheduler
    tokenizer: Any
    cfg: Any  # the validated `serve` config section
    api_key: str  # "" = no auth

    def authorized(self, request: Request) -> bool:
        """True without an API key; else the request must carry `Authorization: Bearer <key>`."""
        if not self.api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    def check_ready(self):
        if not self.scheduler.started:
            raise InvalidRequest("the model is still loading", status=503)

    def prompt(self, conversation, field="messages"):
        """The conversation's prompt tokens; it must leave room in the model's context for a reply."""
        prompt = render_prompt(self.tokenizer, conversation)
        if len(prompt) >= self.scheduler.context_length:
            raise InvalidRequest(f"The conversation is {len(prompt)} tokens; the model's context is "
                                 f"{self.scheduler.context_length} tokens", field)
        return prompt

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


def detail_error(status, message):
    """nanochat's error body: {"detail": message}."""
    return JSONResponse(status_code=status, content={"detail": message})
