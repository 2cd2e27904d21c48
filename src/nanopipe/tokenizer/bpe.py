"""Byte-level BPE tokenizer: a native trainer for fitting, tiktoken for encoding.

Follows nanochat's RustBPETokenizer (nanochat nanochat/tokenizer.py @1ec0a34): the GPT-4 style
split pattern with 1-2 digit groups, 256 byte tokens plus learned merges, and the 9 special
tokens on top.
Differences, on purpose:
- persistence is a documented JSON file (`tokenizer.json`, below), not a pickle, so it
  loads in any process and is safe to read;
- `token_bytes.pt` holds each token's *raw* byte length (docs/decisions.md, D5), not the length of
  a lossy UTF-8 decode;
- lone surrogates in the input raise a clear error (tiktoken would silently replace them);
- `encode_special` only resolves special tokens and names the known ones otherwise.

tokenizer.json (format "nanopipe-bpe", version 1):
    {"format": "nanopipe-bpe", "version": 1,
     "pattern": <split regex>,
     "mergeable_ranks": [<base64 of the token's bytes>, ...],   # list index == rank == id
     "special_tokens": {"<|bos|>": 32759, ...},                  # name -> id
     "bos_token": "<|bos|>", "vocab_size": 32768}
"""
from __future__ import annotations

import base64
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiktoken

from nanopipe.artifacts import atomic_dir, require
from nanopipe.tokenizer import chat

SPECIAL_TOKENS = [
    "<|bos|>",  # every document / conversation starts with it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # assistant starts a tool call
    "<|python_end|>",
    "<|output_start|>",  # tool output fed back into the assistant turn
    "<|output_end|>",
]

# GPT-4's cl100k pattern except numbers split into groups of 1-2 digits (not 1-3).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # noqa: E501

FORMAT = "nanopipe-bpe"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
PRODUCER = "tokenizer"  # the pipeline stage that writes models/tokenizer/
TRAINERS = ("auto", "rustbpe", "tokenizers")


# -----------------------------------------------------------------------------
# training backends: each returns {token bytes: rank} with ranks 0..n-1, bytes 0..255 first

def _train_rustbpe(text_iterator, n_tokens: int) -> dict[bytes, int]:
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(text_iterator, n_tokens, pattern=SPLIT_PATTERN)
    return {bytes(k): v for k, v in trainer.get_mergeable_ranks()}


def _gpt2_byte_decoder() -> dict[str, int]:
    # HF ByteLevel maps each byte to a printable char (GPT-2's bytes_to_unicode); invert it.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _train_tokenizers(text_iterator, n_tokens: int) -> dict[bytes, int]:
    # HF `tokenizers` BpeTrainer configured as nanochat's HuggingFaceTokenizer.train_from_iterator
    # (nanochat nanochat/tokenizer.py @1ec0a34),
    # but without specials: we append those ourselves at the top of the vocab.
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = HFTokenizer(BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=n_tokens, show_progress=False, min_frequency=0,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text_iterator, trainer)
    # HF assigns ids to merged tokens in merge order, which is exactly tiktoken's rank order.
    byte_decoder = _gpt2_byte_decoder()
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    ranks = {bytes([b]): b for b in range(256)}
    for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        token = bytes(byte_decoder[c] for c in piece)
        if len(token) > 1:
            ranks[token] = len(ranks)
    return ranks


def resolve_trainer(trainer: str) -> str:
    """'auto' picks rustbpe (measured ~2-3x faster than tokenizers at equal compression,
    see bench/bench_tokenizer.py), falling back to tokenizers if rustbpe is not installed."""
    if trainer not in TRAINERS:
        raise ValueError(f"tokenizer trainer must be one of {TRAINERS}, got {trainer!r}")
    if trainer == "auto":
        try:
            import rustbpe  # noqa: F401
            return "rustbpe"
        except ImportError:
            return "tokenizers"
    return trainer


def _check_ranks(ranks: dict[bytes, int], where: str) -> None:
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"{where}: mergeable ranks must be exactly 0..{n - 1}")
    for b in range(256):
        if ranks.get(bytes([b])) is None:
            raise ValueError(f"{where}: byte token {b} is missing; a byte-level BPE needs all 256")


# -----------------------------------------------------------------------------

