"""The UI's /chat/completions holds a conversation (rolling context); the OpenAI route keeps OpenAI's
semantics; both render the calculator tool's call readably. Over a real uvicorn on 127.0.0.1."""
import json

import httpx
import pytest
from helpers import make_cfg
from script_double import ScriptModel
from serve_doubles import ASSISTANT_END, OUTPUT_END, PYTHON_END, PYTHON_START, ChatByteTokenizer

from nanopipe.serving.app import create_app, run_in_thread

CONTEXT = 128  # a quarter, 32 tokens, is kept for the reply


@pytest.fixture(scope="module")
def url():
    tok = ChatByteTokenizer()
    # "ok 🧮 `6*7` → 42!" : the engine forces <|output_start|> 4 2 <|output_end|> after the call
    reply = tok.encode("ok ") + [PYTHON_START] + tok.encode("6*7") + [PYTHON_END] + [OUTPUT_END] * 4 + tok.encode("!") \
        + [ASSISTANT_END]
    cfg = make_cfg("experiment=smoke", "serve.max_batch=2", "serve.max_tokens=512").serve
    server, thread, port = run_in_thread(create_app(ScriptModel(reply, CONTEXT), tok, cfg))
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def events(url, messages, **params):
    with httpx.stream("POST", f"{url}/chat/completions", json={"messages": messages, **params}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def conversation(turns, reply="ok 🧮 `6*7` → 42!"):
    out = []
    for i in range(turns):
        out += [{"role": "user", "content": f"question number {i}, please"}, {"role": "assistant", "content": reply}]
    return out + [{"role": "user", "content": "and now?"}]


def test_short_conversation_streams_without_a_notice_and_renders_the_tool_call(url):
    ev = events(url, conversation(0))
    assert "notice" not in ev[0] and ev[-1] == {"done": True}
    assert "".join(e["token"] for e in ev[:-1]) == "ok 🧮 `6*7` → 42!"


def test_long_conversation_drops_the_oldest_exchanges_and_says_so(url):
    messages = conversation(6)  # ~6 x 47 tokens: far more than 128
    ev = events(url, messages)
    dropped = ev[0]["dropped"]
    assert ev[0] == {"notice": f"{dropped} earlier messages no longer fit the model's {CONTEXT}-token context and "
                               "were dropped", "dropped": dropped}
    assert dropped % 2 == 0 and 0 < dropped < len(messages)
    # kept: as many of the newest exchanges as fit with 32 tokens for the reply
    assert "".join(e["token"] for e in ev[1:-1]) == "ok 🧮 `6*7` → 42!" and ev[-1] == {"done": True}


def test_only_a_message_that_alone_does_not_fit_is_refused(url):
    r = httpx.post(f"{url}/chat/completions", json={"messages": [{"role": "user", "content": "x" * 100}]})
    assert r.status_code == 400
    assert r.json() == {"detail": "The message is 102 tokens; with 32 tokens kept for the reply it does not fit the "
                                  "model's context (128 tokens). Shorten it"}


def test_openai_route_keeps_refusing_over_long_input_and_renders_tool_calls(url):
    body = {"messages": conversation(6)}
    r = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # streamed content goes through text_events, which renders the call
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": conversation(0), "stream": True}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ok 🧮 `6*7` → 42!"
