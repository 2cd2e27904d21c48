"""Muon and AdamW updates against references written here from their equations (nanochat nanochat/optim.py @1ec0a34)."""
import pytest
import torch
from model_helpers import batch, tiny_model, train_steps

from nanopipe.model.optim import MuonAdamW, polar_express_coeffs


def reference_muon(G, P, M, S, mu, lr, wd, beta2, ns_steps=5, pe_dtype=torch.bfloat16):
    """One Muon step for one matrix, step by step. Returns (P, M, S) new.
    pe_dtype: the dtype of the Polar Express iteration (bf16 as specified; float64 = exact math)."""
    r, c = G.shape
    M = mu * M + (1 - mu) * G                                   # momentum buffer
    g = (1 - mu) * G + mu * M                                   # Nesterov blend
    X = g.to(pe_dtype)                                          # Polar Express in bf16
    X = X / (torch.linalg.matrix_norm(X.double()).to(pe_dtype) * 1.02 + 1e-6)
    for a, b, cc in polar_express_coeffs[:ns_steps]:
        if r > c:
            A = X.T @ X
            X = a * X + X @ (b * A + cc * (A @ A))
        else:
            A = X @ X.T
            X = a * X + (b * A + cc * (A @ A)) @ X
    red = -1 if r >= c else -2                                  # NorMuon: per row (tall/square) or column
    v_mean = X.float().square().mean(dim=red, keepdim=True)
    v_norm = (v_mean.sum() * X.shape[red]).sqrt()
    S = beta2 * S + (1 - beta2) * v_mean
    step = S.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * X.shape[red] * step.square()).sum().sqrt()
    U = (X.float() * step * (v_norm / v_norm_new.clamp_min(1e-10))).to(P.dtype)
    lr_eff = lr * max(1.0, r / c) ** 0.5                        # shape-aware LR
    mask = (U * P) >= 0                                         # cautious weight decay
    P = P - lr_eff * U - lr_eff * wd * P * mask
    return P, M, S


@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (6, 6)])
def test_muon_step_matches_reference(shape):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.1) for _ in range(2)]
    opt = MuonAdamW([dict(kind="muon", params=params, lr=0.05, momentum=0.9, ns_steps=5, beta2=0.95, weight_decay=0.3)])
    ref = [(p.detach().clone(), torch.zeros(shape), torch.zeros((shape[0], 1) if shape[0] >= shape[1] else (1, shape[1])))
           for p in params]
    for _step in range(3):
        grads = [torch.randn(*shape, generator=g) for _ in params]
        before = [p.detach().clone() for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        # the reference starts each step from the optimizer's weights so bf16 rounding cannot accumulate
        ref = [reference_muon(gr, b, M, S, mu=0.9, lr=0.05, wd=0.3, beta2=0.95) for gr, b, (_, M, S) in zip(grads, before, ref)]
        for p, b, (P, _M, _S) in zip(params, before, ref):
            ours, theirs = p.detach() - b, P - b
            # Polar Express runs in bf16 (8-bit mantissa) and the kernel keeps the scaled update in bf16:
            # agreement to ~1.5% of the largest update element. A wrong term (no sqrt(r/c) factor, no
            # cautious mask, no NorMuon, plain momentum) is off by far more than that.
            torch.testing.assert_close(ours, theirs, atol=0.015 * theirs.abs().max().item(), rtol=0)
    state = opt.state[params[0]]
    assert state["momentum_buffer"].shape == (2, *shape)
    torch.testing.assert_close(state["momentum_buffer"][1], ref[1][1])


def test_muon_zero_grad_is_pure_cautious_decay():
    p = torch.nn.Parameter(torch.randn(4, 4))
    before = p.detach().clone()
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.1, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.5)])
    p.grad = torch.zeros(4, 4)
    opt.step()
    # (lr and wd reach the update in the update's dtype, bf16 here, as in nanochat: 0.1 -> 0.10009765625)
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 0.5), rtol=2e-4, atol=0)


def reference_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)
    return p, m, v


