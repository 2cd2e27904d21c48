"""A server that isolates requests (issue 18): one request's failure, or a poisoned request,
never touches the others; the decode workers are supervised; SIGINT always stops the server.

The HTTP tests run the server as `serve()` runs it, in a real uvicorn process of its own
(serve_child.py), and signal it."""
import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import require_module
from serve_doubles import ASSISTANT_END, BOS, PROMPT, ChatByteTokenizer, SlowModel, suppress_terminators, tiny_gpt

from nanopipe.serving import scheduler as sched
from nanopipe.serving.scheduler import Request, Scheduler

HERE = Path(__file__).resolve().parent
SHUTDOWN_TIMEOUT = 2  # serve.shutdown_timeout of the child servers
EXIT_BOUND_S = SHUTDOWN_TIMEOUT + 15  # grace + the decode threads' join (10 s at most) + slack


# --- the scheduler: one failing request ends that request only

def _collect(events, timeout=20):
    tokens = []
    while True:
        ev = events.get(timeout=timeout)
        if ev[0] == "token":
            tokens.append(ev[1])
        else:
            return tokens, ev


@pytest.fixture
def tiny_scheduler():
    model = suppress_terminators(tiny_gpt(sequence_len=256, seed=3), [ASSISTANT_END, BOS])
    s = Scheduler(model, ChatByteTokenizer(), max_batch=8)
    s.start()
    yield s
    s.shutdown()


def _start_streams(s, n, max_tokens=60):
    """n greedy requests, each waited for until its first token is out (so they are mid-decode)."""
    streams = []
    for i in range(n):
        q = queue.Queue()
        s.submit(PROMPT + [i], q.put, max_tokens=max_tokens, temperature=0.0)
        streams.append((q, [q.get(timeout=60)]))
    return streams


def _finish_streams(streams):
    out = []
    for q, first in streams:
        tokens, last = _collect(q)
        out.append(([first[0][1]] + tokens, last))
    return out


def test_a_failure_admitting_or_decoding_one_request_ends_it_alone(tiny_scheduler, monkeypatch):
    s = tiny_scheduler
    solo = [s.generate(PROMPT + [i], max_tokens=60, temperature=0.0)[0] for i in range(4)]
    real_step = sched.step_row
    poisoned, calls = {}, {}

    def step(state, token, tokenizer, special):
        # a row's own tool step: "first" fails on its first token (right after its prefill),
        # "fourth" on its 4th (mid-decode, among the 4 healthy rows)
        n = calls[id(state)] = calls.get(id(state), 0) + 1
        if poisoned.get(id(state)) == "first" or (poisoned.get(id(state)) == "fourth" and n == 4):
            raise RuntimeError("poisoned row")
        return real_step(state, token, tokenizer, special)
    monkeypatch.setattr(sched, "step_row", step)
    streams = _start_streams(s, 4)
    bad = []
    for when in ("first", "fourth"):
        q = queue.Queue()
        req = Request(PROMPT, 60, 0.0, None, 1, q.put)
        poisoned[id(req.state)] = when
        s.workers[0].submit(req)
        bad.append(q)
    # a seed torch cannot take (2**64), past Scheduler.submit's own check: the old worker seeded
    # outside its error handling, so this failed every row in flight and was never answered
    q = queue.Queue()
    s.workers[0].submit(Request(PROMPT, 60, 0.0, None, 2**64, q.put))
    bad.append(q)
    # a token the model has no embedding for: its prefill forward fails, the batch's does not
    q = queue.Queue()
    s.workers[0].submit(Request(PROMPT + [10**6], 60, 0.0, None, 1, q.put))
    bad.append(q)
    for q in bad:
        tokens, last = _collect(q)
        assert last[0] == "error" and len(tokens) <= 3, (tokens, last)
    for (tokens, last), expected in zip(_finish_streams(streams), solo):
        assert last == ("done", "length") and tokens == expected
    st = s.stats()
    assert st["requests_failed"] == 4 and st["alive_workers"] == 1
    assert s.generate(PROMPT, max_tokens=5, temperature=0.0)[2] == "length"  # and the worker lives on


