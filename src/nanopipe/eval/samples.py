"""What a base model says: greedy continuations of nanochat's prompts (nanochat scripts/base_train.py @1ec0a34),
logged by pretrain every `sample_every` steps and recorded by base_eval."""
from __future__ import annotations

import torch

# nanochat's base_train / base_eval prompts
PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


@torch.no_grad()
def greedy_samples(model, tokenizer, max_tokens: int, prompts=PROMPTS) -> list[str]:
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, prepend="<|bos|>")
        new = list(model.generate(ids, max_tokens=max_tokens, temperature=0))
        out.append(prompt + tokenizer.decode(new))
    model.train()
    return out
