"""Request bodies and their validation, shared by the chat routers.

The pydantic models of nanochat's chat request (POST /chat/completions) and of OpenAI's chat
completions and completions requests (POST /v1/chat/completions, /v1/completions); the abuse limits (nanochat's) and the checks
that enforce them, in nanochat's order; OpenAI messages folded into nanochat's (role, text)
conversation; and the chat prompt rendering. Out-of-range values are rejected, never clamped:
every failed check raises InvalidRequest naming the offending field, which the app renders in
the shape of the API that was called.

Every field is bounded by the schema: its type is strict (no "12" for an int, no 1.5 or 3.0
for a seed) and, where the sampler or the server has a limit, its range is checked. Values a
field's type cannot hold fail schema validation (FastAPI's 422 on nanochat's API, a 400 naming
the field on /v1); values of the right type outside their range fail the checks below (400).
The body itself is bounded by MAX_BODY_BYTES (413) before any of this runs (guard.py).

An OpenAI field the server cannot honour (tools, response_format other than text, logit_bias,
...) and any field OpenAI does not define are refused with a 400 naming them, never ignored
(UNSUPPORTED, docs/decisions.md D15); validate_openai / validate_completion return the checked
sampling parameters as a Sampling.
"""
from dataclasses import dataclass, field
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
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_LENGTH = 256  # characters of one stop string
MAX_N = 16  # choices per chat request; a completions request: prompts x n <= MAX_CHOICES
MAX_CHOICES = 128
MIN_PENALTY, MAX_PENALTY = -2.0, 2.0  # presence_penalty / frequency_penalty (OpenAI's range)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's limit)
MAX_LEGACY_LOGPROBS = 5  # completions' logprobs (OpenAI's limit)

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
    model_config = ConfigDict(extra="allow")  # refused by validate_openai, naming messages[i].<field>
    role: StrictStr
    content: Union[StrictStr, list[dict[str, Any]], None] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # refused by validate_openai (stream_options.<field>)
    include_usage: Optional[StrictBool] = None


Stop = Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP_SEQUENCES)], None]


class OpenAIRequest(BaseModel):
    """The fields chat and (legacy) completions requests share."""
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by check_fields, never ignored
    model: Optional[Annotated[StrictStr, Field(max_length=MAX_MODEL_NAME_LENGTH)]] = None
    temperature: Float = None
    top_p: Float = None
    top_k: Int = None  # extension (nanochat's sampler)
    max_tokens: Int = None
    n: Int = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Stop = None
    seed: Int = None
    presence_penalty: Float = None
    frequency_penalty: Float = None
    user: Optional[Annotated[StrictStr, Field(max_length=MAX_MODEL_NAME_LENGTH)]] = None  # in the log line
    # typed so that a wrong type is a schema error; any non-neutral value is refused (check_fields)
    logit_bias: Optional[dict[StrictStr, Union[StrictFloat, StrictInt]]] = None


class OpenAIChatRequest(OpenAIRequest):
    messages: list[OpenAIMessage]
    max_completion_tokens: Int = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Int = None
    response_format: Optional[dict[str, Any]] = None


class OpenAICompletionRequest(OpenAIRequest):
    # a string, a list of token ids, or a list of either (one choice set per prompt)
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]
    echo: Optional[StrictBool] = False
    logprobs: Int = None  # legacy: the number of alternatives per token (0..MAX_LEGACY_LOGPROBS)
    best_of: Int = None
    suffix: Optional[StrictStr] = None