class Tokenizer:
    """nanochat's RustBPETokenizer API over a `tiktoken.Encoding`."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str):
        self.enc = enc
        self.bos_token = bos_token
        self._special = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}  # name -> id
        # Encoding through the core directly lets a lone surrogate raise instead of being
        # silently replaced by U+FFFD (tiktoken's Encoding.encode_ordinary does that).
        self._core = getattr(enc, "_core_bpe", None)
        self.bos_token_id = self.encode_special(bos_token)

    # --- construction -------------------------------------------------------

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                   special_tokens=SPECIAL_TOKENS, name: str = "nanopipe") -> "Tokenizer":
        """Build from {bytes: rank}; specials get the ids right after the last rank."""
        _check_ranks(mergeable_ranks, "Tokenizer.from_ranks")
        offset = len(mergeable_ranks)
        specials = {s: offset + i for i, s in enumerate(special_tokens)}
        enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                special_tokens=specials)
        return cls(enc, "<|bos|>")

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size: int, trainer: str = "auto") -> "Tokenizer":
        """Learn `vocab_size - 9` byte-level BPE tokens from an iterator of strings; the 9
        special tokens take the last ids. trainer: auto | rustbpe | tokenizers."""
        n_tokens = vocab_size - len(SPECIAL_TOKENS)
        if n_tokens < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
        trainer = resolve_trainer(trainer)
        train = _train_rustbpe if trainer == "rustbpe" else _train_tokenizers
        ranks = train(text_iterator, n_tokens)
        if len(ranks) != n_tokens:
            raise ValueError(f"the {trainer} trainer learned only {len(ranks) - 256} merges, {n_tokens - 256} "
                             f"needed for vocab_size={vocab_size}: the training text is too small or too "
                             f"repetitive; lower tokenizer.vocab_size or provide more text")
        return cls.from_ranks(ranks)

    @classmethod
    def from_pretrained(cls, tiktoken_name: str) -> "Tokenizer":
        """A tiktoken encoding by name (tok_eval baselines: 'gpt2', 'cl100k_base'); BOS is <|endoftext|>.
        Needs network access or a populated tiktoken cache (TIKTOKEN_CACHE_DIR)."""
        return cls(tiktoken.get_encoding(tiktoken_name), "<|endoftext|>")

    @classmethod
    def from_directory(cls, tokenizer_dir: str | os.PathLike) -> "Tokenizer":
        path = require(Path(tokenizer_dir) / TOKENIZER_FILE, PRODUCER)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid tokenizer file ({e}); re-run the `{PRODUCER}` stage") from e
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} tokenizer file (format={spec.get('format') if isinstance(spec, dict) else None!r})")
        if spec.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: tokenizer format version {spec.get('version')!r} is not supported "
                             f"(this code reads version {FORMAT_VERSION}); re-run the `{PRODUCER}` stage")
        try:
            ranks = {base64.b64decode(t, validate=True): i for i, t in enumerate(spec["mergeable_ranks"])}
            if len(ranks) != len(spec["mergeable_ranks"]):
                raise ValueError("duplicate token bytes in mergeable_ranks")
            _check_ranks(ranks, str(path))
            specials = {str(k): int(v) for k, v in spec["special_tokens"].items()}
            if any(0 <= v < len(ranks) for v in specials.values()):
                raise ValueError("special token ids overlap the mergeable ranks")
            enc = tiktoken.Encoding(name=spec.get("name", "nanopipe"), pat_str=spec["pattern"],
                                    mergeable_ranks=ranks, special_tokens=specials)
            tok = cls(enc, spec["bos_token"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt tokenizer file: {type(e).__name__}: {e}; re-run the `{PRODUCER}` stage") from e
        if "vocab_size" in spec and tok.get_vocab_size() != spec["vocab_size"]:
            raise ValueError(f"{path}: vocab_size field says {spec['vocab_size']} but the file holds {tok.get_vocab_size()} tokens")
        return tok

    # --- persistence --------------------------------------------------------

    def to_json(self) -> dict:
        ranks = self.enc._mergeable_ranks
        by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.enc.name,
            "pattern": self.enc._pat_str,
            "bos_token": self.bos_token,
            "vocab_size": self.get_vocab_size(),
            "special_tokens": dict(sorted(self._special.items(), key=lambda kv: kv[1])),
            "mergeable_ranks": [base64.b64encode(b).decode("ascii") for b, _ in by_rank],
        }

    def save(self, tokenizer_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json and token_bytes.pt. The directory is replaced as a whole, in
        one rename, so a reader sees either the old tokenizer or the new one, never a mix."""
        import torch

        tokenizer_dir = Path(tokenizer_dir)
        with atomic_dir(tokenizer_dir) as tmp:
            (tmp / TOKENIZER_FILE).write_text(json.dumps(self.to_json()) + "\n", encoding="utf-8")
            torch.save(self.token_bytes(), tmp / TOKEN_BYTES_FILE)
        print(f"Saved tokenizer to {tokenizer_dir / TOKENIZER_FILE}")
        return tokenizer_dir

    def token_bytes(self):
        """int32 tensor [vocab]: raw byte length of each token, 0 for special tokens.
        Raw bytes (docs/decisions.md, D5): a token holding part of a UTF-8 character counts its real
        length, not the 3 bytes of the U+FFFD that decoding it alone would give."""
        import torch

        lengths = [0] * self.get_vocab_size()
        for token, rank in self.enc._mergeable_ranks.items():
            lengths[rank] = len(token)
        return torch.tensor(lengths, dtype=torch.int32)

    # --- queries ------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab  # includes the special tokens

    def get_special_tokens(self) -> set[str]:
        return self.enc.special_tokens_set

    def id_to_token(self, id: int) -> str:
        return self.enc.decode([id])  # lossy for tokens that hold part of a UTF-8 character

    def id_to_bytes(self, id: int) -> bytes:
        return self.enc.decode_single_token_bytes(id)

    def encode_special(self, text: str) -> int:
        try:
            return self._special[text]
        except (KeyError, TypeError):
            raise ValueError(f"unknown special token {text!r}; known: {sorted(self._special, key=self._special.get)}") from None

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    # --- encode / decode ----------------------------------------------------

    def _encode_one(self, text: str) -> list[int]:
        if self._core is None:  # future tiktoken without the core attribute: check explicitly
            text.encode("utf-8")
            return self.enc.encode_ordinary(text)
        return self._core.encode_ordinary(text)

    def _encode_checked(self, text: str, index: int | None = None) -> list[int]:
        try:
            return self._encode_one(text)
        except UnicodeEncodeError as e:
            where = "" if index is None else f" (list item {index})"
            pos = getattr(e, "start", None)
            detail = f" {text[pos]!r} at index {pos}" if isinstance(pos, int) and 0 <= pos < len(text) else ""
            raise ValueError(f"cannot encode text{where}: it contains a lone surrogate code point{detail}, "
                             f"which is not valid Unicode; fix the input (e.g. decode bytes with "
                             f"errors='replace')") from None

    def _special_id(self, x, what: str) -> int:
        if isinstance(x, str):
            return self.encode_special(x)
        if isinstance(x, int) and 0 <= x < self.get_vocab_size():
            return x
        raise ValueError(f"{what} must be a token id in [0, {self.get_vocab_size()}) or a special token name, got {x!r}")

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int]; list[str] -> list[list[int]] (encoded on `num_threads` threads).
        `prepend`/`append` (an id or a special token name) go on each sequence. Special-token
        text inside the input is encoded as ordinary text, so rendering cannot be injected."""
        pre = None if prepend is None else self._special_id(prepend, "prepend")
        post = None if append is None else self._special_id(append, "append")
        if isinstance(text, str):
            rows, single = [self._encode_checked(text)], True
        elif isinstance(text, list):
            for i, t in enumerate(text):
                if not isinstance(t, str):
                    raise ValueError(f"encode: list item {i} is {type(t).__name__}, expected str")
            single = False
            if num_threads <= 1 or len(text) <= 1:
                rows = [self._encode_checked(t, i) for i, t in enumerate(text)]
            else:  # tiktoken's core releases the GIL, so threads run in parallel
                with ThreadPoolExecutor(num_threads) as ex:
                    rows = list(ex.map(self._encode_checked, text, range(len(text))))
        else:
            raise ValueError(f"encode: expected str or list[str], got {type(text).__name__}")
        for row in rows:
            if pre is not None:
                row.insert(0, pre)
            if post is not None:
                row.append(post)
        return rows[0] if single else rows

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids) -> str:
        return self.enc.decode(ids)

    # --- chat rendering (nanopipe.tokenizer.chat) ----------------------------

    def render_conversation(self, conversation, max_tokens: int = 2048):
        return chat.render_conversation(self, conversation, max_tokens)

    def render_for_completion(self, conversation, max_tokens: int = 2048):
        return chat.render_for_completion(self, conversation, max_tokens)

    def visualize_tokenization(self, ids, mask, with_token_id: bool = False) -> str:
        return chat.visualize_tokenization(self, ids, mask, with_token_id)


# -----------------------------------------------------------------------------

def load_tokenizer(tokenizer_dir: str | os.PathLike) -> Tokenizer:
    """Load models/tokenizer/ (written by the `tokenizer` stage)."""
    return Tokenizer.from_directory(tokenizer_dir)


def load_token_bytes(tokenizer_dir: str | os.PathLike, device="cpu"):
    """int32 tensor [vocab]: raw byte length of each token, 0 for specials (for bits-per-byte)."""
    import torch

    path = require(Path(tokenizer_dir) / TOKEN_BYTES_FILE, PRODUCER)
    try:
        tb = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read token_bytes ({type(e).__name__}: {e}); re-run the `{PRODUCER}` stage") from e
    if not isinstance(tb, torch.Tensor) or tb.dtype != torch.int32 or tb.dim() != 1:
        raise ValueError(f"{path}: expected a 1-D int32 tensor, got {type(tb).__name__} "
                         f"{getattr(tb, 'dtype', '')} {tuple(getattr(tb, 'shape', ()))}")
    return tb
