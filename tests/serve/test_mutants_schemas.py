"""Request validation pinned to its definition (serving/schemas.py, docs/testing.md): each limit at
its boundary, the exact message and `param` of every refusal (the text the client sees in OpenAI's
error body), the order of the checks, and the folding of system text into the first user message."""
import pytest

from nanopipe.serving.schemas import (
    ChatRequest,
    InvalidRequest,
    OpenAIChatRequest,
    OpenAICompletionRequest,
    Sampling,
    _encodable,
    _message_text,
    openai_conversation,
    render_prompt,
    validate_chat,
    validate_completion,
    validate_conversation,
    validate_openai,
    validate_sampling,
)


def _err(fn, *args, **kw):
    with pytest.raises(InvalidRequest) as e:
        fn(*args, **kw)
    return e.value


def _openai(**kw):
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return OpenAIChatRequest(**kw)


# InvalidRequest

def test_invalid_request_defaults_and_fields():
    e = InvalidRequest("m")
    assert (e.message, e.param, e.status, e.code, str(e)) == ("m", None, 400, None, "m")
    assert (e.type_, e.headers) == ("invalid_request_error", None)
    e = InvalidRequest("m", "p", 404, "model_not_found")
    assert (e.message, e.param, e.status, e.code) == ("m", "p", 404, "model_not_found")


# validate_conversation

def test_empty_conversation():
    e = _err(validate_conversation, [])
    assert (e.message, e.param, e.status) == ("At least one message is required", "messages", 400)
    assert _err(validate_conversation, [], field="msgs").param == "msgs"


def test_message_count_limit():
    validate_conversation([("user", "a")] * 500)
    e = _err(validate_conversation, [("user", "a")] * 501)
    assert (e.message, e.param) == ("Too many messages. Maximum 500 messages allowed per request", "messages")


def test_empty_content():
    e = _err(validate_conversation, [("user", "a"), ("assistant", "")])
    assert (e.message, e.param) == ("Message 1 has empty content", "messages[1].content")
    assert _err(validate_conversation, [("user", "")], field="f").param == "f[0].content"


def test_message_length_limit():
    validate_conversation([("user", "x" * 8000)])
    e = _err(validate_conversation, [("user", "a"), ("user", "x" * 8001)])
    assert (e.message, e.param) == ("Message 1 is too long. Maximum 8000 characters allowed per message",
                                    "messages[1].content")
    assert _err(validate_conversation, [("user", "x" * 8001)], field="f").param == "f[0].content"


def test_lone_surrogate():
    assert _encodable("héllo ☃") is True
    assert _encodable("a\ud800b") is False
    e = _err(validate_conversation, [("user", "ok"), ("user", "a\ud800")])
    assert (e.message, e.param) == ("Message 1 is not valid Unicode (it holds a lone UTF-16 surrogate)",
                                    "messages[1].content")
    assert _err(validate_conversation, [("user", "\udfff")], field="f").param == "f[0].content"


def test_total_length_limit():
    validate_conversation([("user", "x" * 8000)] * 4)  # exactly 32000
    e = _err(validate_conversation, [("user", "x" * 8000)] * 4 + [("user", "y")])
    assert (e.message, e.param) == ("Total conversation is too long. Maximum 32000 characters allowed", "messages")
    assert _err(validate_conversation, [("user", "x" * 8000)] * 4 + [("user", "y")], field="f").param == "f"


def test_roles():
    validate_conversation([("user", "a"), ("assistant", "b")])
    e = _err(validate_conversation, [("user", "a"), ("system", "b")])
    assert (e.message, e.param) == ("Message 1 has invalid role. Must be one of 'user', 'assistant'",
                                    "messages[1].role")
    e = _err(validate_conversation, [("bot", "a")], roles=("a", "b", "c"), field="f")
    assert (e.message, e.param) == ("Message 0 has invalid role. Must be one of 'a', 'b', 'c'", "f[0].role")


