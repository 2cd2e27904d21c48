"""The OpenAI API as clients use it, over a real uvicorn on 127.0.0.1: chat completions with n,
stop, top_p, penalties, seed and logprobs; /v1/completions with echo and logprobs (what
lm-evaluation-harness sends); every field the server cannot honour refused by name; the
tokenizer endpoints; /metrics; /docs offline. Logprobs and generations are checked against the
model computed directly."""
import json
import re

import httpx
import pytest
import torch
from helpers import make_cfg, require_module
from serve_doubles import ASSISTANT_END, BOS, ChatByteTokenizer, scripted_reply_model, suppress_terminators, tiny_gpt

from nanopipe.serving.app import create_app, render_prompt, run_in_thread
from nanopipe.serving.choices import Choice, StopText

REPLY = "Hi é€😀!"
TOK = ChatByteTokenizer()


def serve_cfg(**overrides):
    return make_cfg("experiment=smoke", *(f"serve.{k}={v}" for k, v in overrides.items())).serve


@pytest.fixture(scope="module")
def gpt_model():
    # the tiny real GPT of test_app (512-token context; its greedy stream never picks a terminator)
    return suppress_terminators(tiny_gpt(sequence_len=512, seed=5), [ASSISTANT_END, BOS])


def _serve(app):
    server, thread, port = run_in_thread(app)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def real(gpt_model):
    server, thread, url = _serve(create_app(gpt_model, TOK, serve_cfg(max_batch=16, temperature=0.0)))
    yield url
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def scripted():
    server, thread, url = _serve(create_app(scripted_reply_model(REPLY), TOK, serve_cfg(max_batch=4)))
    yield url
    server.should_exit = True
    thread.join(30)


def chat(content="Tell me", **kw):
    return {"model": "nanopipe", "messages": [{"role": "user", "content": content}], **kw}