def test_submit_rejects_a_seed_torch_cannot_take(tiny_scheduler):
    for seed in (2**64, -2**63 - 1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            tiny_scheduler.submit(PROMPT, lambda ev: None, max_tokens=3, seed=seed)
    for seed in (-2**63, 2**64 - 1):  # torch's own bounds are fine
        assert tiny_scheduler.generate(PROMPT, max_tokens=3, seed=seed)[2] in ("length", "stop")


def test_a_crashed_decode_loop_is_restarted_then_declared_dead(tiny_scheduler, monkeypatch):
    from fastapi.testclient import TestClient
    from test_app import serve_cfg

    from nanopipe.serving.app import create_app
    s = tiny_scheduler
    w = s.workers[0]
    streams = _start_streams(s, 2, max_tokens=200)
    real_wait, failures = w._wait_for_work, [1]

    def wait_then_fail():  # an error outside any request's handling: the loop itself dies
        if failures:
            failures.pop()
            raise RuntimeError("decode loop bug")
        return real_wait()
    monkeypatch.setattr(w, "_wait_for_work", wait_then_fail)
    with w._wake:
        w._wake.notify()
    for _tokens, last in _finish_streams(streams):  # the rows it held are failed, not left hanging
        assert last[0] == "error" and "decode loop bug" in last[1]
    assert s.generate(PROMPT, max_tokens=5, temperature=0.0, timeout=60)[2] == "length"
    assert w.stats["restarts"] == 1 and w.alive
    # failing again and again: after MAX_RESTARTS the worker is dead and /health says so
    monkeypatch.setattr(w, "_wait_for_work", lambda: (_ for _ in ()).throw(RuntimeError("still broken")))
    # a request wakes the loop (an idle one waits inside the real _wait_for_work until there is work);
    # the next time round it calls the broken one, and so on after every restart
    _start_streams(s, 1, max_tokens=200)
    deadline = time.time() + 60
    while w.alive and time.time() < deadline:
        time.sleep(0.05)
    assert not w.alive and "still broken" in w.dead
    with pytest.raises(RuntimeError, match="no decode worker"):
        s.submit(PROMPT, lambda ev: None, max_tokens=3)
    c = TestClient(create_app(None, s.tokenizer, serve_cfg(), scheduler=s))  # no `with`: no lifespan, s is running
    h = c.get("/health")
    assert h.status_code == 503 and h.json()["status"] == "unhealthy" and "still broken" in h.json()["problems"][0]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# --- a real server process: poisoned requests among 16 streams, then SIGINT


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_child(kind, *overrides):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "serve_child.py"), str(port), kind,
                             f"serve.shutdown_timeout={SHUTDOWN_TIMEOUT}", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, "server died:\n" + "".join(lines)
        try:
            if httpx.get(f"{url}/health", timeout=2).json().get("ready"):
                return proc, url, lines
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def _sigint_and_time(proc):
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the server did not exit within {EXIT_BOUND_S}s of SIGINT") from None
    return time.perf_counter() - t0


M = [{"role": "user", "content": "hi"}]