def test_order_length_checks_before_roles():
    # every content is checked before any role; the total before the roles
    e = _err(validate_conversation, [("bot", "a"), ("user", "")])
    assert e.message == "Message 1 has empty content"
    e = _err(validate_conversation, [("bot", "x" * 8000)] * 4 + [("user", "y")])
    assert e.message.startswith("Total conversation is too long")


# validate_sampling

@pytest.mark.parametrize("t", [0.0, 0, 1.0, 2.0, 2])
def test_temperature_in_range(t):
    validate_sampling(t, None, None)


@pytest.mark.parametrize("t", [-0.001, 2.001, float("nan"), float("inf")])
def test_temperature_out_of_range(t):
    e = _err(validate_sampling, t, None, None)
    assert (e.message, e.param) == ("Temperature must be between 0.0 and 2.0", "temperature")


def test_top_k_range():
    for k in (0, 200):
        validate_sampling(None, k, None)
    for k in (-1, 201):
        e = _err(validate_sampling, None, k, None)
        assert (e.message, e.param) == ("top_k must be between 0 and 200", "top_k")


def test_max_tokens_range():
    for m in (1, 4096):
        validate_sampling(None, None, m)
    for m in (0, 4097):
        e = _err(validate_sampling, None, None, m)
        assert (e.message, e.param) == ("max_tokens must be between 1 and 4096", "max_tokens")
    e = _err(validate_sampling, None, None, 0, "max_completion_tokens")
    assert (e.message, e.param) == ("max_completion_tokens must be between 1 and 4096", "max_completion_tokens")


def test_sampling_none_is_default():
    validate_sampling(None, None, None)


def test_sampling_order():
    assert _err(validate_sampling, 3.0, 999, 0).param == "temperature"
    assert _err(validate_sampling, 1.0, 999, 0).param == "top_k"


# validate_chat

def test_validate_chat():
    body = ChatRequest(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                       temperature=0.5, top_k=3, max_tokens=7)
    assert validate_chat(body) == [("user", "a"), ("assistant", "b")]
    body = ChatRequest(messages=[{"role": "system", "content": "a"}])
    assert _err(validate_chat, body).param == "messages[0].role"
    body = ChatRequest(messages=[{"role": "user", "content": "a"}], temperature=5)
    assert _err(validate_chat, body).param == "temperature"
    assert _err(validate_chat, ChatRequest(messages=[{"role": "user", "content": "a"}], top_k=-1)).param == "top_k"
    e = _err(validate_chat, ChatRequest(messages=[{"role": "user", "content": "a"}], max_tokens=0))
    assert e.param == "max_tokens"


# _message_text / openai_conversation

