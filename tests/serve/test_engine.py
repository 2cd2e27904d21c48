"""Engine tests, with doubles and with a real tiny GPT."""
import threading

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
    MockModel,
    tiny_gpt,
)

from nanopipe.inference.engine import Engine, KVCache, eval_with_timeout, sample_next_token, use_calculator


def engine():
    return Engine(MockModel(262), ByteTokenizer())

# --- KV cache (re-exported from nanopipe.model.kv_cache)


def test_kv_cache_basic():
    c = KVCache(batch_size=2, num_heads=3, seq_len=64, head_dim=5, num_layers=6, device="cpu", dtype=torch.float32)
    assert c.get_pos() == 0
    assert c.k_cache.shape == c.v_cache.shape == (6, 2, 64, 3, 5)
    c.advance(10)
    assert c.get_pos() == 10
    c.advance(5)
    assert c.get_pos() == 15
    c.reset()
    assert c.get_pos() == 0
    k, v = c.get_layer_cache(0)
    assert k.shape == v.shape == (2, 64, 3, 5)


def test_kv_cache_prefill():
    kw = dict(num_heads=4, head_dim=8, num_layers=2, device="cpu", dtype=torch.float32)
    src = KVCache(batch_size=1, seq_len=32, **kw)
    src.k_cache[0, 0, :16] = 1.0
    src.v_cache[0, 0, :16] = 2.0
    src.advance(16)
    dst = KVCache(batch_size=1, seq_len=64, **kw)
    dst.prefill(src)
    assert dst.get_pos() == 16
    assert (dst.k_cache[0, 0, :16] == 1.0).all() and (dst.v_cache[0, 0, :16] == 2.0).all()

# --- sampling


def test_sample_next_token_rules():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [3.0, 0.0, 0.0, 0.0]])
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, rng, temperature=0.0).tolist() == [[1], [0]]
    with pytest.raises(AssertionError, match="non-negative"):
        sample_next_token(logits, rng, temperature=-1.0)
    # top-k=2 only ever returns the two best tokens of each row
    draws = {tuple(sample_next_token(logits, rng, 1.0, top_k=2)[:, 0].tolist()) for _ in range(200)}
    assert all(a in (1, 3) for a, _ in draws) and len({a for a, _ in draws}) == 2
    # k larger than V is capped; top_k <= 0 means the full vocabulary
    assert sample_next_token(logits, rng, 1.0, top_k=100).shape == (2, 1)
    full = {sample_next_token(torch.zeros(1, 4), rng, 1.0, top_k=0).item() for _ in range(200)}
    assert full == {0, 1, 2, 3}


def test_sampling_follows_the_distribution_per_row():
    """Inverse-CDF sampling: each row draws from its own softmax; zero-probability tokens never come."""
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 0.5, 0.0, 0.5]])
    logits = probs.clamp_min(1e-30).log()  # softmax(log p) = p; log 0 -> a finite, vanishing logit
    logits[probs == 0] = float("-inf")
    rng = torch.Generator().manual_seed(3)
    n = 20000
    draws = torch.cat([sample_next_token(logits, rng, 1.0) for _ in range(n)], dim=1)  # (2, n)
    for row in range(2):
        freq = torch.bincount(draws[row], minlength=5).float() / n
        assert freq[probs[row] == 0].sum() == 0
        torch.testing.assert_close(freq, probs[row], atol=0.015, rtol=0)  # ~4 sigma at n=20000
    # seeded: the same generator state gives the same draws
    a = sample_next_token(logits, torch.Generator().manual_seed(9), 0.7, top_k=3)
    assert torch.equal(a, sample_next_token(logits, torch.Generator().manual_seed(9), 0.7, top_k=3))

# --- Engine with doubles (nanochat's test_engine.py)


def test_multi_sample_first_token_diversity():
    column, _ = next(engine().generate(PROMPT, num_samples=16, max_tokens=1, temperature=1.0, seed=42))
    assert len(set(column)) > 1, "first token must be sampled per row, not broadcast"


def test_seed_reproducibility():
    e = engine()
    for seed in (1, 42, 123, 999):
        runs = [e.generate_batch(PROMPT, max_tokens=5, seed=seed)[0] for _ in range(3)]
        assert runs[0] == runs[1] == runs[2]


def test_temperature_zero_determinism():
    e = engine()
    runs = [e.generate_batch(PROMPT, temperature=0.0, max_tokens=5, seed=s)[0] for s in (1, 42, 123)]
    assert runs[0] == runs[1] == runs[2]


def test_max_tokens_respected():
    e = engine()
    for m in (1, 4, 16, 64):
        results, _ = e.generate_batch(PROMPT, max_tokens=m)
        assert len(results[0]) - len(PROMPT) <= m
    assert list(e.generate(PROMPT, max_tokens=0)) == []