def post(url, path, body):
    r = httpx.post(f"{url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def sse(url, path, body):
    """The data: payloads of a stream (JSON decoded; the final [DONE] as the string)."""
    out = []
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def model_logprobs(model, ids):
    """log p(. | ids[:j+1]) for every position j: the model computed directly (fp32)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def byte_tokens(entries):
    """Token ids of chat logprob entries (byte-level tokenizer: an entry's bytes are its id)."""
    assert all(len(e["bytes"]) == 1 for e in entries), entries
    return [e["bytes"][0] for e in entries]

# --- stop strings (choices.py)


def test_stop_text_holds_back_what_may_become_a_stop_string():
    s = StopText(["END", "\n\n"])
    assert s.push("abc E") == ("abc ", False)  # "E" may start "END"
    assert s.push("N") == ("", False)
    assert s.push("x") == ("ENx", False)  # it did not
    assert s.push("\n") == ("", False)
    assert s.push("\nmore") == ("", True)  # across pushes; the stop text is never emitted
    assert s.push("later") == ("", True) and s.flush() == ""
    s = StopText(["bc", "abcd"])
    assert s.push("xabcd") == ("x", True)  # the earliest match wins
    s = StopText(["bc", "abcd"])
    assert [s.push(p) for p in ("xa", "b", "cd")] == [("x", False), ("", False), ("", True)]
    s = StopText(["zz"])
    assert s.push("az") == ("a", False) and s.flush() == "z"  # held text is released at the end
    assert StopText([]).push("anything") == ("anything", False)


def test_choice_releases_logprobs_with_their_text_and_drops_those_after_the_stop():
    c = Choice(0, TOK, ["lo"], want_logprobs=True)
    lp = {"logprob": -1.0, "top": []}
    out = [c.token(t, lp) for t in b"hel"]
    assert [o[0] for o in out] == ["h", "e", ""]  # "l" may start "lo": held, and its entry with it
    assert [[e[0] for e in o[1]] for o in out] == [[ord("h")], [ord("e")], []]
    text, entries = c.token(ord("o"), lp)
    assert (text, c.finish) == ("", "stop") and entries == []  # "l" and "o" start at/after the cut
    c = Choice(0, TOK, [], want_logprobs=True)
    assert c.token(0xC3, lp) == ("", [])  # half of "é": its entry waits for its text
    text, entries = c.token(0xA9, lp)
    assert text == "é" and [e[0] for e in entries] == [0xC3, 0xA9]
    assert c.done("length") == ("", []) and c.finish == "length"

# --- chat completions on the real tiny GPT


def test_chat_logprobs_are_the_models(real, gpt_model):
    body = chat(max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    j = post(real, "/v1/chat/completions", body)
    choice = j["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == j["usage"]["completion_tokens"] == 12 and choice["finish_reason"] == "length"
    tokens = byte_tokens(entries)
    assert TOK.decode(tokens) == choice["message"]["content"]
    prompt = render_prompt(TOK, [("user", "Tell me")])
    lps = model_logprobs(gpt_model, prompt + tokens)
    for k, (t, e) in enumerate(zip(tokens, entries)):
        row = lps[len(prompt) - 1 + k]
        assert e["logprob"] == pytest.approx(row[t].item(), abs=2e-3)
        best = torch.topk(row, 3)
        assert [x["bytes"][0] if x["bytes"] else None for x in e["top_logprobs"]] == best.indices.tolist()
        assert [x["logprob"] for x in e["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=2e-3)
        assert t == best.indices[0].item()  # greedy
    # streamed: the same entries, spread over the chunks
    chunks = sse(real, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[-1] == "[DONE]"
    streamed = [e for c in chunks[:-1] for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert streamed == entries
    assert "".join(ch["delta"].get("content", "") for c in chunks[:-1] for ch in c["choices"]) == \
        choice["message"]["content"]


def test_n_choices_use_seed_plus_i(real):
    body = chat("Pick", max_tokens=10, temperature=1.0, seed=11)
    many = post(real, "/v1/chat/completions", {**body, "n": 3})
    texts = [c["message"]["content"] for c in sorted(many["choices"], key=lambda c: c["index"])]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    singles = [post(real, "/v1/chat/completions", {**body, "seed": 11 + i})["choices"][0]["message"]["content"]
               for i in range(3)]
    assert texts == singles and len(set(texts)) > 1
    assert many["usage"]["completion_tokens"] == 30
    chunks = sse(real, "/v1/chat/completions", {**body, "n": 3, "stream": True})
    by_index = {0: "", 1: "", 2: ""}
    finishes = {}
    for c in chunks[:-1]:
        for ch in c["choices"]:
            by_index[ch["index"]] += ch["delta"].get("content", "")
            if ch["finish_reason"]:
                finishes[ch["index"]] = ch["finish_reason"]
    assert [by_index[i] for i in range(3)] == texts and finishes == {0: "length", 1: "length", 2: "length"}


def _greedy(url, n_tokens, **kw):
    return post(url, "/v1/chat/completions", chat(max_tokens=n_tokens, temperature=0, **kw))


def test_stop_strings_cut_the_text_and_free_the_slot(real):
    full = _greedy(real, 60)["choices"][0]["message"]["content"]
    # a stop string spanning several tokens (one byte each), starting well inside the text
    start = next(i for i in range(10, len(full) - 3) if "\ufffd" not in full[i:i + 3])
    stop = full[start:start + 3]
    expected = full[:full.find(stop)]
    before = httpx.get(f"{real}/stats").json()["workers"][0]["requests_cancelled"]
    j = _greedy(real, 60, stop=stop)
    assert j["choices"][0]["message"]["content"] == expected and j["choices"][0]["finish_reason"] == "stop"
    assert j["usage"]["completion_tokens"] < 60
    # the request was cancelled once the stop matched: its slot is free
    st = httpx.get(f"{real}/stats").json()
    assert st["workers"][0]["requests_cancelled"] == before + 1 and st["active"] == 0
    # streamed: never the stop text, not even in part at the end; the same text
    chunks = sse(real, "/v1/chat/completions", chat(max_tokens=60, temperature=0, stream=True, stop=[stop, "\u2603x"]))
    deltas = [ch["delta"].get("content", "") for c in chunks[:-1] for ch in c["choices"]]
    assert "".join(deltas) == expected and not any(stop in d for d in deltas)
    assert [ch["finish_reason"] for c in chunks[:-1] for ch in c["choices"]][-1] == "stop"
    # of two stop strings, the one that occurs first wins
    later = full[start + 5:start + 8]
    j = _greedy(real, 60, stop=[later, stop])
    assert j["choices"][0]["message"]["content"] == expected


def test_penalties_top_p_and_max_completion_tokens_reach_the_sampler(real):
    plain = _greedy(real, 40)["choices"][0]["message"]["content"]
    penalized = _greedy(real, 40, frequency_penalty=2.0, presence_penalty=2.0)["choices"][0]["message"]["content"]
    assert penalized != plain
    j = post(real, "/v1/chat/completions", chat(max_completion_tokens=7, temperature=1.0, top_p=0.01, seed=3))
    assert j["usage"]["completion_tokens"] == 7
    # top_p 0.01 keeps only the most likely token: the same text as greedy
    assert j["choices"][0]["message"]["content"] == _greedy(real, 7)["choices"][0]["message"]["content"]
    j = post(real, "/v1/chat/completions", chat(max_tokens=7, max_completion_tokens=7))
    assert j["usage"]["completion_tokens"] == 7

# --- /v1/completions


def test_completions_echo_scores_the_prompt_like_the_model(real, gpt_model):
    prompts = [[BOS] + list(b"The cat sat"), list(b"on the mat")]
    j = post(real, "/v1/completions", {"model": "nanopipe", "prompt": prompts, "echo": True, "logprobs": 2,
                                       "max_tokens": 0, "temperature": 0})
    assert [c["index"] for c in j["choices"]] == [0, 1]
    assert j["usage"] == {"prompt_tokens": 22, "completion_tokens": 0, "total_tokens": 22}
    for prompt, c in zip(prompts, j["choices"]):
        lp = c["logprobs"]
        assert c["finish_reason"] == "length" and c["text"] == TOK.decode(prompt)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        rows = model_logprobs(gpt_model, prompt)
        assert lp["token_logprobs"][1:] == pytest.approx([rows[k - 1, prompt[k]].item()
                                                          for k in range(1, len(prompt))], abs=2e-3)
        for k in range(1, len(prompt)):
            best = torch.topk(rows[k - 1], 2)
            assert sorted(lp["top_logprobs"][k].values(), reverse=True) == pytest.approx(best.values.tolist(), abs=2e-3)
        assert lp["tokens"] == [("<|bos|>" if t == BOS else chr(t)) for t in prompt]
        text = TOK.decode(prompt)
        assert lp["text_offset"] == [len(TOK.decode(prompt[:k])) for k in range(len(prompt))] and len(text) > 0
    # what lm-eval's local-completions sends for a loglikelihood: max_tokens 1, echo, logprobs 1
    j = post(real, "/v1/completions", {"model": "nanopipe", "prompt": [prompts[1]], "echo": True, "logprobs": 1,
                                       "max_tokens": 1, "temperature": 0, "seed": 1234})
    lp = j["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompts[1]) + 1 and j["usage"]["completion_tokens"] == 1
    assert j["choices"][0]["text"].startswith("on the mat")


def test_completions_generate_stop_and_stream(real, gpt_model):
    body = {"model": "nanopipe", "prompt": "Once upon", "max_tokens": 30, "temperature": 0}
    j = post(real, "/v1/completions", body)
    text = j["choices"][0]["text"]
    prompt = [BOS] + list(b"Once upon")  # a string prompt: <|bos|> first, as an HF tokenizer adds it
    ids = list(prompt)
    for _ in range(30):  # greedy, directly
        ids.append(int(model_logprobs(gpt_model, ids)[-1].argmax()))
    assert text == TOK.decode(ids[len(prompt):]) and j["usage"]["prompt_tokens"] == len(prompt)
    streamed = sse(real, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed[-1] == "[DONE]" and streamed[-2]["usage"]["completion_tokens"] == 30
    assert "".join(ch["text"] for c in streamed[:-2] for ch in c["choices"]) == text
    start = next(i for i in range(5, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    j = post(real, "/v1/completions", {**body, "stop": stop, "n": 2})
    assert [c["text"] for c in j["choices"]] == [text[:text.find(stop)]] * 2
    assert {c["finish_reason"] for c in j["choices"]} == {"stop"}


def test_tokenizer_endpoints(real):
    info = httpx.get(f"{real}/tokenizer_info").json()
    assert info["eos_token"] == "<|assistant_end|>" and info["bos_token"] == "<|bos|>"
    assert info["model_max_length"] == 512
    r = httpx.post(f"{real}/tokenize", json={"prompt": "<|bos|>hi", "add_special_tokens": False}).json()
    assert r["tokens"] == [BOS, ord("h"), ord("i")] and r["count"] == 3
    assert httpx.post(f"{real}/tokenize", json={"prompt": "hi"}).json()["tokens"] == [BOS, ord("h"), ord("i")]
    assert httpx.post(f"{real}/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert httpx.post(f"{real}/detokenize", json={"tokens": [99999]}).status_code == 400
    assert httpx.post(f"{real}/tokenize", json={"prompt": "x", "extra": 1}).status_code == 422

# --- what the server cannot honour is a 400 naming the field


M = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"store": True}, "store"),
    ({"metadata": {"a": "b"}}, "metadata"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"stream": True, "stream_options": {"include_usage": True, "bogus": 1}}, "stream_options.bogus"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    ({"n": 0}, "n"), ({"n": 17}, "n"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": ""}, "stop"), ({"stop": ["a", ""]}, "stop[1]"), ({"stop": ["a"] * 5}, "stop"),
    ({"stop": "x" * 257}, "stop"),
])
def test_chat_fields_it_cannot_honour_are_refused_by_name(scripted, extra, param):
    r = httpx.post(f"{scripted}/v1/chat/completions", json={"messages": M, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err


@pytest.mark.parametrize("extra", [
    {"tools": []}, {"response_format": {"type": "text"}}, {"modalities": ["text"]}, {"store": False},
    {"service_tier": "auto"}, {"user": "u-1"}, {"logit_bias": {}}, {"parallel_tool_calls": None},
    {"messages": [{"role": "user", "content": "x", "name": None}]},
])
def test_neutral_values_are_accepted(scripted, extra):
    r = httpx.post(f"{scripted}/v1/chat/completions", json={"messages": M, **extra})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"), ({"prompt": [[1], [2, -1]]}, "prompt[1]"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "echo": True, "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"), ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": [[1]] * 129}, "prompt"), ({"prompt": "x" * 600}, "prompt"),
    ({"prompt": "x", "tools": [{}]}, "tools"), ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": {"a": 1}}, "prompt"), ({"prompt": "x", "echo": "yes"}, "echo"),
])
def test_completions_validation(scripted, body, param):
    r = httpx.post(f"{scripted}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()

# --- the official client, every field


def test_official_client_every_field(real):
    openai = require_module("openai")
    client = openai.OpenAI(base_url=f"{real}/v1", api_key="unused", max_retries=0)
    kw = dict(model="nanopipe", messages=[{"role": "user", "content": "Tell me"}], max_completion_tokens=15,
              temperature=0.7, top_p=0.9, seed=5, n=2, stop=["\n\n\n", "zzz"], presence_penalty=0.5,
              frequency_penalty=0.25, logprobs=True, top_logprobs=2, response_format={"type": "text"}, user="t")
    out = client.chat.completions.create(**kw)
    assert len(out.choices) == 2 and all(c.finish_reason in ("stop", "length") for c in out.choices)
    assert all(len(c.logprobs.content[0].top_logprobs) == 2 for c in out.choices)
    again = client.chat.completions.create(**kw)  # seed: reproducible
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    texts, usage = ["", ""], None
    for ch in stream:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
        usage = ch.usage or usage
    assert texts == [c.message.content for c in out.choices] and usage.completion_tokens == out.usage.completion_tokens
    done = client.completions.create(model="nanopipe", prompt=[[BOS, 72, 105]], echo=True, logprobs=1, max_tokens=0)
    assert done.choices[0].logprobs.token_logprobs[0] is None and len(done.choices[0].logprobs.tokens) == 3
    text = client.completions.create(model="nanopipe", prompt="Hi", max_tokens=5, seed=1, temperature=1.0, n=2)
    assert len(text.choices) == 2 and text.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="nanopipe", prompt="Hi", max_tokens=5,
                                                                            temperature=0, stream=True) if c.choices)
    assert streamed == client.completions.create(model="nanopipe", prompt="Hi", max_tokens=5, temperature=0).choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nanopipe", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert e.value.body["param"] == "tools"

# --- /metrics and /docs


def parse_metrics(text):
    """Prometheus text format -> {(name, frozenset(labels)): value}, with prometheus_client's parser
    if installed, else a strict parser of the subset the server writes."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        text_string_to_metric_families = None
    out = {}
    if text_string_to_metric_families is not None:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})? '
                        r'(-?[0-9.e+-]+|[+-]Inf|NaN)$')
    types = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary") and name not in types
            types[name] = kind
            continue
        m = sample.match(line)
        assert m, f"not a valid sample line: {line!r}"
        name, labels, value = m.groups()
        assert any(name == f or name.startswith(f + "_") for f in types), f"{name} has no # TYPE"
        pairs = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        out[(name, pairs)] = float(value)
    return out


def test_metrics_prometheus_text(real):
    def scrape():
        r = httpx.get(f"{real}/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(r.text)
    ok = frozenset({"method": "POST", "route": "/v1/chat/completions", "status": "200"}.items())
    bad = frozenset({"method": "POST", "route": "/v1/chat/completions", "status": "400"}.items())
    before = scrape()
    for _ in range(3):
        post(real, "/v1/chat/completions", chat(max_tokens=2))
    httpx.post(f"{real}/v1/chat/completions", json={"messages": M, "n": 99})
    httpx.get(f"{real}/no/such/path")
    after = scrape()
    key = "nanopipe_http_requests_total"
    assert after[(key, ok)] - before.get((key, ok), 0) == 3
    assert after[(key, bad)] - before.get((key, bad), 0) == 1
    unmatched = frozenset({"method": "GET", "route": "unmatched", "status": "404"}.items())
    assert after[(key, unmatched)] >= 1
    ttft = "nanopipe_time_to_first_token_seconds"
    assert after[(ttft + "_count", frozenset())] - before.get((ttft + "_count", frozenset()), 0) == 3
    buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in after.items() if k[0] == ttft + "_bucket"))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][1] == after[(ttft + "_count", frozenset())]
    stats = httpx.get(f"{real}/stats").json()
    assert after[("nanopipe_active_sequences", frozenset())] == 0 == stats["active"]
    assert after[("nanopipe_queue_depth", frozenset())] == 0
    assert after[("nanopipe_generated_tokens_total", frozenset())] >= before[("nanopipe_generated_tokens_total", frozenset())] + 6
    assert ("nanopipe_tokens_per_second", frozenset()) in after and after[("nanopipe_workers_alive", frozenset())] == 1


def test_docs_work_offline(scripted):
    page = httpx.get(f"{scripted}/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    urls = re.findall(r'<script[^>]+src="([^"]+)"', page.text) + re.findall(r'<link[^>]+href="([^"]+)"', page.text)
    assert len(urls) >= 3 and all(u.startswith("/") for u in urls), urls  # nothing from a CDN
    for u in urls:
        r = httpx.get(f"{scripted}{u}")
        assert r.status_code == 200 and len(r.content) > 100, u
    assert "SwaggerUIBundle" in httpx.get(f"{scripted}/static/swagger-ui/swagger-ui-bundle.js").text
    spec = httpx.get(f"{scripted}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/metrics"} <= set(spec["paths"])
