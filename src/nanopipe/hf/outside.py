"""Any `transformers` causal LM behind our evaluation contract, so base_eval measures outside models
(GPT-2, or an export of ours) exactly as it measures our own: nanochat's `base_eval --hf-path`.

    model, tokenizer = load_outside("gpt2", device)        # a local directory or a hub id
    token_bytes = tokenizer.token_bytes(device)            # bits per byte in the model's own bytes

OutsideModel is what nanopipe.eval calls on a model: `model(idx)` -> fp32 logits (B, T, V),
`model(idx, targets, loss_reduction)` -> cross-entropy with ignore index -1, `generate(ids, max_tokens)`
(greedy), `max_seq_len` (CORE crops prompts to it), `get_device()`. It only ever evaluates: `train()`
leaves the model in eval mode, so dropout (GPT-2 has some) never switches on.

OutsideTokenizer is our Tokenizer's API over a `transformers` tokenizer: `encode(text | list,
prepend=..., append=...)` without the tokenizer's own special tokens, `decode`, `get_bos_token_id`
(the BOS token, or EOS where there is none: GPT-2's <|endoftext|> separates its documents), and
`token_bytes`: each token's raw byte length (docs/decisions.md, D5), 0 for special tokens.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from nanopipe.hf.tokenizer import bytes_to_unicode

# What a transformers tokenizer is saved as (fast, slow BPE, SentencePiece, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


class OutsideModelError(ValueError):
    """An outside model or its tokenizer cannot be loaded or used."""


class OutsideTokenizer:
    def __init__(self, hf_tokenizer, name: str):
        self.tok = hf_tokenizer
        self.name = name
        bos = hf_tokenizer.bos_token_id if hf_tokenizer.bos_token_id is not None else hf_tokenizer.eos_token_id
        if bos is None:
            raise OutsideModelError(f"{name}: the tokenizer has neither a BOS nor an EOS token to start documents with")
        self.bos_token_id = bos

    def get_vocab_size(self) -> int:
        return len(self.tok)

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode_special(self, text: str) -> int:
        if text == "<|bos|>":
            return self.bos_token_id
        i = self.tok.convert_tokens_to_ids(text)
        if i is None or i == self.tok.unk_token_id:
            raise OutsideModelError(f"{self.name}: the tokenizer has no special token {text!r}")
        return i

    def _special_id(self, x) -> int:
        return x if isinstance(x, int) else self.encode_special(x)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> ids; list[str] -> list of ids (the fast tokenizer batches in Rust)."""
        single = isinstance(text, str)
        rows = self.tok([text] if single else list(text), add_special_tokens=False)["input_ids"]
        pre = None if prepend is None else self._special_id(prepend)
        post = None if append is None else self._special_id(append)
        rows = [([pre] if pre is not None else []) + row + ([post] if post is not None else []) for row in rows]
        return rows[0] if single else rows

    __call__ = encode

    def decode(self, ids) -> str:
        return self.tok.decode(ids, clean_up_tokenization_spaces=False)

    def token_bytes(self, device="cpu", size: int | None = None) -> torch.Tensor:
        """int32 [size]: raw bytes of each token, 0 for special tokens and ids past the tokenizer.

        Byte-level BPE vocabularies (GPT-2 style) map back to bytes exactly; SentencePiece pieces count
        '▁' as a space and <0xNN> as one byte; anything else is measured by decoding the token alone."""
        V = len(self.tok)
        size = max(size or V, V)
        special = set(self.tok.all_special_ids) | {i for i, t in self.tok.added_tokens_decoder.items() if t.special}
        pieces = self.tok.convert_ids_to_tokens(list(range(V)))
        b2u = {u: b for b, u in bytes_to_unicode().items()}
        byte_level = all(p is None or all(ch in b2u for ch in p)
                         for i, p in enumerate(pieces) if i not in special)
        lengths = [0] * size
        for i, p in enumerate(pieces):
            if i in special or p is None:
                continue
            if byte_level:
                lengths[i] = len(p)  # one character per byte
            elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                lengths[i] = 1  # SentencePiece byte fallback
            elif "▁" in p:
                lengths[i] = len(p.replace("▁", " ").encode("utf-8"))
            else:
                lengths[i] = len(self.tok.decode([i]).encode("utf-8"))
        return torch.tensor(lengths, dtype=torch.int32, device=device)


class OutsideModel:
    def __init__(self, hf_model, max_seq_len: int, name: str):
        self.model = hf_model.eval()
        self.max_seq_len = max_seq_len
        self.name = name
        self.vocab_size = hf_model.get_output_embeddings().weight.shape[0]

    def get_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self  # evaluation only: the wrapped model stays in eval mode

    def __call__(self, idx, targets=None, loss_reduction: str = "mean"):
        logits = self.model(input_ids=idx).logits.float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    forward = __call__

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=0.0, top_k=None, seed=42):
        """Greedy continuation (batch 1) with the model's own KV cache; yields token ids. Sampling is not
        offered: base_eval only takes greedy samples."""
        if temperature != 0:
            raise OutsideModelError(f"{self.name}: only greedy generation (temperature 0) is supported")
        ids = torch.tensor([tokens], dtype=torch.long, device=self.get_device())
        past = None
        for _ in range(max_tokens):
            out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
            yield nxt
            ids = torch.tensor([[nxt]], dtype=torch.long, device=ids.device)


def _max_seq_len(config, tokenizer, name: str) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        return tokenizer.model_max_length
    raise OutsideModelError(f"{name}: config.json names no context length (max_position_embeddings, n_positions, ...); "
                            "pass --max-seq-len")


def load_outside(path_or_id: str, device, max_seq_len: int | None = None, trust_remote_code: bool = True):
    """(OutsideModel, OutsideTokenizer) for a local directory or a hub id, fp32 on `device`.
    trust_remote_code lets exports with their own modeling code (ours) load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(path_or_id)
    local = Path(name).exists()
    if local and not (Path(name) / "config.json").is_file():
        raise OutsideModelError(f"{name}/config.json: not found; not a transformers model directory")
    if local and not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
        raise OutsideModelError(f"{name}: cannot load its tokenizer: the directory has no tokenizer files "
                                f"(any of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        where = "the directory has no tokenizer files (tokenizer.json / tokenizer_config.json)" if local else \
            f"not a local directory, and not loadable from the hub{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}"
        raise OutsideModelError(f"{name}: cannot load its tokenizer: {where} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutsideModelError(f"{name}: cannot load a causal LM ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    model.to(device)
    seq_len = max_seq_len or _max_seq_len(model.config, tokenizer, name)
    wrapped, tok = OutsideModel(model, seq_len, name), OutsideTokenizer(tokenizer, name)
    if tok.get_vocab_size() > wrapped.vocab_size:
        raise OutsideModelError(f"{name}: the tokenizer has {tok.get_vocab_size()} tokens, the model only "
                                f"{wrapped.vocab_size} output logits")
    return wrapped, tok
