"""Continuous-batching scheduler: batched decoding must reproduce Engine.generate exactly."""
import queue
import threading
import time

import pytest
import torch

from nanopipe.inference.engine import Engine
from nanopipe.serving.scheduler import BatchedGPTDecoder, Scheduler, SequentialDecoder
from serve_doubles import (ASSISTANT_END, BOS, OUTPUT_END, OUTPUT_START, PROMPT, PYTHON_END, PYTHON_START,
                           BigramModel, ByteTokenizer, ChatByteTokenizer, suppress_terminators, tiny_gpt)


def engine_tokens(engine, prompt, max_tokens, temperature, top_k, seed):
    """What the server would stream: Engine.generate's row 0 up to (not including) a terminator."""
    out = []
    for column, _ in engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed):
        if column[0] in (ASSISTANT_END, BOS):
            return out, "stop"
        out.append(column[0])
    return out, "length"


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt()


@pytest.fixture()
def sched(gpt):
    s = Scheduler(gpt, ChatByteTokenizer(), max_batch=8)
    s.start()
    yield s
    s.shutdown()


def prompts(n, lengths=(3, 11, 40, 7, 25, 50, 1, 16)):
    g = torch.Generator().manual_seed(1)
    return [[BOS] + torch.randint(0, 256, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def test_batched_step_matches_model_forward_across_windows(gpt):
    """Rows at different positions (past the 32-token S window of layer 0) vs model.forward with a KVCache."""
    dec = BatchedGPTDecoder(gpt, 3, 64, torch.device("cpu"), torch.float32)
    ref = SequentialDecoder(gpt, 3, 64, torch.device("cpu"), torch.float32)
    ps = prompts(3, lengths=(45, 4, 33))
    with torch.inference_mode():
        for slot, p in enumerate(ps):
            torch.testing.assert_close(dec.prefill(slot, p), ref.prefill(slot, p))
        pos = torch.tensor([len(p) for p in ps])
        for t in range(5):
            ids = torch.tensor([7 + t, 100 + t, 200 + t])
            torch.testing.assert_close(dec.step(ids, pos), ref.step(ids, pos), atol=1e-4, rtol=1e-4)
            pos = pos + 1


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 20)])
def test_concurrent_requests_equal_engine_generate(gpt, sched, temperature, top_k):
    assert sched.workers[0].mode == "batched"
    engine = Engine(gpt, ChatByteTokenizer())
    ps = prompts(8)
    results = [None] * len(ps)

    def run(i):
        results[i] = sched.generate(ps[i], max_tokens=12, temperature=temperature, top_k=top_k, seed=100 + i, timeout=60)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(ps):
        tokens, masks, finish = results[i]
        expected, expected_finish = engine_tokens(engine, p, 12, temperature, top_k, 100 + i)
        assert tokens == expected, f"request {i} (prompt of {len(p)} tokens) diverged from Engine.generate"
        assert finish == expected_finish and len(masks) == len(tokens)
    assert sched.stats()["max_batch_seen"] > 1, "requests should have decoded together"


def test_more_requests_than_slots_queue_and_finish(gpt):
    s = Scheduler(gpt, ChatByteTokenizer(), max_batch=2)
    s.start()
    try:
        events = queue.Queue()
        reqs = [s.submit(p, lambda ev, i=i: events.put((i, ev)), max_tokens=5, temperature=0.0) for i, p in
                enumerate(prompts(5))]
        done = set()
        while len(done) < len(reqs):
            i, ev = events.get(timeout=60)
            if ev[0] == "done":
                done.add(i)
        st = s.stats()
        assert st["max_batch_seen"] == 2 and st["active"] == 0 and st["queue_depth"] == 0
    finally:
        s.shutdown()


