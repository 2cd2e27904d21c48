"""Bits per byte (nanochat's loss_eval.py), and SFT's validation loss beside it.

bpb = Σ nats over scored targets / (ln 2 · Σ bytes of those targets). A target is scored when
its token has > 0 raw bytes: special tokens (0 bytes in token_bytes) and ignored targets
(< 0) drop out of both sums, so the metric does not depend on the vocabulary.
"""
from __future__ import annotations

import math

import torch

from nanopipe.data.loader import tokenizing_distributed_data_loader_bos_bestfit
from nanopipe.runtime import Device, Progress, all_reduce


def _model_device(model) -> torch.device:
    if hasattr(model, "get_device"):
        return torch.device(model.get_device())
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def scored_bytes(y: torch.Tensor, token_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, nbytes) per flat target: valid where the target is not ignored (>= 0), nbytes its token's
    bytes (0 where ignored or special). The ignored ids are replaced by a safe index before the lookup;
    `y.int()` sidesteps an MPS int64 kernel gap."""
    tb = token_bytes if token_bytes.device == y.device else token_bytes.to(y.device)
    valid = y.int() >= 0
    return valid, torch.where(valid, tb[torch.where(valid, y, torch.zeros_like(y))], torch.zeros_like(y, dtype=tb.dtype))


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Run `steps` batches (x, y) through model(x, y, loss_reduction='none'); return bits per byte.

    Sums are all-reduced over ranks when torch.distributed is initialised. inf when no bytes were seen.
    """
    device = _model_device(model)
    total_nats = torch.tensor(0.0, dtype=torch.float32, device=device)
    total_bytes = torch.tensor(0, dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    progress = Progress("bpb", steps, "batch")
    for step in range(steps):
        try:
            x, y = next(batch_iter)[:2]
        except StopIteration:
            raise ValueError(f"evaluate_bpb: the batches ran out after {step} of {steps} steps") from None
        loss = model(x, y, loss_reduction="none").view(-1).float()
        valid, nbytes = scored_bytes(y.reshape(-1), token_bytes)
        # where(), not a product, so a nan/inf loss at an unscored position cannot leak in
        total_nats += torch.where(nbytes > 0, loss, torch.zeros_like(loss)).sum().to(device)
        total_bytes += nbytes.sum().to(device=device, dtype=torch.int64)
        progress.update(step + 1)
    all_reduce(total_nats)
    all_reduce(total_bytes)
    total_nats, total_bytes = total_nats.item(), total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)


def bpb_tokens(batch_size: int, seq_len: int, tokens: int, world_size: int) -> int:
    """How many tokens bpb_on_shards scores for a budget of `tokens`: whole batches on every rank, at least one."""
    return max(1, tokens // (batch_size * seq_len * world_size)) * batch_size * seq_len * world_size


def bpb_on_shards(model, tokenizer, token_bytes, shard_paths, batch_size: int, seq_len: int, tokens: int, dev: Device) -> float:
    """Bits per byte over the first `tokens` tokens of `shard_paths` (every rank takes part): exactly
    bpb_tokens(...) of them."""
    steps = bpb_tokens(batch_size, seq_len, tokens, dev.world_size) // (batch_size * seq_len * dev.world_size)
    loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, batch_size, seq_len, shard_paths, device=dev.device)
    model.eval()
    with dev.autocast():
        bpb = evaluate_bpb(model, loader, steps, token_bytes)
    loader.close()
    model.train()
    return bpb


@torch.no_grad()
def evaluate_loss_bpb(model, batches, steps: int, token_bytes: torch.Tensor, dev: Device) -> dict:
    """SFT's validation: mean loss per supervised token and bits per byte over `steps` batches
    (x, y, state), summed over ranks. The sums are float64 (float32 on MPS, which has none), where
    nanochat's `evaluate_bpb` above keeps nats in float32: each keeps the precision its stage has
    always reported with."""
    device = dev.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = torch.zeros(4, dtype=dtype, device=device)  # nats, tokens, nats over bytes>0, bytes
    for _ in range(steps):
        x, y, _ = next(batches)
        with dev.autocast():
            loss = model(x, y, loss_reduction="none").view(-1).to(dtype)
        valid, nbytes = scored_bytes(y.view(-1), token_bytes)
        sums += torch.stack([torch.where(valid, loss, 0).sum(), valid.sum().to(dtype),
                             torch.where(nbytes > 0, loss, 0).sum(), nbytes.sum().to(dtype)])
    nats, count, byte_nats, nbytes = all_reduce(sums).tolist()
    return {"val_loss": nats / count if count else float("inf"),
            "val_bpb": byte_nats / (math.log(2) * nbytes) if nbytes else float("inf")}
