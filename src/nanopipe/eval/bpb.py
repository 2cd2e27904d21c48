"""Bits per byte (nanochat's loss_eval.py).

bpb = Σ nats over scored targets / (ln 2 · Σ bytes of those targets). A target is scored when
its token has > 0 raw bytes: special tokens (0 bytes in token_bytes) and ignored targets
(< 0) drop out of both sums, so the metric does not depend on the vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _model_device(model) -> torch.device:
    if hasattr(model, "get_device"):
        return torch.device(model.get_device())
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Run `steps` batches (x, y) through model(x, y, loss_reduction='none'); return bits per byte.

    Sums are all-reduced over ranks when torch.distributed is initialised. inf when no bytes were seen.
    """
    device = _model_device(model)
    total_nats = torch.tensor(0.0, dtype=torch.float32, device=device)
    total_bytes = torch.tensor(0, dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for step in range(steps):
        try:
            x, y = next(batch_iter)[:2]
        except StopIteration:
            raise ValueError(f"evaluate_bpb: the batches ran out after {step} of {steps} steps") from None
        loss = model(x, y, loss_reduction="none").view(-1).float()
        y = y.reshape(-1)
        tb = token_bytes if token_bytes.device == y.device else token_bytes.to(y.device)
        # Index with a safe id where the target is ignored (< 0); `y.int()` sidesteps an MPS int64 kernel gap.
        valid = y.int() >= 0
        nbytes = torch.where(valid, tb[torch.where(valid, y, torch.zeros_like(y))], torch.zeros_like(y, dtype=tb.dtype))
        # where(), not a product, so a nan/inf loss at an unscored position cannot leak in
        total_nats += torch.where(nbytes > 0, loss, torch.zeros_like(loss)).sum().to(device)
        total_bytes += nbytes.sum().to(device=device, dtype=torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_nats, total_bytes = total_nats.item(), total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)