def test_cancel_frees_the_slot(gpt):
    model = suppress_terminators(tiny_gpt(seed=3), [ASSISTANT_END, BOS])
    s = Scheduler(model, ChatByteTokenizer(), max_batch=4)
    s.start()
    try:
        events = queue.Queue()
        req = s.submit(prompts(1)[0], events.put, max_tokens=10_000, temperature=0.0)
        for _ in range(3):
            assert events.get(timeout=30)[0] == "token"
        req.cancel()
        while (ev := events.get(timeout=30))[0] == "token":
            pass
        assert ev == ("done", "cancelled")
        deadline = time.time() + 10
        while s.stats()["active"] and time.time() < deadline:
            time.sleep(0.01)
        assert s.stats()["active"] == 0
        # the slot is reusable
        assert s.generate(prompts(1)[0], max_tokens=3, temperature=0.0, timeout=30)[2] == "length"
    finally:
        s.shutdown()


def test_length_limits_max_tokens_and_context(gpt, sched):
    tokens, _, finish = sched.generate(prompts(1)[0], max_tokens=3, temperature=0.0, timeout=30)
    assert len(tokens) <= 3
    long_model = suppress_terminators(tiny_gpt(seed=3), [ASSISTANT_END, BOS])
    s = Scheduler(long_model, ChatByteTokenizer(), max_batch=2)
    s.start()
    try:
        p = [BOS] + [65] * 59  # 60 of the 64-token context
        tokens, _, finish = s.generate(p, max_tokens=100, temperature=0.0, timeout=30)
        assert finish == "length" and len(tokens) == 64 - 60
        with pytest.raises(ValueError, match="context"):
            s.submit([BOS] * 64, lambda ev: None, max_tokens=1)
    finally:
        s.shutdown()


def test_sequential_fallback_runs_the_tool_state_machine():
    script = {ord("o"): PYTHON_START, PYTHON_START: ord("2"), ord("2"): ord("+"), ord("+"): ord("3"),
              ord("3"): PYTHON_END, OUTPUT_END: ASSISTANT_END}
    s = Scheduler(BigramModel(script), ByteTokenizer(), max_batch=4)
    s.start()
    try:
        assert s.workers[0].mode == "sequential"
        tokens, masks, finish = s.generate(PROMPT, max_tokens=20, temperature=0.0, timeout=30)
        assert tokens == [PYTHON_START, ord("2"), ord("+"), ord("3"), PYTHON_END, OUTPUT_START, ord("5"), OUTPUT_END]
        assert masks == [1, 1, 1, 1, 1, 0, 0, 0] and finish == "stop"
    finally:
        s.shutdown()


def test_broken_consumer_is_cancelled_and_others_continue(gpt, sched):
    def bad(ev):
        raise RuntimeError("consumer gone")
    sched.submit(prompts(1)[0], bad, max_tokens=50, temperature=0.0)
    tokens, _, _ = sched.generate(prompts(2)[1], max_tokens=5, temperature=0.0, timeout=30)
    assert len(tokens) <= 5
    deadline = time.time() + 10
    while sched.stats()["active"] and time.time() < deadline:
        time.sleep(0.01)
    assert sched.stats()["active"] == 0


def test_worker_falls_back_to_sequential_when_batched_step_disagrees():
    """A model whose forward differs from GPT's arithmetic (here: logits scaled) must not be decoded
    by the batched step; the worker notices at start-up and decodes with model.forward instead."""
    model = tiny_gpt(seed=4)
    original = model.forward
    model.forward = lambda idx, targets=None, kv_cache=None, loss_reduction="mean": 1.5 * original(idx, kv_cache=kv_cache)
    s = Scheduler(model, ChatByteTokenizer(), max_batch=4)
    s.start()
    try:
        assert s.workers[0].mode == "sequential"
        p = prompts(1)[0]
        tokens, _, _ = s.generate(p, max_tokens=6, temperature=0.0, timeout=30)
        assert tokens == engine_tokens(Engine(model, ChatByteTokenizer()), p, 6, 0.0, None, 0)[0]
    finally:
        s.shutdown()
