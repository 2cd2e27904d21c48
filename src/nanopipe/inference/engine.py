"""
Inference engine: KV-cached sampling with the calculator tool (nanochat's engine.py). Below training,
evaluation and serving alike: SFT's probes, RL's rollouts, chat_eval, the server and `nanopipe chat`
all decode through it.

Everything here works on token ids; the tokenizer is only used to resolve the special
tokens and to decode/encode calculator expressions and results. The model contract
(nanopipe.model.gpt.GPT, or any double with the same surface):
    model.get_device() -> torch.device (a device string is accepted too)
    model.config with n_kv_head, n_head, n_embd, n_layer, sequence_len
    model.forward(ids[B, T], kv_cache=KVCache) -> float logits [B, T, V], advancing the cache by T

Engine.generate prefills the prompt once (batch 1) and broadcasts the cache to
num_samples rows; every row then samples its own tokens. Engine.generate_rows/generate_batch
are the non-streaming wrappers (RL's rollouts, chat_eval's generative tasks, SFT's probes).
"""
import signal
import threading
import warnings
from collections import deque
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from nanopipe.model.kv_cache import (
    KVCache,  # re-exported: nanochat's engine module owned it
)

__all__ = ["KVCache", "sample_next_token", "RowState", "use_calculator", "eval_with_timeout",
           "timeout", "Engine", "kv_cache_dtype", "TextStream"]

# -----------------------------------------------------------------------------
# Calculator tool


@contextmanager
def timeout(duration, formula):
    """SIGALRM-based wall-clock limit (main thread only); the caller disarms on error."""
    def handler(signum, frame):
        raise Exception(f"'{formula}': timed out after {duration} seconds")
    signal.signal(signal.SIGALRM, handler)
    signal.alarm(duration)
    yield
    signal.alarm(0)


def _eval(formula):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        return eval(formula, {"__builtins__": {}}, {})


def eval_with_timeout(formula, max_time=3):
    """Evaluate a (pre-screened) expression with empty builtins; None on any error or timeout.

    SIGALRM only works on the main thread. The server decodes on a background thread, where
    nanochat's version would silently return None for every expression; there we evaluate
    in a daemon thread and give up after max_time seconds instead (a runaway evaluation
    keeps its thread but cannot block decoding).
    """
    if threading.current_thread() is threading.main_thread():
        try:
            with timeout(max_time, formula):
                return _eval(formula)
        except Exception:
            signal.alarm(0)
            return None
    box = {}

    def target():
        try:
            box["value"] = _eval(formula)
        except Exception:
            pass
    worker = threading.Thread(target=target, daemon=True, name="calculator")
    worker.start()
    worker.join(max_time)
    if worker.is_alive():
        return None
    return box.get("value")


_BLOCKED = ["__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input",
            "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr"]
_MATH_CHARS = set("0123456789*+-/.() ")
_STRING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")


def use_calculator(expr):
    """Evaluate arithmetic, or a string's .count(...), as the model's tool call. None = refused."""
    expr = expr.replace(",", "")  # "1,000" -> "1000"
    if all(c in _MATH_CHARS for c in expr):
        if "**" in expr:  # no exponentiation: 9**9**9 would hang the process
            return None
        return eval_with_timeout(expr)
    if not all(c in _STRING_CHARS for c in expr):
        return None
    lowered = expr.lower()
    # plain substring match, so harmless literals like 'directory' are refused too (kept as in nanochat)
    if any(word in lowered for word in _BLOCKED):
        return None
    if ".count(" not in expr:
        return None
    return eval_with_timeout(expr)

# -----------------------------------------------------------------------------
# Sampling and per-row state


