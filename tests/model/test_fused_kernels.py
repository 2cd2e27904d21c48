"""The CPU training path's fused pieces against the plain ops they replace: the chunked
lm_head + soft-cap + cross-entropy, and relu^2 with its one-pass backward."""
import pytest
import torch
import torch.nn.functional as F
from model_helpers import batch, tiny_model

from nanopipe.model import fused_ce
from nanopipe.model.fused_ce import linear_softcap_cross_entropy
from nanopipe.model.gpt import _ReluSquared

CAP = 15.0


def plain_ce(x, w, targets, vocab_size, reduction="mean"):
    logits = (x @ w.t())[:, :vocab_size]
    logits = CAP * torch.tanh(logits / CAP)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def case(n=300, c=48, vocab=1000, padded=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    w = torch.randn(padded, c, generator=g) * 0.7  # logits reach the soft-cap's bend
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::7] = -1
    return x, w, t, vocab


@pytest.mark.parametrize("chunk", [1, 64, 128, 4096])  # chunks that divide, don't divide, exceed n
def test_mean_loss_and_gradients_match_plain_path(monkeypatch, chunk):
    monkeypatch.setattr(fused_ce, "CHUNK_ROWS", chunk)
    x, w, t, V = case()
    grads = []
    for fn in (plain_ce, linear_softcap_cross_entropy):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xr, wr, t, V) if fn is plain_ce else fn(xr, wr, t, V, CAP)
        (loss * 0.37).backward()  # a non-unit upstream gradient (grad accumulation divides the loss)
        grads.append((loss.detach(), xr.grad, wr.grad))
    (lp, gxp, gwp), (lf, gxf, gwf) = grads
    torch.testing.assert_close(lf, lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gxf, gxp, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gwf, gwp, rtol=1e-5, atol=1e-8)
    assert gwf[V:].abs().sum() == 0  # padded vocab rows never score
    assert gxf[::7].abs().sum() == 0  # ignored targets contribute nothing


def test_per_row_losses_and_no_grad_mean():
    x, w, t, V = case(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(linear_softcap_cross_entropy(x, w, t, V, CAP, "none"), plain_ce(x, w, t, V, "none"))
        torch.testing.assert_close(linear_softcap_cross_entropy(x, w, t, V, CAP), plain_ce(x, w, t, V))


def test_all_targets_ignored_is_nan_like_cross_entropy():
    x, w, t, V = case(n=8)
    t[:] = -1
    assert torch.isnan(plain_ce(x, w, t, V)) and torch.isnan(linear_softcap_cross_entropy(x, w, t, V, CAP))


def test_per_token_losses_with_gradients_are_refused():
    x, w, t, V = case(n=8)
    with pytest.raises(AssertionError, match="plain logits path"):
        linear_softcap_cross_entropy(x.requires_grad_(), w, t, V, CAP, "none")


def test_model_uses_the_fused_path_and_matches_the_plain_one(monkeypatch):
    """The GPT's loss and every parameter gradient, fused (CPU default) vs the plain logits path."""
    torch.manual_seed(0)
    m = tiny_model(vocab_size=250)  # padded to 256
    x, y = batch()
    x, y = x % 250, y % 250
    y[:, :3] = -1
    calls = []
    real = fused_ce.linear_softcap_cross_entropy
    monkeypatch.setattr("nanopipe.model.gpt.linear_softcap_cross_entropy", lambda *a: calls.append(1) or real(*a))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(type(m), "_use_fused_ce", lambda self, red, f=fused: f)
        m.zero_grad(set_to_none=True)
        loss = m(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert len(calls) == 1
    (lf, gf), (lp, gp) = results
    torch.testing.assert_close(lf, lp, rtol=1e-6, atol=1e-6)
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], rtol=1e-4, atol=1e-7, msg=name)
    # RL's per-token log-probs with gradients take the plain path
    monkeypatch.undo()
    assert not m._use_fused_ce("none") and m._use_fused_ce("mean")


def test_relu_squared_is_bit_identical_to_plain_ops():
    u = torch.randn(4, 33, 70)
    u[0, 0, :5] = 0.0  # relu's kink
    a, b = u.clone().requires_grad_(), u.clone().requires_grad_()
    g = torch.randn_like(u)
    out_f = _ReluSquared.apply(a)
    out_p = F.relu(b).square()
    out_f.backward(g)
    out_p.backward(g)
    assert torch.equal(out_f, out_p) and torch.equal(a.grad, b.grad)


def test_bf16_autocast_matches_plain_path_under_autocast():
    """Under CPU bf16 autocast (runtime.dtype=auto on CPUs with native bf16) the fused path runs its
    matmuls in bf16 like autocast would, the rest in fp32: same loss and gradients to bf16 rounding."""
    torch.manual_seed(0)
    m = tiny_model(vocab_size=250)
    x, y = batch()
    x, y = x % 250, y % 250
    results = []
    for fused in (True, False):
        type(m)._use_fused_ce, saved = (lambda self, red, f=fused: f), type(m)._use_fused_ce
        try:
            m.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(x, y)
                with torch.no_grad():
                    per_token = m(x, y, loss_reduction="none")
            loss.backward()
        finally:
            type(m)._use_fused_ce = saved
        assert loss.dtype == torch.float32 and per_token.dtype == torch.float32
        results.append((loss.detach(), per_token, m.lm_head.weight.grad.clone(), m.transformer.wte.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
