"""The `tokenizer` stage (nanochat's tok_train.py): byte-level BPE fitted on the train shards.

Trained on the train shards only (never the validation shard); saved to models/tokenizer/
(tokenizer.json + token_bytes.pt, the bytes of every token that bits-per-byte divides by).
"""
from __future__ import annotations

from nanopipe import paths
from nanopipe.data.shards import iter_texts, read_manifest, split_paths
from nanopipe.stage import Stage
from nanopipe.tokenizer.fit import fit_tokenizer

PARAMS = ["tokenizer.vocab_size", "tokenizer.max_chars", "tokenizer.doc_cap", "tokenizer.trainer"]


def run(st: Stage) -> None:
    t = st.cfg.tokenizer
    train, _ = split_paths(read_manifest())
    tokenizer, stats = fit_tokenizer(iter_texts(train), t.vocab_size, t.max_chars, t.doc_cap, t.trainer)
    tokenizer.save(paths.TOKENIZER)
    rows = "\n".join(f"| {k} | {v:,.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in stats.items())
    st.finish(stats, "| key | value |\n|---|---|\n" + rows)
