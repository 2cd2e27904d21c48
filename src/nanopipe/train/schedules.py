"""nanochat's schedules: learning-rate multipliers, Muon momentum, and applying them to the param groups.

Two LR shapes, one per kind of horizon:
- `lr_multiplier(step, ...)`: pretraining counts steps (nanochat base_train.py `get_lr_multiplier`);
- `lr_multiplier_by_progress(progress, ...)`: SFT's horizon can be "one epoch", known only as the
  fraction of the mixture consumed (nanochat chat_sft.py).
RL decays linearly to 0 over its steps (`1 - step / num_steps`, in the rl stage).
"""
from __future__ import annotations


def lr_multiplier(it: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac (nanochat's schedule)."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def lr_multiplier_by_progress(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """SFT's schedule over progress in [0, 1] (the fraction done after this step): optional linear
    warmup, constant, then a linear warmdown to final_lr_frac at progress 1."""
    if warmup_ratio > 0 and progress < warmup_ratio:
        return progress / warmup_ratio
    if warmdown_ratio <= 0 or progress <= 1 - warmdown_ratio:
        return 1.0
    frac = max(0.0, 1 - progress) / warmdown_ratio
    return frac + (1 - frac) * final_lr_frac


def muon_momentum(it: int) -> float:
    """Muon momentum ramps linearly from 0.85 to 0.95 over the first 300 steps."""
    frac = min(it / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def apply_schedule(optimizer, lrm: float, momentum: float | None = None, weight_decay: float | None = None) -> None:
    """Every group's LR = its initial LR x lrm; Muon groups also take this step's momentum and weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