def test_num_samples_count():
    e = engine()
    for n in (1, 4, 16, 64):
        results, masks = e.generate_batch(PROMPT, num_samples=n, max_tokens=3)
        assert len(results) == len(masks) == n
        assert all(r[:len(PROMPT)] == PROMPT for r in results)


def test_different_seeds_introduce_variation_when_temperature_nonzero():
    e = engine()
    outs = {tuple(e.generate_batch(PROMPT, temperature=1.0, max_tokens=5, seed=s)[0][0])
            for s in (1, 42, 123, 999, 1000, 1001, 1002, 1003, 1004, 1005)}
    assert len(outs) > 1


def test_engine_accepts_device_objects_and_strings():
    class DeviceModel(MockModel):
        def get_device(self):
            return torch.device("cpu")
    for model in (MockModel(), DeviceModel()):
        results, _ = Engine(model, ByteTokenizer()).generate_batch(PROMPT, max_tokens=3, seed=0)
        assert len(results[0]) <= len(PROMPT) + 3


def test_rejects_bad_prompts():
    with pytest.raises(AssertionError, match="list of ints"):
        list(engine().generate([], max_tokens=3))
    with pytest.raises(ValueError, match="sequence_len"):
        list(engine().generate(list(range(200)), max_tokens=None))


def test_max_tokens_none_stops_when_cache_is_full():
    model = BigramModel({}, default=ord("a"))  # never terminates
    steps = list(Engine(model, ByteTokenizer()).generate(PROMPT, temperature=0.0))
    assert len(steps) == model.config.sequence_len - len(PROMPT)

# --- calculator tool


def test_use_calculator():
    assert use_calculator("1,234 + 1") == 1235
    assert use_calculator("10/4") == 2.5
    assert use_calculator("2**8") is None
    assert use_calculator("10/0") is None
    assert use_calculator("'strawberry'.count('r')") == 3
    assert use_calculator("len('abc')") is None
    assert use_calculator("'directory'.count('r')") is None  # blocklist is a substring match
    assert use_calculator("__import__('os')") is None
    assert use_calculator("'a'.count('a'); 1") is None  # ';' is not allowed
    assert use_calculator("") is None


def test_calculator_timeout_on_main_and_background_threads():
    # ~2-3 s of pure-Python looping with no builtins (not reachable via use_calculator)
    slow = "[0 for a in '1' * 20000 for b in '1' * 20000 if 0]"
    assert eval_with_timeout(slow, max_time=1) is None
    box = {}
    t = threading.Thread(target=lambda: box.update(v=eval_with_timeout(slow, max_time=1), ok=eval_with_timeout("6*7")))
    t.start()
    t.join(10)
    assert not t.is_alive() and box == {"v": None, "ok": 42}


def tool_script():
    # prompt ends in 'o' -> python_start, "2+3", python_end; then the forced "<output>5</output>"; then end
    return {ord("o"): PYTHON_START, PYTHON_START: ord("2"), ord("2"): ord("+"), ord("+"): ord("3"),
            ord("3"): PYTHON_END, OUTPUT_END: ASSISTANT_END}


def test_tool_call_forces_calculator_output_with_mask_zero():
    e = Engine(BigramModel(tool_script()), ByteTokenizer())
    steps = list(e.generate(PROMPT, max_tokens=20, temperature=0.0))
    tokens = [c[0] for c, _ in steps]
    masks = [m[0] for _, m in steps]
    assert tokens == [PYTHON_START, ord("2"), ord("+"), ord("3"), PYTHON_END,
                      OUTPUT_START, ord("5"), OUTPUT_END, ASSISTANT_END]
    assert masks == [1, 1, 1, 1, 1, 0, 0, 0, 1]
    results, rmasks = e.generate_batch(PROMPT, max_tokens=20, temperature=0.0)
    assert results[0] == PROMPT + tokens[:-1]  # the terminator is dropped
    assert rmasks[0] == [0] * len(PROMPT) + masks[:-1]
    # forced tokens count toward max_tokens
    assert len(list(e.generate(PROMPT, max_tokens=7, temperature=0.0))) == 7


def test_failed_calculation_injects_nothing_and_python_end_outside_block_is_ignored():
    script = {ord("o"): PYTHON_START, PYTHON_START: ord("1"), ord("1"): ord("/"), ord("/"): ord("0"),
              ord("0"): PYTHON_END, PYTHON_END: PYTHON_END}
    steps = list(Engine(BigramModel(script), ByteTokenizer()).generate(PROMPT, max_tokens=8, temperature=0.0))
    assert [m[0] for _, m in steps] == [1] * 8
    assert [c[0] for c, _ in steps][4:] == [PYTHON_END] * 4