def _poisoned():
    """(path, raw body bytes, content-type) of requests that must each get a 4xx."""
    def j(**body):
        return json.dumps({"messages": M, **body}).encode()
    v1 = "/v1/chat/completions"
    cases = [
        (v1, j(seed=18446744073709551616, stream=True)),  # the reported one
        (v1, j(seed=18446744073709551616)),
        (v1, j(seed=2**63)), (v1, j(seed=-2**63 - 1)), (v1, j(seed=-10**30, stream=True)),
        (v1, j(seed=1.5)), (v1, j(seed=1e300)), (v1, j(seed="7")), (v1, j(seed=True)),
        (v1, j(n=10**40)), (v1, j(n=-1)), (v1, j(n=17, stream=True)),
        (v1, j(max_tokens=10**30)), (v1, j(max_tokens=-5)), (v1, j(max_completion_tokens=0)),
        (v1, j(max_tokens=2.5)), (v1, j(top_k=10**20)), (v1, j(top_k=-1)),
        (v1, j(temperature=1e308 * 10)), (v1, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        (v1, j(top_p=float("-inf"))), (v1, j(presence_penalty=5)), (v1, j(logprobs=True, top_logprobs=21)),
        (v1, j(logit_bias="junk")), (v1, j(logit_bias={"1": "x"})), (v1, j(logit_bias={"1": 5})),
        (v1, j(logit_bias=[1, 2])),
        (v1, j(stop=["x"] * 100000)), (v1, j(stop=[1, 2])), (v1, j(stop="", stream=True)),
        (v1, j(tools=[{"type": "function"}], stream=True)),
        (v1, j(stream="yes")), (v1, j(stream=True, stream_options={"include_usage": "no"})),
        (v1, json.dumps({"messages": [1, 2]}).encode()),
        (v1, json.dumps({"messages": "hi"}).encode()),
        (v1, json.dumps({"messages": [{"role": 5, "content": "x"}]}).encode()),
        (v1, json.dumps({"messages": [{"role": "user", "content": {"a": 1}}]}).encode()),
        (v1, json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}).encode()),
        (v1, b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),  # a lone surrogate
        (v1, json.dumps({"messages": [{"role": "user", "content": "x"}] * 600}).encode()),
        (v1, json.dumps({"model": "gpt-4o", "messages": M}).encode()),
        (v1, json.dumps({"model": "x" * 10000, "messages": M}).encode()),
        (v1, json.dumps({"model": ["nanopipe"], "messages": M}).encode()),
        (v1, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),  # not UTF-8
        (v1, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}".encode("utf-16")),
        (v1, b"{not json"), (v1, b""), (v1, b"[]"), (v1, b"null"),
        (v1, b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"),  # nested too deeply for the parser
        (v1, b'{"messages": [], "seed": 1' + b"0" * 5000 + b"}"),  # an integer of 5001 digits
        (v1, b'{"messages": [{"role": "user", "content": "' + b"a" * (2 << 20) + b'"}]}'),  # 2 MiB
        ("/chat/completions", json.dumps({"messages": M, "temperature": float("inf")}).encode()),
        ("/chat/completions", json.dumps({"messages": M, "max_tokens": 10**30}).encode()),
        ("/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3"}]}'),
        ("/chat/completions", b"{" * 100000),
    ]
    out = [(path, body, "application/json") for path, body in cases]
    out += [(v1, j(), "text/plain"), (v1, j(), "application/x-www-form-urlencoded"), (v1, j(), "multipart/form-data")]
    return out


