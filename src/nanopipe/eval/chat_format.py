"""Does a chat model answer in its chat format? Greedy replies to a few probe prompts (identity, spelling,
arithmetic) and what is wrong with their format (not their content): SFT records both after training,
and the tests use them on trained models.
"""
from __future__ import annotations

import re

import torch

from nanopipe.inference.engine import Engine

PROBES = [
    ("identity", "Who are you?"),
    ("identity", "What is your name?"),
    ("spelling", "Spell the word: apple"),
    ("spelling", "Spell the word: garden"),
    ("arithmetic", "Mia has 12 apples. Mia buys 5 more apples. How many apples does Mia have now?"),
]
SPELLING_RE = re.compile(r"[a-z]+:[a-z](,[a-z])*")
FINAL_ANSWER_RE = re.compile(r"#### -?[0-9][0-9.,]*")


@torch.no_grad()
def chat_samples(model, tokenizer, probes=PROBES, max_tokens: int = 256) -> list[dict]:
    """Greedy replies (through the Engine, so the calculator tool runs) to each probe prompt.
    Each: {kind, prompt, reply (decoded, tool calls included), finished (emitted <|assistant_end|>)}."""
    engine = Engine(model, tokenizer)
    was_training = model.training
    model.eval()
    out = []
    for kind, prompt in probes:
        ids = tokenizer.render_for_completion({"messages": [{"role": "user", "content": prompt},
                                                            {"role": "assistant", "content": ""}]})
        rows, _, stopped = engine.generate_rows(ids, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        out.append({"kind": kind, "prompt": prompt, "reply": tokenizer.decode(rows[0][len(ids):]), "finished": stopped[0]})
    model.train(was_training)
    return out


def format_problems(samples: list[dict]) -> list[str]:
    """What is wrong with the FORMAT of each reply (not its content); empty when all is well."""
    problems = []
    for s in samples:
        kind, reply, where = s["kind"], s["reply"].strip(), f"{s['kind']} probe {s['prompt']!r}"
        if not s["finished"]:
            problems.append(f"{where}: no <|assistant_end|> within the token budget (reply {reply[:80]!r}...)")
        if not reply:
            problems.append(f"{where}: empty reply")
            continue
        leaked = [t for t in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>") if t in reply]
        if leaked:
            problems.append(f"{where}: the reply contains {leaked}: {reply[:120]!r}")
        if kind == "identity":
            if "<|python_start|>" in reply:
                problems.append(f"{where}: a tool call in an identity answer: {reply[:120]!r}")
            if len(re.findall(r"[A-Za-z]+", reply)) < 3:
                problems.append(f"{where}: expected a sentence, got {reply[:120]!r}")
        elif kind == "spelling":
            if not SPELLING_RE.fullmatch(reply):
                problems.append(f"{where}: expected 'word:l,e,t,t,e,r,s', got {reply[:120]!r}")
        elif kind == "arithmetic":
            if not FINAL_ANSWER_RE.search(reply.splitlines()[-1]):
                problems.append(f"{where}: expected a last line '#### <number>', got {reply[-120:]!r}")
    return problems


def check_chat_format(model, tokenizer, max_tokens: int = 256) -> list[str]:
    """Greedy-sample the probes and list the format problems (empty: the model chats in its format)."""
    return format_problems(chat_samples(model, tokenizer, max_tokens=max_tokens))
