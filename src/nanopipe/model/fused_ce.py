"""lm_head + logit soft-cap + cross-entropy in row chunks, for the CPU training path.

The plain path (`F.cross_entropy(cap * tanh(x @ W.T / cap))`) materialises the (tokens, vocab)
fp32 logits several times over (divide, tanh, multiply, log-softmax, and their backwards): at the
tiny preset that is 8 x 33 MB passes through memory per step, a third of a CPU step. Here each
chunk of rows stays in cache: its logits, loss and gradient are computed together in the forward
(the softmax is needed for both), and backward only scales the saved gradients. Same maths as
the plain path; only the summation order of W's gradient differs (chunk by chunk), so results
agree to rounding and stay deterministic.

`mm_dtype` (bf16 under CPU autocast) is the dtype the three matmuls run in, as autocast would run
them; the soft-cap, softmax and gradients are fp32 either way, as in the plain path.

    loss = linear_softcap_cross_entropy(x, lm_head.weight, targets, vocab_size, softcap)   # mean
"""
from __future__ import annotations

import torch

CHUNK_ROWS = 128  # 128 x 4096 fp32 logits = 2 MB: fits in L2 with its gradient


def _chunk_logits(xc, w, softcap: float):
    """(tanh(z / cap), cap * tanh(z / cap)) in fp32 for z = xc @ w.T, the first in z's buffer."""
    t = torch.mm(xc, w.t()).float().div_(softcap).tanh_()
    return t, t * softcap


class _LinearSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, softcap: float, mm_dtype):
        xm = x.to(mm_dtype)
        w = weight[:vocab_size].to(mm_dtype)  # padded rows never score: their logits are sliced off
        valid_rows = targets != -1
        n_valid = valid_rows.sum()
        row_scale = valid_rows.float() / n_valid.clamp_min(1)  # mean over valid targets
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros_like(weight) if need_grad else None
        total = x.new_zeros((), dtype=torch.float32)
        for s in range(0, x.size(0), CHUNK_ROWS):
            xc, tc = xm[s:s + CHUNK_ROWS], targets[s:s + CHUNK_ROWS]
            t, logits = _chunk_logits(xc, w, softcap)
            lse = torch.logsumexp(logits, dim=1)
            valid = valid_rows[s:s + CHUNK_ROWS]
            safe_t = tc.clamp_min(0).unsqueeze(1)
            total += ((lse - logits.gather(1, safe_t).squeeze(1)) * valid).sum()
            if need_grad:
                # d loss / d z = (softmax - onehot) * (1 - tanh^2), times this row's 1/n_valid
                p = logits.sub_(lse.unsqueeze(1)).exp_()
                p.scatter_add_(1, safe_t, -valid.float().unsqueeze(1))
                p.mul_(t.square_().neg_().add_(1)).mul_(row_scale[s:s + CHUNK_ROWS].unsqueeze(1))
                pm = p.to(mm_dtype)
                grad_x[s:s + CHUNK_ROWS] = torch.mm(pm, w)
                grad_w[:vocab_size] += torch.mm(pm.t(), xc)
        ctx.save_for_backward(grad_x, grad_w)
        # 0 valid targets: nan, as F.cross_entropy's mean
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        gx = grad_x * grad_out if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_out if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None, None


@torch.no_grad()
def _row_losses(x, weight, targets, vocab_size: int, softcap: float, mm_dtype):
    xm, w = x.to(mm_dtype), weight[:vocab_size].to(mm_dtype)
    out = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    for s in range(0, x.size(0), CHUNK_ROWS):
        tc = targets[s:s + CHUNK_ROWS]
        _, logits = _chunk_logits(xm[s:s + CHUNK_ROWS], w, softcap)
        nll = torch.logsumexp(logits, dim=1) - logits.gather(1, tc.clamp_min(0).unsqueeze(1)).squeeze(1)
        out[s:s + CHUNK_ROWS] = nll.masked_fill_(tc == -1, 0.0)
    return out


def linear_softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                                 softcap: float, reduction: str = "mean", mm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cross-entropy (ignore_index=-1) of softcap * tanh((x @ weight[:vocab_size].T) / softcap)
    against targets. x (N, C), weight (V_padded, C), targets (N,) int64; matmuls in `mm_dtype`
    (default x's dtype), everything after them in fp32. reduction 'mean' (differentiable) or
    'none' (per-row, 0 where ignored; only without grad: callers that need per-token gradients
    use the plain path)."""
    mm_dtype = mm_dtype or x.dtype
    if reduction == "none":
        assert not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)), \
            "reduction='none' with gradients: use the plain logits path"
        return _row_losses(x, weight, targets, vocab_size, softcap, mm_dtype)
    assert reduction == "mean", f"reduction must be 'mean' or 'none', got {reduction!r}"
    if not torch.is_grad_enabled():
        return _row_losses(x, weight, targets, vocab_size, softcap, mm_dtype).sum() / (targets != -1).sum()
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are explicit here
        return _LinearSoftcapCE.apply(x, weight, targets, vocab_size, softcap, mm_dtype)
