"""Test doubles for the serving tests and tiny real models."""
from dataclasses import dataclass

import torch

# ByteTokenizer ids: 0-255 raw bytes, then the specials (the first six as in nanochat's tests)
SPECIALS = ["<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|assistant_end|>",
            "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>"]
PYTHON_START, PYTHON_END, OUTPUT_START, OUTPUT_END, ASSISTANT_END, BOS = 256, 257, 258, 259, 260, 261
PROMPT = [261, 72, 101, 108, 108, 111]  # BOS + "Hello"


@dataclass
class MockConfig:
    n_kv_head: int = 4
    n_head: int = 4
    n_embd: int = 64
    n_layer: int = 2
    sequence_len: int = 128
    vocab_size: int = 262


class MockModel:
    """Uniform (all-zero) logits; advances the cache like the real attention would.
    Reports its device as a STRING on purpose: the Engine must normalise it (docs/decisions.md, D8)."""

    def __init__(self, vocab_size=262):
        self.vocab_size = vocab_size
        self.config = MockConfig(vocab_size=vocab_size)

    def get_device(self):
        return "cpu"

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if kv_cache is not None:
            kv_cache.advance(T)
        return torch.zeros(B, T, self.vocab_size)


class BigramModel(MockModel):
    """Deterministic script: the next token is table[last input token] (argmax at temperature 0)."""

    def __init__(self, table, vocab_size=262, default=ord("x"), strength=30.0):  # noqa: B008 (a constant)
        super().__init__(vocab_size)
        self.table, self.default, self.strength = table, default, strength

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.table.get(int(ids[b, t]), self.default)] = self.strength
        return logits


class ByteTokenizer:
    """0-255 = UTF-8 bytes; specials after them. decode drops specials (as in nanochat's tests)."""

    def __init__(self, specials=SPECIALS[:6]):
        self.special = {name: 256 + i for i, name in enumerate(specials)}

    def get_vocab_size(self):
        return 256 + len(self.special)

    def encode_special(self, s):
        return self.special[s]

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def encode(self, s, prepend=None):
        ids = [] if prepend is None else [prepend if isinstance(prepend, int) else self.special[prepend]]
        return ids + list(s.encode("utf-8"))

    def decode(self, ids):
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")

    def get_special_tokens(self):
        return set(self.special)

    def id_to_bytes(self, id):
        """A token's raw bytes (a special token: its name, as tiktoken gives it)."""
        if id < 256:
            return bytes([id])
        return next(name for name, i in self.special.items() if i == id).encode()


class ChatByteTokenizer(ByteTokenizer):
    """ByteTokenizer with the chat specials (user/assistant turns) the server and CLI need."""

    def __init__(self):
        super().__init__(SPECIALS)


def tiny_gpt(vocab_size=265, sequence_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL",
             seed=0, scale=0.5):
    """A real nanopipe GPT with random (not zero-init) weights so attention matters."""
    from nanopipe.model.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=window_pattern)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lambdas" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * scale / max(1, p.shape[-1]) ** 0.5 * 4)
    model.eval()
    return model


def suppress_terminators(model, token_ids):
    """Make the given tokens (nearly) never the argmax: zero their lm_head rows so their logit is 0
    while some other logit is almost surely positive. Keeps greedy streams long in tests."""
    with torch.no_grad():
        for t in token_ids:
            model.lm_head.weight[t].zero_()
    return model


ASSISTANT_START = 264


def scripted_reply_model(text, vocab_size=265):
    """A BigramModel that answers any chat prompt with exactly `text`, one UTF-8 byte per token,
    then <|assistant_end|>. The bytes of `text` must be distinct."""
    seq = [ASSISTANT_START] + list(text.encode("utf-8")) + [ASSISTANT_END]
    assert len(set(seq[:-1])) == len(seq) - 1, "script bytes must be unique"
    return BigramModel({a: b for a, b in zip(seq, seq[1:])}, vocab_size=vocab_size)


def byte_level_tokenizer():
    """The real nanopipe Tokenizer with no merges: 256 byte tokens + the 9 specials (vocab 265)."""
    from nanopipe.tokenizer import Tokenizer
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)})


class SlowModel(MockModel):
    """Uniform logits after `delay` seconds per forward, with a 4096-token context: a greedy reply
    (token 0 forever) that takes minutes, to have a stream in flight for as long as a test needs."""

    def __init__(self, delay=0.05, vocab_size=265):
        super().__init__(vocab_size)
        self.config.sequence_len = 4096
        self.delay = delay

    def forward(self, ids, kv_cache=None):
        import time
        time.sleep(self.delay)
        return super().forward(ids, kv_cache)


def serve_in_thread(app):
    """Run `app` under uvicorn on a free port in a thread: (server, thread, base URL)."""
    from nanopipe.serving.app import run_in_thread

    server, thread, port = run_in_thread(app)
    return server, thread, f"http://127.0.0.1:{port}"


def stop_server(server, thread):
    server.should_exit = True
    thread.join(30)
