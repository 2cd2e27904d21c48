"""Request bodies and their validation, shared by the chat routers.

The pydantic models of nanochat's chat request (POST /chat/completions) and of OpenAI's chat
completions request (POST /v1/chat/completions); the abuse limits (nanochat's) and the checks
that enforce them, in nanochat's order; OpenAI messages folded into nanochat's (role, text)
conversation; and the chat prompt rendering. Out-of-range values are rejected, never clamped:
every failed check raises InvalidRequest naming the offending field, which the app renders in
the shape of the API that was called.

Every field is bounded by the schema: its type is strict (no "12" for an int, no 1.5 or 3.0
for a seed) and, where the sampler or the server has a limit, its range is checked. Values a
field's type cannot hold fail schema validation (FastAPI's 422 on nanochat's API, a 400 naming
the field on /v1); values of the right type outside their range fail the checks below (400).
The body itself is bounded by MAX_BODY_BYTES (413) before any of this runs (guard.py).
"""
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# Abuse limits (nanochat's); violations are rejected, not clamped.
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000
MAX_TOTAL_CONVERSATION_LENGTH = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 = full vocabulary
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
# The sampling seed: a signed 64-bit integer, as vllm's OpenAI server takes it. torch's
# Generator.manual_seed accepts [-2**63, 2**64 - 1] (a negative seed s is the same as 2**64 + s)
# and raises "Overflow when unpacking long long" outside it; this range is a subset on which the
# mapping to torch's seeds is one-to-one.
MIN_SEED, MAX_SEED = -2**63, 2**63 - 1
# A whole request body: the conversation limits above need at most ~0.4 MB of JSON
# (32000 characters at 12 bytes each when \u-escaped, plus framing); anything larger is a 413.
MAX_BODY_BYTES = 1 << 20
MAX_MODEL_NAME_LENGTH = 256
MAX_STOP_SEQUENCES = 4  # OpenAI's limit; stop sequences are refused anyway (see validate_openai)

Int = Optional[StrictInt]
Float = Optional[Union[StrictFloat, StrictInt]]  # a JSON number; NaN/inf fail the range checks

# -----------------------------------------------------------------------------
# Request schemas


class ChatMessage(BaseModel):
    role: StrictStr
    content: StrictStr


class ChatRequest(BaseModel):
    messages: list[ChatMessage]
    temperature: Float = None
    max_tokens: Int = None
    top_k: Int = None


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, ...: ignored
    role: StrictStr
    content: Union[StrictStr, list[dict[str, Any]], None] = None
    name: Optional[StrictStr] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Optional[StrictBool] = None


class OpenAIChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # user, metadata, ... are accepted and ignored
    model: Optional[Annotated[StrictStr, Field(max_length=MAX_MODEL_NAME_LENGTH)]] = None
    messages: list[OpenAIMessage]
    temperature: Float = None
    top_p: Float = None
    top_k: Int = None  # extension (nanochat's sampler)
    max_tokens: Int = None
    max_completion_tokens: Int = None
    n: Int = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP_SEQUENCES)], None] = None
    seed: Int = None
    # OpenAI's fields nanochat's sampler cannot honour: typed and range-checked, refused unless neutral
    logit_bias: Optional[dict[StrictStr, Union[StrictFloat, StrictInt]]] = None
    presence_penalty: Float = None
    frequency_penalty: Float = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Int = None


