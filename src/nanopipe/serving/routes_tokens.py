"""vLLM's tokenizer endpoints, which lm-evaluation-harness's `local-completions` model uses when
the server offers them (tokenizer_backend=auto or remote): it then tokenizes with the served
model's own tokenizer, offline, with no Hugging Face copy of it.

    GET  /tokenizer_info  {eos_token, bos_token, pad_token, chat_template, model_max_length, vocab_size}
    POST /tokenize        {"prompt": str, "add_special_tokens": bool = true} -> {"tokens", "count", "max_model_len"}
    POST /detokenize      {"tokens": [int]} -> {"prompt": str}

Tokenization is /v1/completions' (ServerState.encode_text): special-token text is the special
token, as with an HF tokenizer, and add_special_tokens puts <|bos|> first. eos_token is
<|assistant_end|>, as in the Hugging Face export. Errors: {"detail": ...} (422 for a malformed
body, 400 for an id outside the vocabulary, 401 without the API key).
"""
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from nanopipe.serving.schemas import MAX_BODY_BYTES, _encodable
from nanopipe.serving.state import UNAUTHORIZED, StateDep, detail_error

router = APIRouter()

EOS_TOKEN, BOS_TOKEN = "<|assistant_end|>", "<|bos|>"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: Annotated[StrictStr, Field(max_length=MAX_BODY_BYTES)]
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: list[StrictInt]


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, state: StateDep):
    if not state.authorized(request):
        return detail_error(401, UNAUTHORIZED)
    return {"tokenizer_class": "nanopipe", "eos_token": EOS_TOKEN, "bos_token": BOS_TOKEN, "pad_token": None,
            "chat_template": None, "model_max_length": state.scheduler.context_length, "vocab_size": state.vocab_size}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, state: StateDep):
    if not state.authorized(request):
        return detail_error(401, UNAUTHORIZED)
    if not _encodable(body.prompt):
        return detail_error(400, "prompt is not valid Unicode (it holds a lone UTF-16 surrogate)")
    tokens = state.encode_text(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.scheduler.context_length}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request, state: StateDep):
    if not state.authorized(request):
        return detail_error(401, UNAUTHORIZED)
    bad = next((t for t in body.tokens if not (0 <= t < state.vocab_size)), None)
    if bad is not None:
        return detail_error(400, f"token id {bad} is outside the vocabulary [0, {state.vocab_size})")
    return {"prompt": state.tokenizer.decode(body.tokens)}