def test_message_text():
    assert _message_text(0, "abc") == "abc"
    assert _message_text(0, None) == ""
    assert _message_text(0, []) == ""
    assert _message_text(0, [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    e = _err(_message_text, 2, [{"type": "text", "text": "a"}, {"type": "image_url", "text": "x"}])
    assert (e.message, e.param) == ("Message 2 content part 1: only text parts are supported",
                                    "messages[2].content[1]")
    e = _err(_message_text, 0, [{"type": "text", "text": 5}])
    assert (e.message, e.param) == ("Message 0 content part 0: only text parts are supported",
                                    "messages[0].content[0]")
    assert _err(_message_text, 0, [{"text": "a"}]).param == "messages[0].content[0]"
    assert _err(_message_text, 0, [{"type": "text"}]).param == "messages[0].content[0]"


def _conv(*msgs):
    return openai_conversation(_openai(messages=[{"role": r, "content": c} for r, c in msgs]))


def test_openai_conversation_folding():
    assert _conv(("user", "u")) == [("user", "u")]
    assert _conv(("system", "s"), ("user", "u"), ("assistant", "a")) == [("user", "s\n\nu"), ("assistant", "a")]
    assert _conv(("developer", "d"), ("system", "s"), ("assistant", "a"), ("user", "u"), ("user", "v")) == \
        [("assistant", "a"), ("user", "d\n\ns\n\nu"), ("user", "v")]
    assert _conv(("assistant", "a"), ("system", "s")) == [("user", "s"), ("assistant", "a")]
    assert _conv(("system", "s")) == [("user", "s")]


def test_openai_conversation_validation():
    e = _err(_conv, ("tool", "x"))
    assert (e.message, e.param) == (
        "Message 0 has invalid role. Must be one of 'system', 'developer', 'user', 'assistant'", "messages[0].role")
    e = _err(openai_conversation, _openai(messages=[{"role": "user"}]))
    assert (e.message, e.param) == ("Message 0 has empty content", "messages[0].content")
    e = _err(openai_conversation, _openai(messages=[{"role": "user", "content": [{"type": "image_url"}]}]))
    assert e.param == "messages[0].content[0]"


# validate_openai

def test_validate_openai_defaults():
    conversation, sampling = validate_openai(_openai())
    assert conversation == [("user", "hi")] and sampling == Sampling()
    assert (sampling.top_p, sampling.n, sampling.stop, sampling.logprobs) == (1.0, 1, [], None)
    neutral = _openai(n=1, top_p=1, stop=[], logit_bias={}, presence_penalty=0, frequency_penalty=0.0,
                      logprobs=False, top_logprobs=0, seed=5, tools=[], response_format={"type": "text"}, user="u")
    assert validate_openai(neutral) == ([("user", "hi")], Sampling(seed=5))


def test_validate_openai_sampling_fields():
    _, s = validate_openai(_openai(n=3, top_p=0.5, stop="x", presence_penalty=-2, frequency_penalty=2, seed=-1,
                                   temperature=0.3, top_k=7, logprobs=True, top_logprobs=20))
    assert s == Sampling(max_tokens=None, temperature=0.3, top_k=7, top_p=0.5, n=3, stop=["x"], seed=-1,
                         presence_penalty=-2.0, frequency_penalty=2.0, logprobs=20)
    assert validate_openai(_openai(logprobs=True))[1].logprobs == 0
    assert validate_openai(_openai(stop=["a", "b"]))[1].stop == ["a", "b"]
    assert validate_openai(_openai(n=16))[1].n == 16 and validate_openai(_openai(top_p=1e-9))[1].top_p == 1e-9


def test_seed_for_choice_i_wraps_in_range():
    assert [Sampling(seed=7).seed_for(i) for i in range(3)] == [7, 8, 9]
    assert Sampling(seed=2**63 - 1).seed_for(1) == -2**63 and Sampling(seed=-1).seed_for(1) == 0
    assert Sampling().seed_for(4) is None


def test_validate_openai_max_tokens():
    assert validate_openai(_openai(max_tokens=9))[1].max_tokens == 9
    assert validate_openai(_openai(max_tokens=11, max_completion_tokens=11))[1].max_tokens == 11
    assert validate_openai(_openai(max_completion_tokens=4096))[1].max_tokens == 4096
    e = _err(validate_openai, _openai(max_tokens=9, max_completion_tokens=11))
    assert (e.message, e.param) == ("max_tokens and max_completion_tokens differ; give one of them (max_tokens is "
                                    "the deprecated name of max_completion_tokens)", "max_tokens")
    e = _err(validate_openai, _openai(max_completion_tokens=0))
    assert (e.message, e.param) == ("max_completion_tokens must be between 1 and 4096", "max_completion_tokens")
    e = _err(validate_openai, _openai(max_tokens=0))
    assert (e.message, e.param) == ("max_tokens must be between 1 and 4096", "max_tokens")
    assert _err(validate_openai, _openai(temperature=-1)).param == "temperature"
    assert _err(validate_openai, _openai(top_k=201)).param == "top_k"


def test_validate_openai_seed():
    for s in (-2**63, 0, 2**63 - 1):
        validate_openai(_openai(seed=s))
    for s in (-2**63 - 1, 2**63):
        e = _err(validate_openai, _openai(seed=s))
        assert (e.message, e.param) == (
            "seed must be an integer between -9223372036854775808 and 9223372036854775807", "seed")


@pytest.mark.parametrize("kw, message, param", [
    ({"n": 17}, "n must be between 1 and 16", "n"),
    ({"n": 0}, "n must be between 1 and 16", "n"),
    ({"top_p": 1.01}, "top_p must be greater than 0 and at most 1", "top_p"),
    ({"top_p": 0}, "top_p must be greater than 0 and at most 1", "top_p"),
    ({"stop": ""}, "stop sequences must not be empty", "stop"),
    ({"stop": ["x", ""]}, "stop sequences must not be empty", "stop[1]"),
    ({"stop": "x" * 257}, "a stop sequence may be at most 256 characters", "stop"),
    ({"stop": ["\ud800"]}, "stop sequence is not valid Unicode (it holds a lone UTF-16 surrogate)", "stop[0]"),
    ({"logit_bias": {"1": 2}}, "logit_bias is not supported; leave it unset or empty", "logit_bias"),
    ({"presence_penalty": 2.01}, "presence_penalty must be between -2.0 and 2.0", "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty must be between -2.0 and 2.0", "frequency_penalty"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs must be between 0 and 20", "top_logprobs"),
    ({"top_logprobs": -1}, "top_logprobs must be between 0 and 20", "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs set to true", "top_logprobs"),
    ({"response_format": {"type": "json_object"}},
     'response_format: only {"type": "text"} is supported (no JSON mode or schemas)', "response_format"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true",
     "stream_options"),
    ({"stream": True, "stream_options": {"x": 1}}, "Unrecognized request argument supplied: stream_options.x",
     "stream_options.x"),
    ({"tools": [{"type": "function"}]}, "tools: tools and function calling are not supported (the model's only tool "
     "is its built-in calculator); leave it unset", "tools"),
    ({"store": True}, "store: stored completions are not supported; leave it unset", "store"),
    ({"modalities": ["audio"]}, 'modalities: only ["text"] is supported', "modalities"),
    ({"service_tier": "flex"}, 'service_tier: only "auto" or "default" is supported', "service_tier"),
    ({"whatever": 1}, "Unrecognized request argument supplied: whatever", "whatever"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]},
     "messages[0].tool_call_id: tool calls are not supported", "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]},
     "messages[0].name: the message field `name` is not supported", "messages[0].name"),
])
def test_validate_openai_refusals(kw, message, param):
    e = _err(validate_openai, _openai(**kw))
    assert (e.message, e.param, e.status, e.code) == (message, param, 400, None)


def test_validate_openai_order():
    every = dict(whatever=1, max_tokens=1, max_completion_tokens=2, temperature=9, top_p=2, n=0, seed=2**63,
                 presence_penalty=3, frequency_penalty=3, logit_bias={"1": 1}, stream_options={}, top_logprobs=99,
                 response_format={"type": "json_object"})
    order = ["whatever", "max_tokens", "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty",
             "logit_bias", "stream_options", "top_logprobs", "response_format"]
    assert _err(validate_openai, _openai(messages=[{"role": "user", "content": "x", "tool_calls": []}],
                                         **{k: v for k, v in every.items() if k != "whatever"})).param == \
        "messages[0].tool_calls"
    assert _err(validate_openai, _openai(messages=[], **{k: v for k, v in every.items() if k != "whatever"})).param == \
        "messages"
    for name in order:
        assert _err(validate_openai, _openai(**every)).param == name
        del every[name]
        if name == "max_tokens":
            del every["max_completion_tokens"]
    validate_openai(_openai(**every))


# validate_completion

def _completion(**kw):
    return OpenAICompletionRequest(**kw)


def _validate_completion(body, vocab=300, context=64):
    return validate_completion(body, lambda text: [1] + [ord(c) for c in text], vocab, context)


def test_validate_completion_prompt_shapes():
    assert _validate_completion(_completion(prompt="ab"))[0] == [[1, 97, 98]]
    assert _validate_completion(_completion(prompt=[5, 6]))[0] == [[5, 6]]
    assert _validate_completion(_completion(prompt=["a", "b"]))[0] == [[1, 97], [1, 98]]
    assert _validate_completion(_completion(prompt=[[5], [6, 7]]))[0] == [[5], [6, 7]]
    assert _validate_completion(_completion(prompt=[299]))[0] == [[299]]
    assert _validate_completion(_completion(prompt=[0] * 63))[0] == [[0] * 63]
    prompts, sampling, echo = _validate_completion(_completion(prompt="a", echo=True, logprobs=5, max_tokens=0))
    assert (sampling.logprobs, sampling.max_tokens, echo) == (5, 0, True)


@pytest.mark.parametrize("kw, message, param", [
    ({"prompt": ""}, "prompt must not be empty", "prompt"),
    ({"prompt": []}, "prompt must not be empty", "prompt"),
    ({"prompt": ["a", ""]}, "prompt must not be empty", "prompt[1]"),
    ({"prompt": [300]}, "token id 300 is outside the vocabulary [0, 300)", "prompt"),
    ({"prompt": [[1], [-1]]}, "token id -1 is outside the vocabulary [0, 300)", "prompt[1]"),
    ({"prompt": [0] * 64}, "the prompt is 64 tokens; the model's context is 64 tokens", "prompt"),
    ({"prompt": "x" * 32001}, "prompt is too long: at most 32000 characters", "prompt"),
    ({"prompt": "\ud800"}, "prompt is not valid Unicode (it holds a lone UTF-16 surrogate)", "prompt"),
    ({"prompt": [[1]] * 129}, "129 prompts x n=1 choices: at most 128 choices per request", "prompt"),
    ({"prompt": [[1]] * 9, "n": 15}, "9 prompts x n=15 choices: at most 128 choices per request", "n"),
    ({"prompt": "a", "best_of": 2}, "best_of is not supported; leave it unset or equal to n", "best_of"),
    ({"prompt": "a", "logprobs": 6}, "logprobs must be between 0 and 5", "logprobs"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens must be between 1 and 4096", "max_tokens"),
    ({"prompt": "a", "max_tokens": 0, "echo": True}, "max_tokens must be between 1 and 4096", "max_tokens"),
    ({"prompt": "a", "max_tokens": -1, "echo": True, "logprobs": 0}, "max_tokens must be between 0 and 4096",
     "max_tokens"),
    ({"prompt": "a", "suffix": "b"}, "suffix: suffix (insertion) is not supported; leave it unset", "suffix"),
    ({"prompt": "a", "n": 17}, "n must be between 1 and 16", "n"),
    ({"prompt": "a", "foo": 1}, "Unrecognized request argument supplied: foo", "foo"),
])
def test_validate_completion_refusals(kw, message, param):
    e = _err(_validate_completion, _completion(**kw))
    assert (e.message, e.param, e.status) == (message, param, 400)


# render_prompt

class _Tok:
    SPECIAL = {"<|user_start|>": 101, "<|user_end|>": 102, "<|assistant_start|>": 103, "<|assistant_end|>": 104}

    def encode_special(self, s):
        return self.SPECIAL[s]

    def get_bos_token_id(self):
        return 100

    def encode(self, text):
        return [ord(c) for c in text]


def test_render_prompt():
    ids = render_prompt(_Tok(), [("user", "ab"), ("assistant", "c"), ("user", "d")])
    assert ids == [100, 101, 97, 98, 102, 103, 99, 104, 101, 100, 102, 103]
    assert render_prompt(_Tok(), []) == [100, 103]


# Accepted at the edge: the neutral values of the fields the server refuses otherwise, and each limit
# at its boundary (the refusals above pin the side just past it)

@pytest.mark.parametrize("kw", [
    {"modalities": None}, {"modalities": ["text"]},
    {"service_tier": None}, {"service_tier": "auto"}, {"service_tier": "default"},
])
def test_validate_openai_accepts_neutral_modalities_and_service_tier(kw):
    assert validate_openai(_openai(**kw)) == ([("user", "hi")], Sampling())


@pytest.mark.parametrize("kw, message, param", [
    # only these two names have neutral values beyond NEUTRAL's: an unknown field is refused even if null
    ({"whatever": None}, "Unrecognized request argument supplied: whatever", "whatever"),
    ({"whatever": "auto"}, "Unrecognized request argument supplied: whatever", "whatever"),
    ({"whatever": ["text"]}, "Unrecognized request argument supplied: whatever", "whatever"),
    ({"modalities": ["TEXT"]}, 'modalities: only ["text"] is supported', "modalities"),
    ({"service_tier": "AUTO"}, 'service_tier: only "auto" or "default" is supported', "service_tier"),
])
def test_validate_openai_neutral_values_are_exact(kw, message, param):
    e = _err(validate_openai, _openai(**kw))
    assert (e.message, e.param, e.status) == (message, param, 400)


def test_validate_openai_message_name_and_refusal_may_be_null():
    # OpenAI's SDKs send `name: null` / `refusal: null` (an assistant message echoed back): they ask for nothing
    messages = [{"role": "user", "content": "a", "name": None},
                {"role": "assistant", "content": "b", "refusal": None, "name": None},
                {"role": "user", "content": "c", "refusal": None}]
    assert validate_openai(_openai(messages=messages))[0] == [("user", "a"), ("assistant", "b"), ("user", "c")]
    e = _err(validate_openai, _openai(messages=[{"role": "assistant", "content": "b", "refusal": "no"}]))
    assert (e.message, e.param) == ("messages[0].refusal: the message field `refusal` is not supported",
                                    "messages[0].refusal")
    e = _err(validate_openai, _openai(messages=[{"role": "user", "content": "b", "audio": None}]))
    assert (e.message, e.param) == ("messages[0].audio: the message field `audio` is not supported",
                                    "messages[0].audio")


def test_stop_sequence_length_limit_is_inclusive():
    assert validate_openai(_openai(stop="x" * 256))[1].stop == ["x" * 256]
    assert validate_openai(_openai(stop=["a", "y" * 256]))[1].stop == ["a", "y" * 256]
    e = _err(validate_openai, _openai(stop=["a", "y" * 257]))
    assert (e.message, e.param) == ("a stop sequence may be at most 256 characters", "stop[1]")


def test_validate_completion_choice_limit_is_inclusive():
    assert len(_validate_completion(_completion(prompt=[[1]] * 128))[0]) == 128
    prompts, sampling, _ = _validate_completion(_completion(prompt=[[1]] * 8, n=16))
    assert (len(prompts), sampling.n) == (8, 16)


def test_validate_completion_prompt_length_limit_is_inclusive():
    prompts, _, _ = _validate_completion(_completion(prompt="x" * 32000), context=32002)
    assert len(prompts[0]) == 32001  # the test encoder's leading 1, then one id per character


def test_validate_completion_max_tokens_one_needs_no_echo():
    # 0 is the only value that needs echo and logprobs; 1 is the smallest ordinary one
    for kw in ({}, {"echo": True}, {"logprobs": 2}):
        assert _validate_completion(_completion(prompt="a", max_tokens=1, **kw))[1].max_tokens == 1


@pytest.mark.parametrize("prompt, param", [([[]], "prompt"), ([[5], []], "prompt[1]")])
def test_validate_completion_empty_token_list(prompt, param):
    e = _err(_validate_completion, _completion(prompt=prompt))
    assert (e.message, e.param, e.status) == ("prompt must not be empty", param, 400)