class InvalidRequest(Exception):
    """A request the server refuses: `message` for the client, `param` the offending field, HTTP
    `status`, OpenAI's error `code` (model_not_found, ...) if any, its `type_` and extra response
    `headers` (Retry-After of a 429)."""

    def __init__(self, message, param=None, status=400, code=None, type_="invalid_request_error", headers=None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.type_, self.headers = type_, headers

# -----------------------------------------------------------------------------
# Validation (checks and messages in nanochat's order)


def validate_conversation(messages, roles=("user", "assistant"), field="messages"):
    """messages: list of (role, content). Raises InvalidRequest naming the offending field."""
    if len(messages) == 0:
        raise InvalidRequest("At least one message is required", field)
    if len(messages) > MAX_MESSAGES_PER_REQUEST:
        raise InvalidRequest(f"Too many messages. Maximum {MAX_MESSAGES_PER_REQUEST} messages allowed per request", field)
    total = 0
    for i, (_role, content) in enumerate(messages):
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


# -----------------------------------------------------------------------------
# OpenAI's fields: what the server cannot honour is refused, naming the field (never ignored)

# Known OpenAI fields the server cannot honour, and why; a neutral value (null, [], {}, false) is
# accepted, since it asks for nothing.
UNSUPPORTED = {
    "tools": "tools and function calling are not supported (the model's only tool is its built-in calculator)",
    "tool_choice": "tools and function calling are not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tools and function calling are not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the model has no reasoning-effort setting",
    "web_search_options": "web search is not supported",
    "store": "stored completions are not supported",
    "metadata": "stored completions (and their metadata) are not supported",
    "verbosity": "the model has no verbosity setting",
    "prompt_cache_key": "prompt caching is not supported",
    "safety_identifier": "not supported; use `user`",
    "suffix": "suffix (insertion) is not supported",
}
NEUTRAL = (None, False, [], {}, "")


def _refuse_extras(model, prefix=""):
    """Every field of `model` the schema does not declare is refused: one OpenAI knows but this
    server cannot honour with the reason, any other as OpenAI words it."""
    for name, value in (model.model_extra or {}).items():
        _refuse_unsupported(prefix + name, name, value)


def _refuse_unsupported(param, name, value):
    if name == "modalities" and value in (None, ["text"]):
        return
    if name == "service_tier" and value in (None, "auto", "default"):
        return
    if name in UNSUPPORTED:
        if value in NEUTRAL:
            return
        raise InvalidRequest(f"{param}: {UNSUPPORTED[name]}; leave it unset", param)
    if name == "modalities":
        raise InvalidRequest(f'{param}: only ["text"] is supported', param)
    if name == "service_tier":
        raise InvalidRequest(f'{param}: only "auto" or "default" is supported', param)
    raise InvalidRequest(f"Unrecognized request argument supplied: {param}", param)


@dataclass
class Sampling:
    """A /v1 request's sampling, checked; None = the server's default (serve config)."""
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: float = 1.0
    n: int = 1
    stop: list = field(default_factory=list)
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None  # None: off; k: the chosen token's logprob and the k most likely

    def seed_for(self, i):
        """Choice i's seed: seed + i, wrapped into [MIN_SEED, MAX_SEED] (None: a random seed each)."""
        if self.seed is None:
            return None
        return (self.seed + i - MIN_SEED) % (MAX_SEED - MIN_SEED + 1) + MIN_SEED


def _stop_list(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for i, s in enumerate(stops):
        param = "stop" if isinstance(stop, str) else f"stop[{i}]"
        if not s:
            raise InvalidRequest("stop sequences must not be empty", param)
        if len(s) > MAX_STOP_LENGTH:
            raise InvalidRequest(f"a stop sequence may be at most {MAX_STOP_LENGTH} characters", param)
        if not _encodable(s):
            raise InvalidRequest("stop sequence is not valid Unicode (it holds a lone UTF-16 surrogate)", param)
    return stops


def _common(body: OpenAIRequest, max_tokens, max_field, max_n, min_max_tokens=MIN_MAX_TOKENS):
    """The checks chat and completions share -> Sampling (its logprobs left to the caller)."""
    if max_tokens is not None and not (min_max_tokens <= max_tokens <= MAX_MAX_TOKENS):
        raise InvalidRequest(f"{max_field} must be between {min_max_tokens} and {MAX_MAX_TOKENS}", max_field)
    validate_sampling(body.temperature, body.top_k, None)
    if body.top_p is not None and not (0 < body.top_p <= 1):
        raise InvalidRequest("top_p must be greater than 0 and at most 1", "top_p")
    if body.n is not None and not (1 <= body.n <= max_n):
        raise InvalidRequest(f"n must be between 1 and {max_n}", "n")
    if body.seed is not None and not (MIN_SEED <= body.seed <= MAX_SEED):
        raise InvalidRequest(f"seed must be an integer between {MIN_SEED} and {MAX_SEED}", "seed")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and not (MIN_PENALTY <= value <= MAX_PENALTY):
            raise InvalidRequest(f"{name} must be between {MIN_PENALTY} and {MAX_PENALTY}", name)
    if body.logit_bias:
        raise InvalidRequest("logit_bias is not supported; leave it unset or empty", "logit_bias")
    if body.stream_options is not None:
        if not body.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
        _refuse_extras(body.stream_options, "stream_options.")
    return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                    top_p=1.0 if body.top_p is None else float(body.top_p), n=body.n or 1, stop=_stop_list(body.stop),
                    seed=body.seed, presence_penalty=float(body.presence_penalty or 0.0),
                    frequency_penalty=float(body.frequency_penalty or 0.0))


def validate_openai(body: OpenAIChatRequest):
    """OpenAI's chat request -> (conversation, Sampling), every field checked: out of range is a
    400 naming the field; so is any field the server cannot honour (tools, response_format other
    than text, logit_bias, ...) and any field OpenAI does not define."""
    _refuse_extras(body)
    for i, m in enumerate(body.messages):
        extras = {k: v for k, v in (m.model_extra or {}).items() if not (k in ("name", "refusal") and v is None)}
        for name in extras:
            what = ("tool calls are not supported" if name in ("tool_calls", "function_call", "tool_call_id")
                    else f"the message field `{name}` is not supported")
            raise InvalidRequest(f"messages[{i}].{name}: {what}", f"messages[{i}].{name}")
    conversation = openai_conversation(body)
    max_tokens, max_field = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise InvalidRequest("max_tokens and max_completion_tokens differ; give one of them (max_tokens is "
                                 "the deprecated name of max_completion_tokens)", "max_tokens")
        max_tokens, max_field = body.max_completion_tokens, "max_completion_tokens"
    sampling = _common(body, max_tokens, max_field, MAX_N)
    if body.top_logprobs is not None:
        if not (0 <= body.top_logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
        if not body.logprobs and body.top_logprobs > 0:
            raise InvalidRequest("top_logprobs needs logprobs set to true", "top_logprobs")
    if body.logprobs:
        sampling.logprobs = body.top_logprobs or 0
    fmt = body.response_format
    if fmt is not None and fmt != {"type": "text"}:
        raise InvalidRequest("response_format: only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
                             "response_format")
    return conversation, sampling


def validate_completion(body: OpenAICompletionRequest, encode, vocab_size, context):
    """OpenAI's (legacy) completions request -> (prompts as token-id lists, Sampling, echo).
    encode: text -> token ids (the prompt's tokenization); token ids must lie in [0, vocab_size)
    and every prompt must leave room in the model's `context`."""
    _refuse_extras(body)
    if body.suffix is not None:
        _refuse_unsupported("suffix", "suffix", body.suffix)
    prompts = body.prompt
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise InvalidRequest("prompt must not be empty", "prompt")
    n = body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise InvalidRequest(f"{len(prompts)} prompts x n={n} choices: at most {MAX_CHOICES} choices per request",
                             "prompt" if n == 1 else "n")
    if body.best_of is not None and body.best_of != n:
        raise InvalidRequest("best_of is not supported; leave it unset or equal to n", "best_of")
    echo = bool(body.echo)
    logprobs = body.logprobs
    if logprobs is not None and not (0 <= logprobs <= MAX_LEGACY_LOGPROBS):
        raise InvalidRequest(f"logprobs must be between 0 and {MAX_LEGACY_LOGPROBS}", "logprobs")
    # max_tokens 0 only scores the prompt: it needs echo and logprobs (else there is nothing to return)
    score_only = echo and logprobs is not None
    sampling = _common(body, body.max_tokens, "max_tokens", MAX_N, min_max_tokens=0 if score_only else 1)
    if body.max_tokens == 0 and not score_only:
        raise InvalidRequest("max_tokens may be 0 only with echo and logprobs (scoring the prompt)", "max_tokens")
    sampling.logprobs = logprobs
    out = []
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise InvalidRequest("prompt must not be empty", param)
            if len(p) > MAX_TOTAL_CONVERSATION_LENGTH:
                raise InvalidRequest(f"prompt is too long: at most {MAX_TOTAL_CONVERSATION_LENGTH} characters", param)
            if not _encodable(p):
                raise InvalidRequest("prompt is not valid Unicode (it holds a lone UTF-16 surrogate)", param)
            ids = encode(p)
        else:
            if not p:
                raise InvalidRequest("prompt must not be empty", param)
            bad = next((t for t in p if not (0 <= t < vocab_size)), None)
            if bad is not None:
                raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param)
            ids = list(p)
        if len(ids) >= context:
            raise InvalidRequest(f"the prompt is {len(ids)} tokens; the model's context is {context} tokens", param)
        out.append(ids)
    return out, sampling, echo


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