class InvalidRequest(Exception):
    """A request the server refuses: `message` for the client, `param` the offending field, HTTP
    `status`, OpenAI's error `code` (model_not_found, ...) if any."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

# -----------------------------------------------------------------------------
# Validation (checks and messages in nanochat's order)


def validate_conversation(messages, roles=("user", "assistant"), field="messages"):
    """messages: list of (role, content). Raises InvalidRequest naming the offending field."""
    if len(messages) == 0:
        raise InvalidRequest("At least one message is required", field)
    if len(messages) > MAX_MESSAGES_PER_REQUEST:
        raise InvalidRequest(f"Too many messages. Maximum {MAX_MESSAGES_PER_REQUEST} messages allowed per request", field)
    total = 0
    for i, (role, content) in enumerate(messages):
        if not content:
            raise InvalidRequest(f"Message {i} has empty content", f"{field}[{i}].content")
        if len(content) > MAX_MESSAGE_LENGTH:
            raise InvalidRequest(f"Message {i} is too long. Maximum {MAX_MESSAGE_LENGTH} characters allowed per message",
                                 f"{field}[{i}].content")
        if not _encodable(content):  # JSON's "\ud800" escapes a lone surrogate, which no tokenizer can encode
            raise InvalidRequest(f"Message {i} is not valid Unicode (it holds a lone UTF-16 surrogate)",
                                 f"{field}[{i}].content")
        total += len(content)
    if total > MAX_TOTAL_CONVERSATION_LENGTH:
        raise InvalidRequest(f"Total conversation is too long. Maximum {MAX_TOTAL_CONVERSATION_LENGTH} characters allowed", field)
    for i, (role, _) in enumerate(messages):
        if role not in roles:
            allowed = ", ".join(f"'{r}'" for r in roles)
            raise InvalidRequest(f"Message {i} has invalid role. Must be one of {allowed}", f"{field}[{i}].role")


def _encodable(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def validate_sampling(temperature, top_k, max_tokens, max_tokens_field="max_tokens"):
    """Range checks of the sampling parameters a request may set (None: the server's default)."""
    if temperature is not None and not (MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise InvalidRequest(f"Temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}", "temperature")
    if top_k is not None and not (MIN_TOP_K <= top_k <= MAX_TOP_K):
        raise InvalidRequest(f"top_k must be between {MIN_TOP_K} and {MAX_TOP_K}", "top_k")
    if max_tokens is not None and not (MIN_MAX_TOKENS <= max_tokens <= MAX_MAX_TOKENS):
        raise InvalidRequest(f"{max_tokens_field} must be between {MIN_MAX_TOKENS} and {MAX_MAX_TOKENS}", max_tokens_field)


def validate_chat(body: ChatRequest):
    """nanochat's request -> its [(role, text)] conversation, every field checked."""
    conversation = [(m.role, m.content) for m in body.messages]
    validate_conversation(conversation)
    validate_sampling(body.temperature, body.top_k, body.max_tokens)
    return conversation


def _message_text(i, content):
    """An OpenAI message's content (a string, None or a list of text parts) as one string."""
    if not isinstance(content, list):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"Message {i} content part {j}: only text parts are supported",
                                 f"messages[{i}].content[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def openai_conversation(req: OpenAIChatRequest):
    """OpenAI messages -> [(role, text)] with system/developer text folded into the first user
    message (as nanochat's conversation rendering does). Content may be a list of text parts."""
    messages = [(m.role, _message_text(i, m.content)) for i, m in enumerate(req.messages)]
    validate_conversation(messages, roles=("system", "developer", "user", "assistant"))
    system = "\n\n".join(text for role, text in messages if role in ("system", "developer"))
    out = [(role, text) for role, text in messages if role in ("user", "assistant")]
    if system:
        first_user = next((i for i, (role, _) in enumerate(out) if role == "user"), None)
        if first_user is None:
            out.insert(0, ("user", system))
        else:
            out[first_user] = ("user", system + "\n\n" + out[first_user][1])
    return out


def validate_openai(body: OpenAIChatRequest):
    """OpenAI's request -> (conversation, max_tokens or None), every field checked; rejects what
    nanochat's sampler cannot do (n > 1, nucleus sampling, stop sequences, logit bias,
    penalties, logprobs) and seeds outside [MIN_SEED, MAX_SEED]."""
    conversation = openai_conversation(body)
    if body.max_completion_tokens is not None:
        max_tokens, max_field = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, max_field = body.max_tokens, "max_tokens"
    validate_sampling(body.temperature, body.top_k, max_tokens, max_field)
    if body.seed is not None and not (MIN_SEED <= body.seed <= MAX_SEED):
        raise InvalidRequest(f"seed must be an integer between {MIN_SEED} and {MAX_SEED}", "seed")
    if body.n not in (None, 1):
        raise InvalidRequest("n must be 1 (one choice per request)", "n")
    if body.top_p is not None and body.top_p != 1:
        raise InvalidRequest("top_p is not supported (use top_k); leave it unset or 1", "top_p")
    if body.stop:
        raise InvalidRequest("stop sequences are not supported; the model stops at <|assistant_end|>", "stop")
    if body.logit_bias:
        raise InvalidRequest("logit_bias is not supported; leave it unset or empty", "logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and value != 0:
            raise InvalidRequest(f"{name} is not supported; leave it unset or 0", name)
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported; leave logprobs unset or false", "logprobs")
    if body.top_logprobs:
        raise InvalidRequest("logprobs are not supported; leave top_logprobs unset or 0", "top_logprobs")
    return conversation, max_tokens


def render_prompt(tokenizer, conversation):
    """bos, then <|user_start|>text<|user_end|> / <|assistant_start|>text<|assistant_end|>, then <|assistant_start|>."""
    special = tokenizer.encode_special
    ids = [tokenizer.get_bos_token_id()]
    for role, content in conversation:
        if role == "user":
            ids += [special("<|user_start|>")] + tokenizer.encode(content) + [special("<|user_end|>")]
        else:
            ids += [special("<|assistant_start|>")] + tokenizer.encode(content) + [special("<|assistant_end|>")]
    ids.append(special("<|assistant_start|>"))
    return ids
