"""Load and limits over a real uvicorn: the bounded queue (429 + Retry-After), the per-request
timeout, clients that hang up (streaming or not) freeing their slot at once, SIGTERM with a stream
in flight (a well-formed end of stream), and a 1,000-request mix of valid and invalid requests
from 16 concurrent clients (no 5xx)."""
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import make_cfg, require_module
from serve_doubles import ASSISTANT_END, BOS, ChatByteTokenizer, SlowModel, suppress_terminators, tiny_gpt

from nanopipe.serving.app import create_app, run_in_thread

HERE = Path(__file__).resolve().parent
TOK = ChatByteTokenizer()
M = [{"role": "user", "content": "hi"}]


def serve_cfg(**overrides):
    return make_cfg("experiment=smoke", "serve.temperature=0.0",
                    *(f"serve.{k}={v}" for k, v in overrides.items())).serve


class Live:
    """An app on uvicorn in this process."""

    def __init__(self, app):
        self.app = app
        self.server, self.thread, port = run_in_thread(app)
        self.port, self.url = port, f"http://127.0.0.1:{port}"

    def stats(self):
        return httpx.get(f"{self.url}/stats").json()

    def wait(self, cond, what, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.stats()
            if cond(st):
                return st
            time.sleep(0.05)
        raise AssertionError(f"{what}: still {self.stats()} after {timeout}s")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def slow():
    """SlowModel (20 tokens/s for minutes) on one slot, one request may wait, 2 s per request."""
    live = Live(create_app(SlowModel(), TOK, serve_cfg(max_batch=1, max_queue=1, request_timeout=2)))
    yield live
    live.stop()


def body(**kw):
    return {"model": "nanopipe", "messages": M, "max_tokens": 4096, **kw}


async def _hold_stream(client, url, ready):
    """Stream a long reply; signal `ready` on the first event; held until cancelled."""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body(stream=True)) as r:
        assert r.status_code == 200
        async for _ in r.aiter_lines():
            ready.set()


