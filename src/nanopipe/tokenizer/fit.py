"""Work function of the `tokenizer` stage (nanochat scripts/tok_train.py @1ec0a34).

Feeds the trainer a bounded stream of documents: each truncated to `doc_cap` characters,
stopping once more than `max_chars` characters have been yielded (checked after the
yield, so the last document is included, as in tok_train). Returns the tokenizer and the
stats tok_train logs in its report section. Saving is the caller's job (`Tokenizer.save`).
"""
from __future__ import annotations

import itertools
import time
from typing import Iterable

from nanopipe.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer, resolve_trainer

# tok_train's round-trip sanity check: ASCII, numbers, contractions, symbols, CJK, emoji
ROUNDTRIP_SAMPLE = """Hello world! This is a test.
Numbers: 123, 4567, 89
Contractions: I'm, you're, it's
Special chars: @#$%^&*()
Unicode: 你好世界 🌍"""


def capped_documents(texts: Iterable, max_chars: int, doc_cap: int, counts: dict):
    """Yield documents truncated to doc_cap; stop after the total exceeds max_chars.
    `texts` may yield str documents or batches (lists) of them, e.g. parquet row groups.
    Running totals go into `counts` (docs, chars, truncated) as the trainer consumes."""
    for item in texts:
        batch = item if isinstance(item, (list, tuple)) else (item,)
        for doc in batch:
            if not isinstance(doc, str):
                raise ValueError(f"training text must be str documents, got {type(doc).__name__} "
                                 f"(document {counts['docs']})")
            if len(doc) > doc_cap:
                doc = doc[:doc_cap]
                counts["truncated"] += 1
            counts["docs"] += 1
            counts["chars"] += len(doc)
            yield doc
            if counts["chars"] > max_chars:
                return


def token_bytes_stats(token_bytes) -> dict:
    """min/max/mean/std of the non-zero entries (tok_train's report fields)."""
    nz = token_bytes[token_bytes > 0].float()
    return {
        "token_bytes_min": int(nz.min().item()),
        "token_bytes_max": int(nz.max().item()),
        "token_bytes_mean": float(nz.mean().item()),
        "token_bytes_std": float(nz.std().item()),
    }


def compute_token_bytes(tokenizer: Tokenizer):
    """int32 [vocab]: raw byte length per token, 0 for specials (docs/decisions.md, D5)."""
    return tokenizer.token_bytes()


def fit_tokenizer(texts_iter: Iterable, vocab_size: int, max_chars: int = 2_000_000_000,
                  doc_cap: int = 10_000, trainer: str = "auto") -> tuple[Tokenizer, dict]:
    """Train the BPE tokenizer on a capped stream of documents. Returns (tokenizer, stats)."""
    for name, value in (("vocab_size", vocab_size), ("max_chars", max_chars), ("doc_cap", doc_cap)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"tokenizer.{name} must be a positive int, got {value!r}")
    trainer = resolve_trainer(trainer)
    counts = {"docs": 0, "chars": 0, "truncated": 0}
    docs = capped_documents(texts_iter, max_chars, doc_cap, counts)
    first = next(docs, None)
    if first is None:
        raise ValueError("no training text: the document iterator yielded nothing (is the train split empty?)")
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(itertools.chain([first], docs), vocab_size, trainer=trainer)
    train_time = time.perf_counter() - t0
    print(f"Training time: {train_time:.2f}s ({counts['chars']:,} chars, {counts['docs']:,} docs, trainer {trainer})")

    decoded = tokenizer.decode(tokenizer.encode(ROUNDTRIP_SAMPLE))
    if decoded != ROUNDTRIP_SAMPLE:
        raise RuntimeError(f"tokenizer round-trip check failed: decode(encode(sample)) gave {decoded!r}")

    token_bytes = compute_token_bytes(tokenizer)
    stats = {
        "max_chars": max_chars,
        "doc_cap": doc_cap,
        "vocab_size": vocab_size,
        "trainer": trainer,
        "train_time": train_time,
        "train_docs": counts["docs"],
        "train_chars": counts["chars"],
        "truncated_docs": counts["truncated"],
        "num_special_tokens": len(SPECIAL_TOKENS),
        **token_bytes_stats(token_bytes),
    }
    return tokenizer, stats
