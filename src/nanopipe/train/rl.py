"""REINFORCE with a group-mean baseline (nanochat's chat_rl.py): the pieces of the `rl` stage.

For every training question, sample `num_samples` completions from the current policy with the
Engine (calculator tool calls live), reward each 0/1 with the task's grader, and take advantage =
reward - mean(group rewards) (no std normalisation). The loss is -sum(advantage * log p(token)) over
the *sampled* tokens only, normalised per token: the prompt, the calculator output the Engine forced
into the sequence, and padding are not trained on. No KL term, no reference model, no ratio
clipping: every batch comes from the current weights and is used for exactly one optimizer step.
"""
from __future__ import annotations

import torch

from nanopipe.inference.engine import Engine
from nanopipe.runtime import Device, all_reduce

# -----------------------------------------------------------------------------
# Rollouts, batch, loss


@torch.no_grad()
def rollout(engine: Engine, prompt: list[int], num_samples: int, max_tokens: int, temperature: float,
            top_k: int | None, seed: int):
    """Sample completions of `prompt`: (sequences, masks, stopped).

    Engine.generate_rows with keep_stop: prompt + completion per row, mask 0 on the prompt and on
    forced calculator output, 1 on sampled tokens, and a row which stopped keeps its stop token
    (sampled, mask 1): that is what lets RL reinforce stopping (docs/decisions.md, D3).
    """
    return engine.generate_rows(prompt, num_samples=num_samples, keep_stop=True, max_tokens=max_tokens,
                                temperature=temperature, top_k=top_k, seed=seed)


def completion_text(tokenizer, seq: list[int], prefix_len: int, stopped: bool) -> str:
    """The completion as the grader sees it: after the prompt, without the stop token."""
    return tokenizer.decode(seq[prefix_len:len(seq) - int(stopped)])


def build_batch(sequences, masks, rewards, pad_id: int, device):
    """(inputs, targets, rewards, advantages) for one question's group.

    Rows are right-padded to the longest with `pad_id` (mask 0). targets = ids shifted by one,
    -1 wherever the target token is not a sampled one (prompt, forced output, padding).
    advantages = rewards - mean(rewards), no std normalisation.
    """
    T = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for m in masks], dtype=torch.long, device=device)
    inputs = ids[:, :-1]
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    rewards = torch.tensor(rewards, dtype=torch.float, device=device)
    return inputs, targets, rewards, rewards - rewards.mean()


def pg_loss(model, inputs, targets, advantages, normaliser: int):
    """-sum_rows,t advantage[row] * log p(target[row, t]) / (valid tokens * normaliser).

    normaliser = passes per question x questions per rank, so the gradient of one step is the
    per-token-normalised mean over this rank's questions (ranks are averaged by the optimizer)."""
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)  # 0 where target == -1
    num_valid = (targets >= 0).sum().clamp(min=1)
    pg_obj = (logp * advantages.unsqueeze(-1)).sum() / (num_valid * normaliser)
    return -pg_obj


@torch.no_grad()
def pass_at_k(engine: Engine, task, num_examples: int, k: int, max_tokens: int, top_k: int | None,
              dev: Device, autocast) -> dict:
    """Fraction of held-out questions with a correct answer among the first j of k samples at
    temperature 1.0, for j = 1..k (nanochat's "any of the first j" estimate; Engine seed 42)."""
    tokenizer = engine.tokenizer
    counts = torch.zeros(k + 1, dtype=torch.float64, device=dev.device)  # [pass@1..pass@k, questions]
    n = min(num_examples, len(task))
    for idx in range(dev.rank, n, dev.world_size):
        conversation = task[idx]
        prompt = tokenizer.render_for_completion(conversation)
        with autocast():
            seqs, _ = engine.generate_batch(prompt, num_samples=k, max_tokens=max_tokens, temperature=1.0, top_k=top_k)
        outcomes = [bool(task.evaluate(conversation, tokenizer.decode(s[len(prompt):]))) for s in seqs]
        for j in range(k):
            counts[j] += any(outcomes[:j + 1])
        counts[k] += 1
    all_reduce(counts)
    return {f"pass_at_{j + 1}": (counts[j] / counts[k]).item() for j in range(k)}