def test_adamw_step_matches_reference_and_torch():
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(5, 3, generator=g)
    p = torch.nn.Parameter(p0.clone())
    q = torch.nn.Parameter(p0.clone())
    ours = MuonAdamW([dict(kind="adamw", params=[p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    theirs = torch.optim.AdamW([q], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1, foreach=False)
    P, M, V = p0.clone(), torch.zeros(5, 3), torch.zeros(5, 3)
    for t in range(1, 5):
        grad = torch.randn(5, 3, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        P, M, V = reference_adamw(P, grad, M, V, t, 0.01, 0.8, 0.95, 1e-10, 0.1)
        torch.testing.assert_close(p.detach(), P, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
    assert ours.state[p]["step"] == 4



def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    return torch.pow(2.0, torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7)


def test_adamw_bf16_params_do_the_math_in_fp32():
    # On CUDA wte and the value embeddings are bf16. nanochat (nanochat/optim.py @e02b339) runs their
    # AdamW math in fp32 and rounds once, when writing back: the new weights are the exact update
    # rounded to bf16, within half a bf16 ulp. Math in bf16 instead (the constants 1 - lr*wd, lr/bias1
    # rounded to bf16, every op rounding) is off by up to hundreds of ulps here (lr*wd = 0.06: 0.94 in
    # bf16 is 0.94140625), and by more than half an ulp in ~half of the elements.
    from nanopipe.model.optim import adamw_step_fused

    g = torch.Generator().manual_seed(0)
    n = 4096
    p = torch.randn(n, generator=g).bfloat16()
    m = (torch.randn(n, generator=g) * 0.1).bfloat16()
    v = (torch.rand(n, generator=g) * 0.01).bfloat16()
    grad = torch.randn(n, generator=g).bfloat16()
    lr, b1, b2, eps, wd, t = 0.3, 0.8, 0.95, 1e-10, 0.2, 3
    P, _, V = reference_adamw(p.double(), grad.double(), m.double(), v.double(), t, lr, b1, b2, eps, wd)
    s = lambda x: torch.tensor(float(x))  # noqa: E731  0-D fp32 CPU, as the optimizer passes them
    adamw_step_fused(p, grad, m, v, s(t), s(lr), s(b1), s(b2), s(eps), s(wd))
    assert p.dtype == m.dtype == v.dtype == torch.bfloat16  # state keeps the param's dtype
    for name, ours, exact in (("param", p, P), ("exp_avg_sq", v, V)):
        err = (ours.double() - exact).abs() / _bf16_ulp(exact.float()).double()
        assert err.max().item() <= 0.5 + 1e-3, f"{name}: {err.max().item():.2f} bf16 ulps from the exact update"


def test_hyperparameters_stay_cpu_scalars():
    # nanochat (nanochat/optim.py @1ec0a34) hands the kernels 0-D CPU tensors: scalar arguments, so
    # nothing is copied host-to-device per step. Params on the meta device stand in for a GPU here:
    # no 0-D tensor may show up on the params' device in any op of a step.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.moved = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and t.dim() == 0 and t.device.type != "cpu":
                    self.moved.add(str(func))
            return out

    a = torch.nn.Parameter(torch.ones(4, 4, device="meta"))
    w = torch.nn.Parameter(torch.ones(8, 4, device="meta"))
    opt = MuonAdamW([dict(kind="adamw", params=[a], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
                     dict(kind="muon", params=[w], lr=0.1, momentum=0.9, ns_steps=5, beta2=0.95, weight_decay=0.1)])
    a.grad, w.grad = torch.ones(4, 4, device="meta"), torch.ones(8, 4, device="meta")
    with Watch() as watch:
        opt.step()
    assert not watch.moved, f"hyperparameters copied to the params' device in {sorted(watch.moved)}"
    hp = [v for k, v in vars(opt).items() if k.startswith(("_adamw_", "_muon_")) and torch.is_tensor(v)]
    assert len(hp) == 10 and all(t.device.type == "cpu" and t.dim() == 0 for t in hp)

def test_adamw_skips_params_without_grad():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = MuonAdamW([dict(kind="adamw", params=[a, b], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)])
    a.grad = torch.ones(3)
    opt.step()
    assert torch.all(b == 1) and torch.all(a < 1) and not opt.state.get(b)


def test_group_validation():
    p = torch.nn.Parameter(torch.ones(3, 3))
    with pytest.raises(ValueError, match="unknown optimizer kind 'sgd'"):
        MuonAdamW([dict(kind="sgd", params=[p], lr=0.1)])
    with pytest.raises(ValueError, match="missing keys"):
        MuonAdamW([dict(kind="muon", params=[p], lr=0.1)])
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[p, torch.nn.Parameter(torch.ones(2, 3))], lr=0.1, momentum=0.9,
                        ns_steps=5, beta2=0.95, weight_decay=0.0)])
    q = torch.nn.Parameter(torch.ones(3, 3))
    opt = MuonAdamW([dict(kind="muon", params=[p, q], lr=0.1, momentum=0.9, ns_steps=5, beta2=None, weight_decay=0.0)])
    p.grad = torch.ones(3, 3)
    with pytest.raises(RuntimeError, match="no grad"):
        opt.step()


def test_state_dict_round_trip_continues_identically():
    m1 = tiny_model()
    o1 = m1.setup_optimizer(weight_decay=0.1)
    train_steps(m1, o1, 2)
    sd = o1.state_dict()
    assert sd["format"] == "nanopipe.muon_adamw.v1" and len(sd["param_groups"]) == len(o1.param_groups)
    m2 = tiny_model(seed=5)
    m2.load_state_dict(m1.state_dict())
    o2 = m2.setup_optimizer()
    o2.load_state_dict(sd)
    assert o2.param_groups[-1]["weight_decay"] == o1.param_groups[-1]["weight_decay"]
    assert train_steps(m1, o1, 2, start=2) == train_steps(m2, o2, 2, start=2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_other_models():
    sd = tiny_model().setup_optimizer().state_dict()
    other = tiny_model(n_embd=128).setup_optimizer()
    with pytest.raises(ValueError, match="shapes"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1).state_dict())


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    # On CUDA the optimizers default to torch.compile'd kernels: check they compute the same updates.
    # AdamW: to float precision, on a real model step.
    def update(compile):
        m = tiny_model(perturb=True)
        opt = m.setup_optimizer(compile=compile)
        x, y = batch()
        m(x, y).backward()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        opt.step()
        return {k: v - before[k] for k, v in m.state_dict().items()}
    eager, compiled = update(False), update(True)
    for k in eager:
        if not k.startswith("transformer.h."):
            torch.testing.assert_close(compiled[k], eager[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    # Muon: the bf16 Polar Express is only ~5% (Frobenius) from exact orthogonalisation, and inductor
    # rounds at different points than eager, so both are compared with the exact (float64) reference.
    g = torch.Generator().manual_seed(2)
    for shape in [(64, 32), (32, 64)]:
        P0 = torch.randn(3, *shape, generator=g) * 0.1
        G = torch.randn(3, *shape, generator=g)
        exact = torch.stack([reference_muon(G[i], P0[i], torch.zeros(shape), 0.0, mu=0.95, lr=0.02, wd=0.1, beta2=0.95,
                                            pe_dtype=torch.float64)[0] for i in range(3)]) - P0
        for compile in (False, True):
            params = [torch.nn.Parameter(P0[i].clone()) for i in range(3)]
            opt = MuonAdamW([dict(kind="muon", params=params, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.95,
                                  weight_decay=0.1)], compile=compile)
            for p, gr in zip(params, G):
                p.grad = gr.clone()
            opt.step()
            ours = torch.stack([p.detach() for p in params]) - P0
            rel = ((ours - exact).norm() / exact.norm()).item()
            assert rel < 0.08, f"compile={compile} {shape}: Muon update {rel:.3f} (relative) from the exact one"