def test_full_queue_is_429_with_retry_after(slow):
    openai = require_module("openai")

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            ready = asyncio.Event()
            holder = asyncio.create_task(_hold_stream(client, slow.url, ready))  # the one slot
            await ready.wait()
            waiter = asyncio.create_task(client.post(f"{slow.url}/v1/chat/completions", json=body()))  # the one queued
            await asyncio.to_thread(slow.wait, lambda st: st["queued"] == 1, "one request queued")
            refused = await client.post(f"{slow.url}/v1/chat/completions", json=body())
            refused_stream = await client.post(f"{slow.url}/v1/chat/completions", json=body(stream=True))
            refused_completion = await client.post(f"{slow.url}/v1/completions", json={"prompt": "x", "max_tokens": 5})

            def official():
                c = openai.OpenAI(base_url=f"{slow.url}/v1", api_key="unused", max_retries=0)
                with pytest.raises(openai.RateLimitError) as e:
                    c.chat.completions.create(model="nanopipe", messages=M, max_tokens=5)
                return e.value
            err = await asyncio.to_thread(official)
            holder.cancel()
            waiter.cancel()
            return refused, refused_stream, refused_completion, err
    refused, refused_stream, refused_completion, err = asyncio.run(main())
    for r in (refused, refused_stream, refused_completion):
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        e = r.json()["error"]
        assert e["code"] == "rate_limit_exceeded" and e["type"] == "requests" and "busy" in e["message"]
    assert err.status_code == 429 and err.response.headers["retry-after"]
    # both clients gone: their slots are free, and the server answers again
    slow.wait(lambda st: st["active"] == 0 and st["queued"] == 0, "slots freed")
    r = httpx.post(f"{slow.url}/v1/chat/completions", json=body(max_tokens=2), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_request_timeout_ends_the_request_and_frees_its_slot(slow):
    t0 = time.perf_counter()
    r = httpx.post(f"{slow.url}/v1/chat/completions", json=body(), timeout=60)
    took = time.perf_counter() - t0
    assert r.status_code == 408, r.text
    assert r.json()["error"]["code"] == "request_timeout" and "serve.request_timeout" in r.json()["error"]["message"]
    assert 2 <= took < 10
    slow.wait(lambda st: st["active"] == 0, "the timed-out request's slot freed", timeout=5)
    events = []
    with httpx.stream("POST", f"{slow.url}/v1/chat/completions", json=body(stream=True), timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert len(events) > 5  # tokens came before the cut
    slow.wait(lambda st: st["active"] == 0, "the timed-out stream's slot freed", timeout=5)


def test_client_hanging_up_frees_its_slot_at_once(slow):
    """Non-streaming: the client closes its socket while the answer is being generated; the
    request is cancelled (not decoded to the end). Streaming: the same mid-stream."""
    payload = json.dumps(body()).encode()
    before = slow.stats()["workers"][0]["requests_cancelled"]
    sock = socket.create_connection(("127.0.0.1", slow.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    slow.wait(lambda st: st["active"] == 1, "the request decoding")
    sock.close()
    t0 = time.perf_counter()
    st = slow.wait(lambda st: st["active"] == 0, "slot freed after the hang-up", timeout=5)
    assert time.perf_counter() - t0 < 2 and st["workers"][0]["requests_cancelled"] == before + 1
    assert "nanopipe_client_disconnects_total 1" in httpx.get(f"{slow.url}/metrics").text
    with httpx.stream("POST", f"{slow.url}/v1/completions", json={"prompt": "x", "max_tokens": 4096, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break
    slow.wait(lambda st: st["active"] == 0, "slot freed after the stream's hang-up", timeout=5)

# --- SIGTERM with a stream in flight, in a server process of its own


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~20 s: a server process starts
def test_sigterm_mid_stream_ends_the_stream_well_formed():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "serve_child.py"), str(port), "slow",
                             "serve.shutdown_timeout=2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    log = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "server did not start:\n" + "".join(log)
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("ready"):
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        events, t_term = [], None
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body(stream=True), timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:
                        t_term = time.perf_counter()
                        proc.send_signal(signal.SIGTERM)
        ended = time.perf_counter() - t_term
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the client got a well-formed end: the shutdown's error event, then [DONE], within the grace period
    assert events[-1] == "[DONE]", events[-3:]
    err = json.loads(events[-2])["error"]
    assert err["code"] == "server_shutdown" and err["type"] == "server_error"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-2])
    assert ended < 2.5
    assert "Traceback" not in "".join(log), "".join(log)[-3000:]

# --- 1,000 mixed requests from 16 concurrent clients


def _mixed_requests(n, seed=0):
    """(kind, path, raw body, content type): valid and invalid requests of many kinds."""
    rng = random.Random(seed)
    chat, comp = "/v1/chat/completions", "/v1/completions"

    def j(obj):
        return json.dumps(obj).encode()
    makers = [
        lambda: ("ok", chat, j({"messages": M, "max_tokens": rng.randint(1, 6), "temperature": rng.random()})),
        lambda: ("ok", chat, j({"messages": M, "max_tokens": 4, "n": rng.randint(1, 3), "seed": rng.randint(0, 99),
                                "stop": ["a", "e"], "logprobs": True, "top_logprobs": 2})),
        lambda: ("stream", chat, j({"messages": M, "max_tokens": 5, "stream": True,
                                    "stream_options": {"include_usage": True}})),
        lambda: ("hangup", chat, j({"messages": M, "max_tokens": 200, "stream": True})),
        lambda: ("ok", comp, j({"prompt": [[BOS, 1, 2, 3]], "max_tokens": 1, "echo": True, "logprobs": 1})),
        lambda: ("ok", comp, j({"prompt": "hello", "max_tokens": 3, "stop": "l", "top_p": 0.5})),
        lambda: ("stream", comp, j({"prompt": "hello", "max_tokens": 3, "stream": True})),
        lambda: ("bad", chat, b"{not json"),
        lambda: ("bad", chat, j({"messages": M, "max_tokens": "many"})),
        lambda: ("bad", chat, j({"messages": M, "temperature": 9})),
        lambda: ("bad", chat, j({"messages": M, "n": 1000})),
        lambda: ("bad", chat, j({"messages": M, "tools": [{"type": "function"}]})),
        lambda: ("bad", chat, j({"messages": M, "frobnicate": True})),
        lambda: ("bad", chat, j({"messages": [{"role": "user", "content": "x" * 9000}]})),
        lambda: ("bad", chat, j({"messages": [{"role": "user", "content": "x" * 7000}] * 2})),  # too long for 512 ctx
        lambda: ("bad", comp, j({"prompt": [[1, 2, 10**9]]})),
        lambda: ("bad", comp, j({"prompt": "y" * 5000, "max_tokens": 1})),  # more tokens than the context
        lambda: ("bad", comp, j({"prompt": "x", "logprobs": 99})),
        lambda: ("bad", comp, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        lambda: ("bad", chat, j({"messages": M, "stream": True, "stop": [""]})),
    ]
    return [rng.choice(makers)() for _ in range(n)]


@pytest.mark.slow
def test_1000_mixed_requests_from_16_clients_no_5xx(capsys):
    model = suppress_terminators(tiny_gpt(sequence_len=512, seed=5), [ASSISTANT_END, BOS])
    live = Live(create_app(model, TOK, serve_cfg(max_batch=16, max_queue=256)))
    requests_ = _mixed_requests(1000)
    statuses = []
    try:
        async def client(client_, mine):
            for kind, path, raw in mine:
                headers = {"content-type": "application/json"}
                if kind in ("stream", "hangup"):
                    async with client_.stream("POST", f"{live.url}{path}", content=raw, headers=headers) as r:
                        statuses.append((kind, r.status_code))
                        seen = []
                        async for line in r.aiter_lines():
                            seen.append(line)
                            if kind == "hangup" and len(seen) == 4:
                                break  # leave mid-stream
                        if kind == "stream":
                            assert "data: [DONE]" in seen[-2:], seen[-3:]
                else:
                    r = await client_.post(f"{live.url}{path}", content=raw, headers=headers)
                    statuses.append((kind, r.status_code))
                    if kind == "bad":
                        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text

        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                await asyncio.gather(*[client(c, requests_[i::16]) for i in range(16)])
        t0 = time.perf_counter()
        asyncio.run(main())
        took = time.perf_counter() - t0
        five_xx = [s for s in statuses if s[1] >= 500]
        assert len(statuses) == 1000 and not five_xx, five_xx[:10]
        assert all(s == 200 for k, s in statuses if k != "bad") and all(400 <= s < 500 for k, s in statuses if k == "bad")
        st = live.wait(lambda st: st["active"] == 0 and st["queued"] == 0, "every slot freed")
        assert st["requests_failed"] == 0 and st["alive_workers"] == 1
        r = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": M, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        live.stop()
    with capsys.disabled():
        bad = sum(1 for k, _ in statuses if k == "bad")
        print(f"\n[stress] 1000 requests ({bad} invalid) from 16 clients in {took:.1f}s: 0 responses 5xx")
