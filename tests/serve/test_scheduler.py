"""Continuous-batching scheduler: greedy batched decoding reproduces Engine.generate exactly; seeded
sampling does not depend on the batch; prefill joins a running batch; logprobs are the model's."""
import queue
import threading
import time

import pytest
import torch
from serve_doubles import (
    ASSISTANT_END,
    BOS,
    OUTPUT_END,
    OUTPUT_START,
    PROMPT,
    PYTHON_END,
    PYTHON_START,
    BigramModel,
    ByteTokenizer,
    ChatByteTokenizer,
    suppress_terminators,
    tiny_gpt,
)

from nanopipe.inference.engine import Engine
from nanopipe.serving.scheduler import QueueFull, Scheduler


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


def run_together(s, ps, **kwargs):
    """Submit every prompt from its own thread at once; the results in order."""
    results = [None] * len(ps)

    def run(i):
        results[i] = s.generate(ps[i], timeout=60, **{k: (v[i] if isinstance(v, list) else v) for k, v in kwargs.items()})
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.mark.parametrize("prefill_chunk", [256, 8])
def test_concurrent_greedy_requests_equal_engine_generate(gpt, prefill_chunk):
    """8 prompts of 2..51 tokens (prefilled whole, or in chunks of 8 while others decode)."""
    s = Scheduler(gpt, ChatByteTokenizer(), max_batch=8, prefill_chunk=prefill_chunk)
    s.start()
    try:
        engine = Engine(gpt, ChatByteTokenizer())
        ps = prompts(8)
        results = run_together(s, ps, max_tokens=12, temperature=0.0)
        for i, p in enumerate(ps):
            tokens, masks, finish = results[i]
            expected, expected_finish = engine_tokens(engine, p, 12, 0.0, None, 0)
            assert tokens == expected, f"request {i} (prompt of {len(p)} tokens) diverged from Engine.generate"
            assert finish == expected_finish and masks == [1] * len(tokens)
        st = s.stats()
        assert st["max_batch_seen"] > 1, "requests should have decoded together"
        assert st["workers"][0]["prefill_chunks"] >= (8 if prefill_chunk == 256 else sum(-(-len(p) // 8) for p in ps))
    finally:
        s.shutdown()


def test_seeded_sampling_does_not_depend_on_the_batch(gpt, sched):
    """The same request (seed, parameters) alone and amid 7 others with other prompts/parameters."""
    p = prompts(3)[2]
    kw = dict(max_tokens=15, temperature=1.2, top_k=40, top_p=0.95, seed=1234, presence_penalty=0.3)
    alone = sched.generate(p, timeout=60, **kw)
    others = prompts(8)[1:]
    crowd = run_together(sched, [p] + others, max_tokens=[15] + [5, 30, 2, 9, 15, 3, 20],
                         temperature=[1.2] + [0.0, 1.0, 0.7, 1.2, 2.0, 0.5, 1.0], top_k=[40] + [None] * 7,
                         top_p=[0.95] + [1.0, 0.5, 0.9, 1.0, 1.0, 0.3, 1.0], seed=[1234] + list(range(7)),
                         presence_penalty=[0.3] + [0.0] * 7)
    assert crowd[0] == alone and len(alone[0]) > 5
    assert sched.generate(p, timeout=60, **{**kw, "seed": 1235})[0] != alone[0]


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


def test_tool_state_machine_forces_calculator_tokens():
    """A scripted model double (its own forward, through the scheduler's per-row cache): the
    calculator result is forced (mask 0) whatever the model would have sampled."""
    script = {ord("o"): PYTHON_START, PYTHON_START: ord("2"), ord("2"): ord("+"), ord("+"): ord("3"),
              ord("3"): PYTHON_END, OUTPUT_END: ASSISTANT_END}
    s = Scheduler(BigramModel(script), ByteTokenizer(), max_batch=4)
    s.start()
    try:
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


def test_prefill_joins_a_running_batch_one_chunk_at_a_time():
    """A 57-token prompt arriving mid-stream is prefilled in chunks of 8 while the running row
    keeps decoding: the running row emits a token after every chunk (it never waits for more
    than one), and both streams are exactly what each gets alone."""
    model = suppress_terminators(tiny_gpt(seed=3), [ASSISTANT_END, BOS])
    s = Scheduler(model, ChatByteTokenizer(), max_batch=4, prefill_chunk=8)
    s.start()
    try:
        w = s.workers[0]
        short, long_ = prompts(1)[0], [BOS] + list(range(60, 116))  # 4 and 57 tokens
        solo_short = s.generate(short, max_tokens=40, temperature=0.0, timeout=60)[0]
        solo_long = s.generate(long_, max_tokens=5, temperature=0.0, timeout=60)[0]
        seen, events = [], queue.Queue()

        def on_short(ev):
            seen.append(w.stats["prefill_chunks"])  # on the decode thread: how many chunks ran so far
            events.put(ev)
        s.submit(short, on_short, max_tokens=40, temperature=0.0)
        assert events.get(timeout=30)[0] == "token"
        before = w.stats["prefill_chunks"]
        late = s.generate(long_, max_tokens=5, temperature=0.0, timeout=60)[0]
        tokens = []
        while (ev := events.get(timeout=30))[0] == "token":
            tokens.append(ev[1])
        assert ev == ("done", "length")
        chunks = range(before + 1, before + 8)  # the long prompt's 8 chunks; the last also samples its first token
        assert set(chunks) <= set(seen), f"the running row stalled over a chunk: {seen}"
        assert [solo_short[0]] + tokens == solo_short and late == solo_long
    finally:
        s.shutdown()


def test_queue_full_is_refused_with_a_retry_after():
    model = suppress_terminators(tiny_gpt(seed=3), [ASSISTANT_END, BOS])
    s = Scheduler(model, ChatByteTokenizer(), max_batch=1, max_queue=1)
    s.start()
    try:
        first, second = queue.Queue(), queue.Queue()
        running = s.submit(prompts(1)[0], first.put, max_tokens=50, temperature=0.0)
        assert first.get(timeout=30)[0] == "token"  # holds the only slot
        waiting = s.submit(prompts(2)[1], second.put, max_tokens=3, temperature=0.0)
        with pytest.raises(QueueFull) as refused:
            s.submit(prompts(1)[0], lambda ev: None, max_tokens=3)
        assert isinstance(refused.value.retry_after, int) and refused.value.retry_after >= 1
        assert "max_queue=1" in str(refused.value) and s.stats()["queued"] == 1
        running.cancel()
        while (ev := second.get(timeout=30))[0] == "token":
            pass
        assert ev == ("done", "length") and waiting.finished
    finally:
        s.shutdown()


@pytest.mark.parametrize("prefill_chunk", [256, 7])
def test_prompt_logprobs_equal_log_softmax_of_the_model(gpt, prefill_chunk):
    """("prompt", [None, lp_1..lp_{n-1}]) before any token: log_softmax(model(prompt))[i-1, prompt[i]]
    with the 3 best, best first (tolerance 1e-5: cached chunks vs one full forward)."""
    s = Scheduler(gpt, ChatByteTokenizer(), max_batch=2, prefill_chunk=prefill_chunk)
    s.start()
    try:
        p = prompts(3)[2]  # 41 tokens: 6 chunks of 7
        events = queue.Queue()
        s.submit(p, events.put, max_tokens=2, temperature=0.0, logprobs=3, prompt_logprobs=True)
        kind, lps = events.get(timeout=30)
        assert kind == "prompt" and len(lps) == len(p) and lps[0] is None
        with torch.inference_mode():
            ref = torch.log_softmax(gpt.forward(torch.tensor([p]))[0].float(), dim=-1)
        for i in range(1, len(p)):
            assert lps[i]["logprob"] == pytest.approx(ref[i - 1, p[i]].item(), abs=1e-5)
            top_lp, top_ids = ref[i - 1].topk(3)
            assert [t for t, _ in lps[i]["top"]] == top_ids.tolist()
            assert [v for _, v in lps[i]["top"]] == pytest.approx(top_lp.tolist(), abs=1e-5)
        assert events.get(timeout=30)[0] == "token"
    finally:
        s.shutdown()


def test_token_logprobs_are_raw_and_ordered(gpt, sched):
    """Each token event carries the chosen token's log_softmax of the raw logits (before temperature
    and top-k) and the k best, best first; logprobs=0 gives no alternatives."""
    p = prompts(2)[1]
    events = queue.Queue()
    sched.submit(p, events.put, max_tokens=6, temperature=3.0, top_k=5, seed=7, logprobs=4)
    got = []
    while (ev := events.get(timeout=30))[0] == "token":
        got.append(ev)
    assert got and ev[0] == "done"
    seq = list(p)
    with torch.inference_mode():
        for _, token, _mask, lp in got:
            ref = torch.log_softmax(gpt.forward(torch.tensor([seq]))[0, -1].float(), dim=-1)
            assert lp["logprob"] == pytest.approx(ref[token].item(), abs=1e-4)
            values = [v for _, v in lp["top"]]
            assert len(lp["top"]) == 4 and values == sorted(values, reverse=True)
            assert [t for t, _ in lp["top"]] == ref.topk(4).indices.tolist()
            seq.append(token)
    events = queue.Queue()
    sched.submit(p, events.put, max_tokens=2, temperature=0.0, logprobs=0)
    ev = events.get(timeout=30)
    assert ev[0] == "token" and ev[3]["top"] == [] and ev[3]["logprob"] <= 0
    events = queue.Queue()
    sched.submit(p, events.put, max_tokens=1, temperature=0.0)
    ev = events.get(timeout=30)
    assert len(ev) == 4 and ev[3] is None


def test_max_tokens_zero_only_scores_the_prompt(gpt, sched):
    events = queue.Queue()
    sched.submit(prompts(1)[0], events.put, max_tokens=0, prompt_logprobs=True)
    assert events.get(timeout=30)[0] == "prompt"
    assert events.get(timeout=30) == ("done", "length")
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        sched.submit(prompts(1)[0], events.put, max_tokens=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(temperature=-0.1), "temperature"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=True), "logprobs"), (dict(logprobs=10**6), "logprobs"),
    (dict(prompt_logprobs="yes"), "prompt_logprobs"), (dict(max_tokens=-1), "max_tokens"),
    (dict(prompt=[BOS, 265]), "outside the vocabulary"), (dict(prompt=[-1]), "outside the vocabulary"),
])
def test_submit_rejects_bad_parameters(sched, kwargs, match):
    kwargs = {"prompt": prompts(1)[0], "max_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        sched.submit(emit=lambda ev: None, **kwargs)
    assert sched.stats()["queued"] == 0


def test_stats_count_time_to_first_token_and_rate(gpt, sched):
    before = sched.stats()
    sched.generate(prompts(1)[0], max_tokens=4, temperature=0.0, timeout=30)
    st = sched.stats()
    assert st["ttft_count"] == before["ttft_count"] + 1 and st["ttft_seconds_sum"] > before["ttft_seconds_sum"]
    assert st["tokens_per_s"] > 0 and st["queued"] == 0


def test_a_cancelled_queued_request_leaves_the_queue_while_slots_are_busy():
    model = suppress_terminators(tiny_gpt(seed=3), [ASSISTANT_END, BOS])
    s = Scheduler(model, ChatByteTokenizer(), max_batch=1, max_queue=1)
    s.start()
    try:
        first, second = queue.Queue(), queue.Queue()
        running = s.submit(prompts(1)[0], first.put, max_tokens=60, temperature=0.0)
        assert first.get(timeout=30)[0] == "token"
        waiting = s.submit(prompts(1)[0], second.put, max_tokens=3, temperature=0.0)
        waiting.cancel()
        assert second.get(timeout=30) == ("done", "cancelled")
        assert not running.finished and s.stats()["queued"] == 0
        s.submit(prompts(1)[0], lambda ev: None, max_tokens=3)  # its place in the queue is free again
        running.cancel()
    finally:
        s.shutdown()


def test_a_burst_of_prompts_is_prefilled_together_exactly(gpt):
    """8 requests waiting when the worker starts: prefilled in forwards of <= prefill_chunk padded
    tokens (prompts of 2..51 tokens: 256 tokens hold 5 of them at width 51), and each greedy
    stream is still exactly Engine.generate's; with prompt logprobs, each equals the direct
    log_softmax of the model over its own prompt (the padding is invisible)."""
    from nanopipe.serving.scheduler import Request
    s = Scheduler(gpt, ChatByteTokenizer(), max_batch=8, prefill_chunk=256)
    ps = prompts(8)
    qs = [queue.Queue() for _ in ps]
    for p, q in zip(ps, qs):
        s.workers[0].submit(Request(p, 12, 0.0, None, 0, q.put, logprobs=0, prompt_logprobs=True))
    s.start()
    try:
        engine = Engine(gpt, ChatByteTokenizer())
        for p, q in zip(ps, qs):
            kind, lps = q.get(timeout=60)
            assert kind == "prompt"
            with torch.inference_mode():
                ref = torch.log_softmax(gpt.forward(torch.tensor([p]))[0].float(), dim=-1)
            got = [lp["logprob"] for lp in lps[1:]]
            assert got == pytest.approx([ref[i - 1, p[i]].item() for i in range(1, len(p))], abs=1e-5)
            tokens = []
            while (ev := q.get(timeout=60))[0] == "token":
                tokens.append(ev[1])
            assert tokens == engine_tokens(engine, p, 12, 0.0, None, 0)[0]
        w = s.stats()["workers"][0]
        assert w["prefill_chunks"] == 8 and w["prefill_forwards"] <= 3, w
    finally:
        s.shutdown()
