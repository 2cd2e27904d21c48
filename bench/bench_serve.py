"""Serving benchmark: aggregate decode tok/s and first-token latency of the chat server with 1, 8
and 16 concurrent streaming clients, against a one-request-at-a-time baseline in the same run.

The server runs in a child process (uvicorn on 127.0.0.1, the app of nanopipe.serving.app with a
depth-4 / vocab-4096 model, freshly initialised, torch on --threads threads); this process is
the client (httpx, asyncio), speaking nanochat's SSE protocol (POST /chat/completions). Every
request: a short user message, temperature 1, top-k 50, --max-tokens new tokens (the rest of the
server's settings: conf/serve, with serve.max_batch = --max-batch). Each client
sends --requests-per-client requests back to back; the baseline sends the same total number of
requests strictly one after another.

    PYTHONPATH=src python bench/bench_serve.py [--threads 2] [--max-tokens 128] [--json out.json]

Goal: with 8 clients, aggregate tok/s >= 3x the one-at-a-time baseline (batched decoding).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def serve_child(args):
    import torch
    import uvicorn

    from bench_engine import StubTokenizer
    from nanopipe.config import compose_conf, validate
    from nanopipe.model.gpt import config_from_depth, create_model
    from nanopipe.serving.app import create_app
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(config_from_depth(args.depth, args.vocab_size, args.seq_len), torch.device(args.device))
    model.eval()
    conf = compose_conf([f"serve.max_batch={args.max_batch}"], conf_dir=REPO / "conf")
    app = create_app(model, StubTokenizer(args.vocab_size), validate(conf, source="conf/").serve)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


async def one_request(client, url, i, max_tokens):
    body = {"messages": [{"role": "user", "content": f"Request {i}: tell me a story."}],
            "temperature": 1.0, "top_k": 50, "max_tokens": max_tokens}
    t0 = time.perf_counter()
    first, n = None, 0
    async with client.stream("POST", f"{url}/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if "token" in ev:
                n += len(ev["token"])  # the stub tokenizer decodes each token to one character
                first = first or time.perf_counter()
            elif "error" in ev:
                raise RuntimeError(ev["error"])
    return n, (first or time.perf_counter()) - t0, time.perf_counter() - t0


async def run_clients(url, clients, per_client, max_tokens):
    async def client_loop(client, c):
        return [await one_request(client, url, c * per_client + k, max_tokens) for k in range(per_client)]
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        per = await asyncio.gather(*[client_loop(client, c) for c in range(clients)])
        wall = time.perf_counter() - t0
    reqs = [r for rs in per for r in rs]
    tokens = sum(n for n, _, _ in reqs)
    ttft = sorted(t for _, t, _ in reqs)
    return dict(clients=clients, requests=len(reqs), tokens=tokens, wall_s=wall, tok_s=tokens / wall,
                ttft_p50_ms=1e3 * statistics.median(ttft), ttft_p99_ms=1e3 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.server:
        return serve_child(args)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--server", "--port", str(port)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("server", "port", "json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""),
                                                                    os.path.dirname(os.path.abspath(__file__))] if p)}
    server = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the benchmark server did not start")
            time.sleep(0.2)
        asyncio.run(run_clients(url, 2, 1, 16))  # warm-up
        total = 8 * args.requests_per_client
        loads = [("baseline (1 at a time)", 1, total)] + [(f"{c} concurrent", c, args.requests_per_client)
                                                          for c in (1, 8, 16)]
        rows = []
        for label, clients, per_client in loads:
            before = httpx.get(f"{url}/stats").json()["workers"][0]
            row = asyncio.run(run_clients(url, clients, per_client, args.max_tokens))
            after = httpx.get(f"{url}/stats").json()["workers"][0]
            steps = after["steps"] - before["steps"]
            row["mean_batch"] = (after["rows_decoded"] - before["rows_decoded"]) / max(steps, 1)
            rows.append(dict(run_clients_label=label, **row))
        stats = httpx.get(f"{url}/stats").json()
    finally:
        server.terminate()
        server.wait(30)

    base = rows[0]["tok_s"]
    print(f"Chat server, depth {args.depth}, vocab {args.vocab_size}, {args.threads} threads, {args.device}, "
          f"{args.max_tokens} tokens/request (max batch seen {stats['max_batch_seen']}):")
    print(f"  {'load':24s} {'requests':>8s} {'tok/s':>8s} {'vs base':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
          f"{'mean batch':>10s}")
    for r in rows:
        print(f"  {r['run_clients_label']:24s} {r['requests']:8d} {r['tok_s']:8.0f} {r['tok_s'] / base:7.2f}x "
              f"{r['ttft_p50_ms']:7.0f}ms {r['ttft_p99_ms']:7.0f}ms {r['mean_batch']:10.1f}")
    eight = next(r for r in rows if r["run_clients_label"] == "8 concurrent")
    print(f"  goal: 8 clients >= 3x baseline -> {'met' if eight['tok_s'] >= 3 * base else 'NOT met'} "
          f"({eight['tok_s'] / base:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k not in ("server", "port")}, rows=rows,
                           max_batch_seen=stats["max_batch_seen"]), f, indent=2)


if __name__ == "__main__":
    main()