async def _stream_v1(client, url, i, max_tokens):
    body = {"model": "nanopipe", "messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    n, events = 0, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if events[-1] != "[DONE]":
                    n += 1
    return events, time.perf_counter()


async def _stream_chat(client, url, i, max_tokens):
    body = {"messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": max_tokens, "temperature": 0}
    events = []
    async with client.stream("POST", f"{url}/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return events, time.perf_counter()


def test_poisoned_requests_among_16_streams_then_sigint(capsys):
    """Fuzz: every poisoned request is a 4xx in its API's error shape (OpenAI's under /v1) while
    16 streaming clients run; the 16 all finish normally, nothing is a 5xx, SIGINT stops the server."""
    openai = require_module("openai")
    proc, url, log = _start_child("gpt")
    poisoned = _poisoned()
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.create_task((_stream_v1 if i % 4 else _stream_chat)(client, url, i, 400))
                         for i in range(16)]
                # wait until all 16 are decoding together
                deadline = time.time() + 60
                while (await client.get(f"{url}/stats")).json()["active"] < 16:
                    assert time.time() < deadline, "the 16 streams never ran together"
                    await asyncio.sleep(0.05)

                async def send(path, body, ctype):
                    r = await client.post(f"{url}{path}", content=body, headers={"content-type": ctype})
                    return path, r.status_code, r.content

                def official():  # the official client: the reported request, and an unknown model
                    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
                    got = []
                    for kw, err in ((dict(seed=18446744073709551616, stream=True), openai.BadRequestError),
                                    (dict(seed=-2**64), openai.BadRequestError),
                                    (dict(model="gpt-4o-mini"), openai.NotFoundError)):
                        with pytest.raises(err) as e:
                            c.chat.completions.create(**{"model": "nanopipe", "messages": M, **kw})
                        got.append((e.value.status_code, e.value.body))
                    return got
                answers = await asyncio.gather(*[send(*p) for p in poisoned], asyncio.to_thread(official))
                poisoned_done = time.perf_counter()
                streams = await asyncio.gather(*tasks)
                active_after = (await client.get(f"{url}/stats")).json()
                return answers[:-1], answers[-1], poisoned_done, streams, active_after
        answers, official, poisoned_done, streams, stats = asyncio.run(main())
        statuses = [status for _, status, _ in answers] + [status for status, _ in official]
        five_xx = sum(1 for status in statuses if status >= 500)
        for (path, status, content), (_, body, ctype) in zip(answers, poisoned):
            assert 400 <= status < 500, (status, body[:200], ctype, content[:300])
            err = json.loads(content)
            if path.startswith("/v1/"):
                assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
                assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
            else:
                assert set(err) == {"detail"}, err
        assert [s for s, _ in official] == [400, 400, 404]
        assert official[0][1]["param"] == "seed" and official[2][1]["code"] == "model_not_found"
        for events, ended in streams:  # every stream: 400 tokens, a normal end, no error event
            assert ended > poisoned_done, "a stream ended before the poisoned requests were all answered"
            assert not any('"error"' in e for e in events), events[-3:]
            if events[-1] == "[DONE]":
                chunks = [json.loads(e) for e in events[:-1]]
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            else:
                assert json.loads(events[-1]) == {"done": True} and len(events) > 20
        assert stats["requests_failed"] == 0 and stats["alive_workers"] == 1
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        took = _sigint_and_time(proc) if proc.poll() is None else None
    with capsys.disabled():
        print(f"\n[fuzz] {len(statuses)} poisoned requests ({len(answers)} raw HTTP + {len(official)} official client) "
              f"among 16 streams: {five_xx} responses 5xx; SIGINT -> exit in {took:.1f}s")
    assert five_xx == 0
    assert "Traceback" not in "".join(log), "".join(log)[-3000:]


def test_sigint_with_a_stream_in_flight_exits_within_the_bound():
    """A reply that would take minutes is streaming when Ctrl-C comes: the server still exits
    within shutdown_timeout plus the workers' join bound, and the client's stream ends."""
    proc, url, log = _start_child("slow")
    got = queue.Queue()

    def client():
        body = {"messages": M, "max_tokens": 4096, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    got.put(line)
        except httpx.HTTPError as e:  # the server cut the connection: fine, it did not hang
            got.put(f"cut: {type(e).__name__}")
        got.put(None)
    t = threading.Thread(target=client, daemon=True)
    t.start()
    deadline = time.time() + 60
    while httpx.get(f"{url}/stats").json()["active"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    took = _sigint_and_time(proc)
    t.join(10)
    assert not t.is_alive(), "the client's stream never ended"
    assert took <= EXIT_BOUND_S
    slow = SlowModel()
    assert slow.config.sequence_len * slow.delay > 10 * EXIT_BOUND_S  # the reply alone would take far longer
