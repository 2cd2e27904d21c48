"""Byte-level BPE tokenizer (fit with a native trainer, encode with tiktoken), chat rendering,
and the work functions of the `tokenizer` and `tok_eval` stages (fit.py, evaluate.py)."""
from nanopipe.tokenizer.bpe import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    load_token_bytes,
    load_tokenizer,
)
from nanopipe.tokenizer.chat import render_conversation, render_for_completion, visualize_tokenization

__all__ = [
    "SPECIAL_TOKENS",
    "SPLIT_PATTERN",
    "Tokenizer",
    "load_token_bytes",
    "load_tokenizer",
    "render_conversation",
    "render_for_completion",
    "visualize_tokenization",
]
