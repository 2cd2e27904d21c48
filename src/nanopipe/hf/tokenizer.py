"""nanopipe's tokenizer as a `transformers` fast tokenizer, and back.

`to_hf_files(tokenizer, ...)` gives the contents of tokenizer.json, tokenizer_config.json and
special_tokens_map.json for `PreTrainedTokenizerFast` / `AutoTokenizer`:

- the byte-level BPE: the vocabulary is our mergeable ranks (id = rank) in GPT-2's byte-to-unicode
  alphabet, and the merges are derived from the ranks as `transformers`' tiktoken converter does
  (each token's splits into two known tokens, in rank order). `ignore_merges` emits a pre-token
  that is itself a token whole, as tiktoken does. The pre-tokenizer is our split regex;
- the 9 special tokens with our ids, as added special tokens;
- a post-processor that prepends <|bos|> when special tokens are asked for (the default of
  `tokenizer(text)`): our models always see BOS first. `add_special_tokens=False` gives exactly
  `Tokenizer.encode(text)`;
- a chat template (Jinja) that renders a conversation exactly as nanopipe.tokenizer.chat does.

Known differences, inherent to `transformers` tokenizers: special-token text typed inside a message
("<|user_end|>") becomes the special token there, where our renderer encodes it as plain text; and
two adjacent "text" parts of an assistant message are tokenized as one string, where our renderer
encodes them one by one (merges across the boundary can differ).

`from_hf_dir(path)` reads such a tokenizer.json back into our Tokenizer (the import direction).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from nanopipe.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer, _gpt2_byte_decoder

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# Jinja, written without any whitespace between tags so that nothing but the tokens is rendered.
# A leading system message is folded into the first user message as "system\n\nuser" (there is no
# system token); roles must alternate user/assistant; assistant content is a string or a list of
# parts {"type": "text" | "python" | "python_output", "text": ...}.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\n\n' -%}{%- set msgs = messages[1:] -%}"
    "{%- if not msgs or msgs[0]['role'] != 'user' -%}"
    "{{- raise_exception('message 0 is a system message, so message 1 must be from user') -}}{%- endif -%}"
    "{%- else -%}{%- set system = '' -%}{%- set msgs = messages -%}{%- endif -%}"
    "{%- if not msgs -%}{{- raise_exception('conversation has no messages') -}}{%- endif -%}"
    "<|bos|>"
    "{%- for m in msgs -%}"
    "{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user/assistant, starting with user; got ' + m['role']) -}}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "<|user_start|>{{- (system if loop.first else '') + m['content'] -}}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'text' -%}{{- p['text'] -}}"
    "{%- elif p['type'] == 'python' -%}<|python_start|>{{- p['text'] -}}<|python_end|>"
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{- p['text'] -}}<|output_end|>"
    "{%- else -%}{{- raise_exception('unknown part type ' + p['type']) -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the ByteLevel alphabet): the inverse
    of the decoder our `tokenizers` trainer backend already uses."""
    return {b: c for c, b in _gpt2_byte_decoder().items()}


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """For each token of >1 byte, every split into two tokens, ordered by the token's rank and then
    by the pieces' ranks: merge priority = rank, which is tiktoken's rule."""
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((rank, lr) for lr in local)
    merges.sort(key=lambda x: x[0])
    return [lr for _, lr in merges]


def _spec(tokenizer: Tokenizer) -> tuple[dict[bytes, int], list[tuple[str, int]], str]:
    """(mergeable ranks, special tokens sorted by id, split pattern), from the tokenizer's own file form."""
    spec = tokenizer.to_json()
    ranks = {base64.b64decode(t): i for i, t in enumerate(spec["mergeable_ranks"])}
    return ranks, sorted(spec["special_tokens"].items(), key=lambda kv: kv[1]), spec["pattern"]


def build_hf_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` with our ids, pre-tokenization, specials and BOS post-processor."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    ranks, specials, pattern = _spec(tokenizer)
    b2u = bytes_to_unicode()
    piece = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {piece(b): r for b, r in ranks.items()}
    merges = [(piece(a), piece(b)) for a, b in _merges(ranks)]
    hf = HFTokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    if [i for _, i in specials] != list(range(len(ranks), len(ranks) + len(specials))):
        raise ValueError(f"special token ids {dict(specials)} are not contiguous after the {len(ranks)} "
                         "mergeable ranks; a fast tokenizer numbers its added tokens that way")
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
                           for s, _ in specials])
    for s, i in specials:
        assert hf.token_to_id(s) == i, (s, hf.token_to_id(s), i)
    bos = tokenizer.bos_token
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, tokenizer.bos_token_id)])
    return hf


def to_hf_files(tokenizer: Tokenizer, eos_token: str, model_max_length: int) -> dict[str, str]:
    """{file name: text} of the fast tokenizer. eos_token: what ends a generation (<|assistant_end|>
    for a chat model, <|bos|> for a base model, whose documents are separated by BOS)."""
    hf = build_hf_tokenizer(tokenizer)
    _, specials, _ = _spec(tokenizer)
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for s, i in specials}
    bos = tokenizer.bos_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos_token,
        "pad_token": bos,  # nanopipe pads with BOS (SFT rows, CORE batches)
        "unk_token": None,
        "additional_special_tokens": [s for s, _ in specials if s not in (bos, eos_token)],
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: generate() would refuse them
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": added,
    }
    special_map = {"bos_token": bos, "eos_token": eos_token, "pad_token": bos,
                   "additional_special_tokens": config["additional_special_tokens"]}
    return {
        HF_TOKENIZER_FILE: hf.to_str(pretty=False) + "\n",
        HF_TOKENIZER_CONFIG: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        HF_SPECIAL_TOKENS_MAP: json.dumps(special_map, indent=2) + "\n",
    }


def from_hf_dir(hf_dir) -> Tokenizer:
    """Our Tokenizer from an exported tokenizer.json: vocabulary = ranks, the Split regex = the
    pattern, the added special tokens = our specials. Refuses a tokenizer.json of another kind."""
    import tiktoken

    path = Path(hf_dir) / HF_TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {hf_dir} has no tokenizer (was it exported by nanopipe?)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    try:
        split = pre["pretokenizers"][0]
        assert model["type"] == "BPE" and split["type"] == "Split" and pre["pretokenizers"][1]["type"] == "ByteLevel"
        pattern = split["pattern"]["Regex"]
    except (KeyError, IndexError, TypeError, AssertionError):
        raise ValueError(f"{path}: not a byte-level BPE with a Split pre-tokenizer as nanopipe exports "
                         f"(model {model.get('type')!r}, pre_tokenizer {pre.get('type')!r})") from None
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    try:
        ranks = {bytes(u2b[c] for c in token): i for token, i in model["vocab"].items()}
    except KeyError as e:
        raise ValueError(f"{path}: vocabulary entry with a character outside the byte-level alphabet ({e})") from None
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    unknown = set(specials) - set(SPECIAL_TOKENS)
    if unknown or "<|bos|>" not in specials:
        raise ValueError(f"{path}: special tokens {sorted(specials)} are not nanopipe's {SPECIAL_TOKENS}")
    enc = tiktoken.Encoding(name="nanopipe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, "<|bos|>")