def _draw(probs, rng):
    """One index per row of probs (B, K), by inverting the CDF at one uniform per row: the same
    distribution as torch.multinomial, whose CPU kernel draws K exponentials per row (~90 us a
    row at K=4096, a tenth of a decode step)."""
    u = torch.rand((probs.size(0), 1), generator=rng, device=probs.device, dtype=probs.dtype)
    cdf = probs.cumsum(dim=-1)
    u = u * cdf[:, -1:]  # the row's total, so rounding in the sum never leaves u past the end
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.size(-1) - 1)


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """Sample one token per row from logits (B, V) -> (B, 1). Temperature 0 is greedy."""
    assert temperature >= 0.0, "temperature must be non-negative"
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        return idx.gather(1, _draw(probs, rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return _draw(probs, rng)


class RowState:
    """Decode state of one sample: its tokens, pending forced tokens and the tool-call buffer."""

    def __init__(self, current_tokens=None):
        self.current_tokens = current_tokens or []
        self.forced_tokens = deque()  # tokens that must come next (calculator output)
        self.in_python_block = False
        self.python_expr_tokens = []
        self.completed = False


class ToolTokens:
    """The special-token ids the decode loop reacts to, resolved once per tokenizer."""

    def __init__(self, tokenizer):
        get = tokenizer.encode_special
        self.python_start = get("<|python_start|>")
        self.python_end = get("<|python_end|>")
        self.output_start = get("<|output_start|>")
        self.output_end = get("<|output_end|>")
        self.assistant_end = get("<|assistant_end|>")
        self.bos = tokenizer.get_bos_token_id()


def step_row(state, sampled_token, tokenizer, special):
    """Pick the row's next token (a forced one wins over the sample), update the tool state
    machine, and return (token, mask) with mask 1 = sampled, 0 = forced.

    Shared by Engine.generate and the serving scheduler so both decode identically."""
    forced = len(state.forced_tokens) > 0
    token = state.forced_tokens.popleft() if forced else sampled_token
    state.current_tokens.append(token)
    if token == special.assistant_end or token == special.bos:
        state.completed = True
    if token == special.python_start:
        state.in_python_block = True
        state.python_expr_tokens = []
    elif token == special.python_end and state.in_python_block:
        state.in_python_block = False
        if state.python_expr_tokens:
            expr = tokenizer.decode(state.python_expr_tokens)
            result = use_calculator(expr)
            if result is not None:
                state.forced_tokens.append(special.output_start)
                state.forced_tokens.extend(tokenizer.encode(str(result)))
                state.forced_tokens.append(special.output_end)
        state.python_expr_tokens = []
    elif state.in_python_block:
        state.python_expr_tokens.append(token)
    return token, (0 if forced else 1)


def kv_cache_dtype(device, model=None):
    """K/V are stored in the dtype attention computes in: the autocast dtype when autocast is on
    for this device type (bf16 on CUDA as nanopipe runs it), else the model's weight dtype. CPU
    decodes without autocast (see `decode_forward`)."""
    if device.type != "cpu" and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    weight = getattr(getattr(model, "lm_head", None), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return torch.float32

def decode_forward(model, ids, kv_cache, device):
    """model.forward with the KV cache. On CPU, small-batch decode is bound by reading the weights,
    and bf16 autocast adds a cast of every weight per step (bench_engine, batch 1: 292 tok/s under
    autocast vs 407 without), so CPU decodes in the weights' dtype even where training uses bf16."""
    with torch.autocast("cpu", enabled=False) if device.type == "cpu" else nullcontext():
        return model.forward(ids, kv_cache=kv_cache)


# -----------------------------------------------------------------------------
# Engine


class Engine:

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Stream (token_column, token_masks) per decode step, one entry per sample.

        Rows keep producing (ignorable) tokens after they complete; the terminator itself is
        yielded. Stops after max_tokens steps, once every row completed, or when the KV cache
        is full (max_tokens=None sizes it to the model's sequence_len)."""
        assert isinstance(tokens, list) and len(tokens) > 0 and isinstance(tokens[0], int), "expecting list of ints"
        model, tokenizer = self.model, self.tokenizer
        device = torch.device(model.get_device())  # doubles may report a string
        dtype = kv_cache_dtype(device, model)
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        special = ToolTokens(tokenizer)

        m = model.config
        kv_kwargs = dict(num_heads=m.n_kv_head, head_dim=m.n_embd // m.n_head, num_layers=m.n_layer)
        if max_tokens is not None and max_tokens <= 0:
            return
        capacity = len(tokens) + max_tokens if max_tokens is not None else m.sequence_len
        if len(tokens) >= capacity:
            raise ValueError(f"prompt of {len(tokens)} tokens leaves no room to generate: the KV cache holds "
                             f"{capacity} tokens (model sequence_len={m.sequence_len}); pass max_tokens or shorten the prompt")
        limit = capacity - len(tokens)  # == max_tokens when given

        # prefill the prompt once, batch 1
        prefill_cache = KVCache(batch_size=1, seq_len=len(tokens), device=device, dtype=dtype, **kv_kwargs)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = decode_forward(model, ids, prefill_cache, device)
        # every row draws its own first token from the same distribution
        logits = logits[:, -1, :].expand(num_samples, -1)

        # replicate the prompt's cache into num_samples rows (prefill broadcasts over batch)
        decode_cache = KVCache(batch_size=num_samples, seq_len=capacity, device=device, dtype=dtype, **kv_kwargs)
        decode_cache.prefill(prefill_cache)
        del prefill_cache

        rows = [RowState(tokens.copy()) for _ in range(num_samples)]
        num_generated = 0
        while num_generated < limit and not all(row.completed for row in rows):
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled):
                token, mask = step_row(row, token, tokenizer, special)
                column.append(token)
                masks.append(mask)
            yield column, masks
            num_generated += 1
            if num_generated >= limit or all(row.completed for row in rows):
                break  # nanochat does one more (wasted) forward here; the output is the same
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = decode_forward(model, ids, decode_cache, device)[:, -1, :]

    def generate_rows(self, tokens, num_samples=1, keep_stop=False, **kwargs):
        """Non-streaming: (rows, masks, stopped). Each row is the prompt + its generated tokens, up to
        <|assistant_end|> or <|bos|>; masks are 0 over the prompt and forced tokens, 1 over sampled ones;
        stopped[i] says whether row i ended by sampling a stop token. keep_stop=True keeps that token
        (sampled, mask 1) at the end of the row: RL trains on it, so stopping is reinforced too."""
        special = ToolTokens(self.tokenizer)
        stop = (special.assistant_end, special.bos)
        rows = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        stopped = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if stopped[i]:
                    continue  # rows keep producing ignorable tokens after they finish
                stopped[i] = token in stop
                if keep_stop or not stopped[i]:
                    rows[i].append(token)
                    masks[i].append(mask)
            if all(stopped):
                break
        return rows, masks, stopped

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """(rows, masks) of `generate_rows`, stop tokens left out (what evaluation grades)."""
        rows, masks, _ = self.generate_rows(tokens, num_samples, **kwargs)
        return rows, masks


# -----------------------------------------------------------------------------
# Streaming detokenization


class TextStream:
    """Turns a token stream into text deltas without ever emitting half a UTF-8 character.

    A token can end in the middle of a multi-byte character; its decode then ends in U+FFFD.
    Such tokens are held back until the character completes (nanochat's rule). Only the
    tokens since the last clean boundary are re-decoded, which is equivalent for byte-level
    BPE and keeps long replies linear. More than 8 held tokens cannot be a partial
    character (at most 3 bytes are ever missing), so they are released as they are.
    """

    MAX_HELD = 8

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.held = []

    def push(self, token):
        self.held.append(token)
        text = self.tokenizer.decode(self.held)
        if text.endswith("\ufffd") and len(self.held) < self.MAX_HELD:
            return ""
        self.held = []
        return text

    def flush(self):
        """Whatever is still held (invalid bytes decode to U+FFFD) at the end of a reply."""
        text = self.tokenizer.decode(self.held) if self.held else ""
        self.held = []
        return text
