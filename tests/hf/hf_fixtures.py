"""Tiny real models and tokenizers for the Hugging Face tests (import as `from hf_fixtures import ...`)."""
from __future__ import annotations

import random

import torch

from nanopipe.tasks import IDENTITY_PATH

VOCAB = 512
SEQ = 64  # short windows are 32 tokens, so 64-token rows already cross them


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A real BPE, trained on the identity conversations and some code, numbers and accents."""
    from nanopipe.tokenizer import Tokenizer

    text = IDENTITY_PATH.read_text(encoding="utf-8")
    extra = "def f(x):\n    return x * 2  # double\n" * 20 + "3.14 + 2.72 = 5.86; naïve café résumé\n" * 20
    return Tokenizer.train_from_iterator(iter([text, extra]), vocab_size)


def tiny_model(vocab_size: int = VOCAB, sequence_len: int = SEQ, n_layer: int = 3, n_head: int = 4, n_kv_head: int = 2,
               n_embd: int = 64, window_pattern: str = "SL", seed: int = 0, never=()):
    """A real GPT with random weights everywhere (zero-init projections and gates would hide bugs):
    GQA, value embeddings on layers 0 and 2, a short-window layer, lambdas away from 1 and 0.
    `never`: token ids whose lm_head rows are zeroed (logit 0, so almost surely never the argmax), to
    keep greedy streams from stopping early."""
    from nanopipe.model.gpt import GPT, GPTConfig

    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=window_pattern)
    model = GPT(config)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "resid_lambdas":
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=gen))
            elif name == "x0_lambdas":
                p.copy_(0.3 * torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 / max(1, p.shape[-1]) ** 0.5)
        for t in never:
            model.lm_head.weight[t].zero_()
    return model.eval()


FUZZ_ALPHABET = (list(" \t\n\r!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~") + [chr(c) for c in range(65, 123)]
                 + list("éàüßñçøåæ中文日本語한국어😀👍🏽∑∫√Ωαβγ\u200b\u00a0\u3000\u0301"))
FUZZ_PIECES = [" ", "  ", "\n", "\n\n", "   \n", "\r\n", "'s", "'LL", "'ve", "123456", " 7", "...", "  def", "ÉCOLE"]


def fuzz_text(rng: random.Random) -> str:
    """Random Unicode: ASCII, accents, CJK, emoji with modifiers, astral planes, whitespace runs,
    contractions and digit runs (what the split regex treats specially)."""
    out = []
    for _ in range(rng.randint(0, 60)):
        r = rng.random()
        if r < 0.55:
            out.append(rng.choice(FUZZ_ALPHABET))
        elif r < 0.75:
            out.append(chr(rng.randint(0x80, 0xD7FF)))
        elif r < 0.85:
            out.append(chr(rng.randint(0x10000, 0x2FFFF)))
        else:
            out.append(rng.choice(FUZZ_PIECES))
    return "".join(out)


def conv(*turns, system=None):
    messages = ([{"role": "system", "content": system}] if system else [])
    for i, content in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    return {"messages": messages}


CONVERSATIONS = [
    conv("Hi!", "Hello, I'm nanopipe."),
    conv("Who made you?", "A pipeline.", "Spell apple", "apple:a,p,p,l,e", system="Be brief.\nAlways."),
    conv("How many r in 'strawberry'?", [
        {"type": "text", "text": "Let me count with Python:"},
        {"type": "python", "text": "'strawberry'.count('r')"},
        {"type": "python_output", "text": "3"},
        {"type": "text", "text": "\n#### 3"},
    ]),
    conv("  leading and trailing spaces  ", " é 東京 🚀\n\n", "12345 + 67890 = ?", "80235"),
]