def test_generate_batch_stops_rows_at_terminators():
    results, masks = Engine(BigramModel({ord("o"): ord("!"), ord("!"): BOS}), ByteTokenizer()).generate_batch(
        PROMPT, num_samples=3, max_tokens=10, temperature=0.0)
    assert results == [PROMPT + [ord("!")]] * 3 and masks == [[0] * 6 + [1]] * 3

# --- the same against a real tiny GPT


def test_real_gpt_engine_matches_reference_generate():
    model = tiny_gpt()
    e = Engine(model, ChatByteTokenizer())
    prompt = [261] + list("The water".encode())
    ref = list(model.generate(prompt, max_tokens=12, temperature=0.0))
    got = [c[0] for c, _ in e.generate(prompt, max_tokens=12, temperature=0.0)]
    n = min(len(ref), len(got))
    assert n > 0 and got[:n] == ref[:n]


def test_real_gpt_determinism_samples_and_bounds():
    model = tiny_gpt()
    e = Engine(model, ChatByteTokenizer())
    prompt = [261] + list("Hi there".encode())
    a = e.generate_batch(prompt, num_samples=4, max_tokens=8, temperature=1.0, seed=7)
    b = e.generate_batch(prompt, num_samples=4, max_tokens=8, temperature=1.0, seed=7)
    assert a == b and len(a[0]) == 4
    assert all(len(r) - len(prompt) <= 8 for r in a[0])
    greedy = [e.generate_batch(prompt, max_tokens=8, temperature=0.0, seed=s)[0] for s in (1, 2, 3)]
    assert greedy[0] == greedy[1] == greedy[2]
    # the engine also accepts the model reporting its device as a string
    model.get_device = lambda: "cpu"
    assert e.generate_batch(prompt, max_tokens=8, temperature=0.0)[0] == greedy[0]


def test_real_gpt_tool_call_forcing():
    """Steer a real GPT through python_start 6*7 python_end: the engine must inject
    <output_start>42<output_end> with mask 0 and feed it through the real forward."""
    model = tiny_gpt()
    tok = ChatByteTokenizer()
    expr = list("6*7".encode())
    e = Engine(ScriptedGPT(model, [PYTHON_START] + expr + [PYTHON_END]), tok)
    steps = list(e.generate([261, 72], max_tokens=10, temperature=0.0))
    tokens, masks = [c[0] for c, _ in steps], [m[0] for _, m in steps]
    assert tokens[:5] == [PYTHON_START] + expr + [PYTHON_END]
    assert tokens[5:9] == [OUTPUT_START, ord("4"), ord("2"), OUTPUT_END] and masks[5:9] == [0, 0, 0, 0]


class ScriptedGPT:
    """A real GPT whose first logits are overridden by a script: the real forward (and KV cache)
    still runs on every token, including the forced ones."""

    def __init__(self, model, script):
        self.model, self.script, self.step = model, script, 0
        self.config = model.config

    def get_device(self):
        return self.model.get_device()

    def forward(self, ids, kv_cache=None):
        logits = self.model.forward(ids, kv_cache=kv_cache)
        if self.step < len(self.script):
            logits[:, -1, self.script[self.step]] = 1e4
        self.step += 1
        return logits


def test_engine_matches_reference_generate_on_a_saved_checkpoint(tmp_path):
    """A checkpoint and tokenizer saved and loaded back: the Engine's greedy tokens equal the model's naive
    reference generate (the KV cache changes speed, not results)."""
    from serve_doubles import byte_level_tokenizer

    from nanopipe.model.checkpoint import load_model, save_checkpoint
    from nanopipe.tokenizer import load_tokenizer

    byte_level_tokenizer().save(tmp_path / "tokenizer")
    tok = load_tokenizer(tmp_path / "tokenizer")
    save_checkpoint(tmp_path / "base", tiny_gpt(vocab_size=tok.get_vocab_size()), meta={"step": 0})
    model, _ = load_model(tmp_path / "base", "cpu", phase="eval", tokenizer=tok)
    prompt = tok.encode("The chemical formula of water is", prepend=tok.get_bos_token_id())
    reference = list(model.generate(prompt, 12, temperature=0.0))
    rows, _, stopped = Engine(model, tok).generate_rows(prompt, num_samples=1, max_tokens=12, temperature=0.0)
    ours = rows[0][len(prompt):]
    # the Engine stops at <|assistant_end|>/<|bos|> (left out of the row); the reference always runs 12 tokens
    assert ours == reference[:len(ours)] and (len(ours) == 12 or stopped[0])
