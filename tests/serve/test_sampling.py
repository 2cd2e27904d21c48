"""Each sampling path end to end against probabilities computed by hand: Engine.generate (training's
rollouts, chat_eval, the CLI), the server's Scheduler (its counter-based per-request draws, serving/sampling.py) and the naive
GPT.generate. A model whose logits are fixed makes every draw an independent sample of one known
distribution: p_i = exp(l_i / T) / sum_j exp(l_j / T) over the k largest logits, 0 elsewhere.

Tolerance: every token's empirical frequency within 5 standard deviations (sqrt(p(1 - p) / n)) of
p_i, and exactly 0 outside the top k. Inverting the temperature (l * T) or ignoring it on the top-k
path moves some p_i by > 0.1, over 10 standard deviations at these n.
"""
import math

import pytest
import torch
from serve_doubles import ByteTokenizer, MockModel, tiny_gpt

from nanopipe.inference.engine import Engine
from nanopipe.serving.scheduler import Scheduler

LOGITS = {97: 2.0, 98: 1.0, 99: 0.0, 100: -1.0}  # "a".."d"; every other token at -1e4 (probability 0)
VOCAB = 262
PROMPT = [261, 72, 105]  # BOS "Hi"


def fixed_logits():
    row = torch.full((VOCAB,), -1e4)
    for token, value in LOGITS.items():
        row[token] = value
    return row


def by_hand(temperature, top_k):
    """{token: probability}, from the table above (no torch)."""
    kept = sorted(LOGITS.items(), key=lambda kv: -kv[1])[:top_k or len(LOGITS)]
    weights = {t: math.exp(v / temperature) for t, v in kept}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def assert_matches(draws, temperature, top_k):
    n = len(draws)
    expected = by_hand(temperature, top_k)
    counts = {t: draws.count(t) for t in set(draws)}
    assert set(counts) <= set(expected), f"drew tokens outside the top {top_k}: {sorted(set(counts) - set(expected))}"
    for t, p in expected.items():
        freq = counts.get(t, 0) / n
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (t, freq, p, n, temperature, top_k)


class FixedLogitsModel(MockModel):
    """The same logits after any input (advances a KV cache as the real attention would)."""

    def __init__(self, sequence_len=128):
        super().__init__(VOCAB)
        self.config.sequence_len = sequence_len

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if kv_cache is not None:
            kv_cache.advance(T)
        return fixed_logits().expand(B, T, VOCAB).clone()


SETTINGS = [(0.5, None), (2.0, None), (0.5, 2), (2.0, 3), (0.7, 1), (0.7, 4), (0.7, 1000)]  # k = 1, k = V', k > V


@pytest.mark.parametrize("temperature, top_k", SETTINGS)
def test_engine_generate_draws_softmax_of_logits_over_temperature(temperature, top_k):
    engine = Engine(FixedLogitsModel(), ByteTokenizer())
    n = 4000  # rows of one batch: one draw each, from one seeded generator
    columns = [column for column, _ in engine.generate(PROMPT, num_samples=n, max_tokens=1, temperature=temperature,
                                                       top_k=top_k, seed=3)]
    assert len(columns) == 1
    assert_matches(columns[0], temperature, top_k)


def test_engine_generate_seeds():
    engine = Engine(FixedLogitsModel(), ByteTokenizer())

    def draw(seed):
        return [tuple(c) for c, _ in engine.generate(PROMPT, num_samples=64, max_tokens=3, temperature=1.0, seed=seed)]
    assert draw(11) == draw(11) and draw(11) != draw(12)


@pytest.fixture(scope="module")
def scheduler():
    s = Scheduler(FixedLogitsModel(sequence_len=300), ByteTokenizer(), max_batch=8)
    s.start()
    yield s
    s.shutdown()


@pytest.mark.parametrize("temperature, top_k", [(0.5, None), (2.0, 3), (0.7, 1), (0.7, 1000)])
def test_scheduler_requests_draw_softmax_of_logits_over_temperature(scheduler, temperature, top_k):
    """The server's path: each request draws from its own seed (a counter-based generator) with its
    sampling parameters; 8 requests x 250 tokens decoded side by side."""
    import threading
    results = [None] * 8

    def one(i):
        results[i] = scheduler.generate(PROMPT, max_tokens=250, temperature=temperature, top_k=top_k, seed=1000 + i,
                                        timeout=120)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    draws = [tok for tokens, _, finish in results for tok in tokens]
    assert all(finish == "length" for _, _, finish in results) and len(draws) == 2000
    assert_matches(draws, temperature, top_k)


def test_scheduler_seeds(scheduler):
    a = scheduler.generate(PROMPT, max_tokens=40, temperature=1.0, seed=5, timeout=60)[0]
    assert a == scheduler.generate(PROMPT, max_tokens=40, temperature=1.0, seed=5, timeout=60)[0]
    assert a != scheduler.generate(PROMPT, max_tokens=40, temperature=1.0, seed=6, timeout=60)[0]


@pytest.fixture(scope="module")
def fixed_gpt():
    model = tiny_gpt(vocab_size=VOCAB)
    model.forward = lambda ids, *a, **k: fixed_logits().expand(ids.size(0), ids.size(1), VOCAB).clone()
    return model


@pytest.mark.parametrize("temperature, top_k", [(0.5, None), (2.0, 3), (0.7, 1), (0.7, 1000)])
def test_gpt_generate_draws_softmax_of_logits_over_temperature(fixed_gpt, temperature, top_k):
    """GPT.generate, the naive reference sampler: 1500 tokens of one sequence, one generator."""
    draws = list(fixed_gpt.generate(PROMPT, 1500, temperature=temperature, top_k=top_k, seed=9))
    assert_matches(draws, temperature, top_k)


def test_gpt_generate_seeds(fixed_gpt):
    a = list(fixed_gpt.generate(PROMPT, 40, temperature=1.0, seed=1))
    assert a == list(fixed_gpt.generate(PROMPT, 40, temperature=1.0, seed=1)) != list(fixed_gpt.generate(PROMPT, 40, seed=2))
