"""The optimizer kernels pinned to their equations, one call at a time (issue 19's mutation tests).

`adamw_step_fused` and `muon_step_fused` are called directly on small tensors with hand-picked inputs
and compared with the update written out here in float64 from its definition (nanochat
nanochat/optim.py @1ec0a34), not with the module's own helpers:

- AdamW: decoupled decay p *= 1 - lr*wd, then p -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps). The
  hyperparameters are powers of two (exact in the float32 the kernel computes in), eps is large
  enough to matter, and the state is non-zero, so each term shows in the result.
- Muon: Nesterov momentum (checked exactly: momentum_buffer and the clobbered stacked_grads are
  float64 here and the blend is exact), then the orthogonalisation X = g / (1.02 ||g||_F + 1e-6)
  followed by `ns_steps` Polar Express iterations X <- aX + b(XX^T)X + c(XX^T)^2 X, then NorMuon:
  S = beta2 S + (1-beta2) mean(X^2) per row (tall/square) or column (wide), each row/column of X
  divided by sqrt(S), the whole rescaled to X's Frobenius norm; then p -= lr*U + lr*wd*p where U*p >= 0.
  ns_steps=0 isolates the normalisation and NorMuon (X is exact up to bf16 rounding: agreement to
  ~0.6 % of the largest update element), ns_steps=1 one Polar Express iteration (its cancellation in
  bf16 costs up to ~5 %).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanopipe.model.optim import adamw_step_fused, muon_step_fused, polar_express_coeffs


def s(x):
    """A hyperparameter as the optimizer hands it over: a 0-D float32 CPU tensor."""
    return torch.tensor(float(x), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- AdamW

def test_adamw_step_by_hand():
    p = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]], dtype=torch.float64)
    grad = torch.tensor([[0.5, 1.0, -2.0], [0.0, -0.5, 4.0]], dtype=torch.float64)
    m = torch.tensor([[0.25, -0.5, 1.0], [0.5, 0.125, 0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.25, 0.5], [2.0, 0.0625, 1.0]], dtype=torch.float64)
    lr, b1, b2, eps, wd, t = 0.5, 0.75, 0.875, 0.0625, 0.25, 3
    # by hand, in float64
    m_new = b1 * m + (1 - b1) * grad
    v_new = b2 * v + (1 - b2) * grad * grad
    p_new = p * (1 - lr * wd) - lr / (1 - b1 ** t) * m_new / ((v_new / (1 - b2 ** t)).sqrt() + eps)
    P, M, V = p.clone(), m.clone(), v.clone()
    adamw_step_fused(P, grad, M, V, s(t), s(lr), s(b1), s(b2), s(eps), s(wd))
    # the kernel computes in float32 (its fp32 math path): float32 accuracy, far below any wrong term
    torch.testing.assert_close(M, m_new, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(V, v_new, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(P, p_new, rtol=1e-6, atol=1e-6)
    assert P.dtype == M.dtype == V.dtype == torch.float64  # written back in place, dtypes kept


def test_adamw_bias_correction_depends_on_the_step():
    # the same state and gradient at step 1 and step 10 move the weights by different amounts,
    # exactly by the bias-correction factors
    grad = torch.tensor([1.0, -1.0])
    out = {}
    for t in (1, 10):
        P, M, V = torch.zeros(2), torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.25])
        adamw_step_fused(P, grad, M, V, s(t), s(0.5), s(0.5), s(0.75), s(0.0), s(0.0))
        m_new, v_new = 0.5 * torch.tensor([0.5, 0.5]) + 0.5 * grad, torch.full((2,), 0.75 * 0.25 + 0.25)
        want = -0.5 / (1 - 0.5 ** t) * m_new / (v_new / (1 - 0.75 ** t)).sqrt()
        torch.testing.assert_close(P, want, rtol=1e-6, atol=1e-7)
        out[t] = P
    assert not torch.allclose(out[1], out[10])


# ----------------------------------------------------------------------------------------------- Muon

def reference_muon(G, P, M0, S0, mu, lr, wd, beta2, ns_steps):
    """One Muon step for stacked matrices (K, r, c), float64, from the definitions in the docstring."""
    M = mu * M0 + (1 - mu) * G
    B = (1 - mu) * G + mu * M
    X = B / (1.02 * torch.linalg.matrix_norm(B, keepdim=True) + 1e-6)
    for a, b, c in polar_express_coeffs[:ns_steps]:
        A = X @ X.mT
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    r, c = X.shape[-2:]
    v = X.square().mean(dim=-1 if r >= c else -2, keepdim=True)
    S = beta2 * S0 + (1 - beta2) * v
    Y = X / S.sqrt()
    U = Y * torch.linalg.matrix_norm(X, keepdim=True) / torch.linalg.matrix_norm(Y, keepdim=True)
    return P - lr * U - lr * wd * P * (U * P >= 0), M, B, S


def muon_inputs(shape, scale, seed, K=2):
    """Integer-valued grads/momenta (so the Nesterov blend is exact in bf16), two matrices of
    different norms, weights of both signs, a non-uniform second-moment state."""
    g = torch.Generator().manual_seed(seed)
    r, c = shape
    G = torch.randint(-7, 8, (K, r, c), generator=g).double() * scale
    G[1:] *= 3  # the two matrices are normalised separately
    M0 = torch.randint(-7, 8, (K, r, c), generator=g).double() * scale
    P = torch.randint(-7, 8, (K, r, c), generator=g).double() / 8
    S0 = torch.rand((K, r, 1) if r >= c else (K, 1, c), generator=g) * 2 + 0.1
    return G, P, M0, S0


def run_kernel(G, P, M0, S0, mu, lr, wd, beta2, ns_steps):
    r, c = G.shape[-2:]
    Gk, Pk, Mk, Sk = G.clone(), P.clone(), M0.clone(), S0.clone()
    muon_step_fused(Gk, Pk, Mk, Sk, s(mu), s(lr), s(wd), s(beta2), ns_steps, -1 if r >= c else -2)
    return Pk, Mk, Gk, Sk


@pytest.mark.parametrize("shape", [(4, 2), (2, 4), (3, 3)])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -20])  # 2^-20: ||g||_F ~ 1e-5, where the 1e-6 guard weighs ~6 %
def test_muon_momentum_normalisation_and_normuon_by_hand(shape, scale):
    G, P, M0, S0 = muon_inputs(shape, scale, seed=1)
    mu, lr, wd, beta2 = 0.5, 0.5, 0.25, 0.5
    P_ref, M_ref, B_ref, S_ref = reference_muon(G, P, M0, S0.double(), mu, lr, wd, beta2, ns_steps=0)
    Pk, Mk, Gk, Sk = run_kernel(G, P, M0, S0, mu, lr, wd, beta2, ns_steps=0)
    # Nesterov momentum: exact (float64 state, values exact in binary)
    assert torch.equal(Mk, M_ref)
    assert torch.equal(Gk, B_ref)  # stacked_grads is clobbered with the Nesterov blend (documented)
    # second-moment state: within the bf16 rounding of X
    torch.testing.assert_close(Sk.double(), S_ref, rtol=0.02, atol=0)
    # the update: bf16 math, agreement to ~0.6 % of its largest element; a wrong term (1.02 as 1/1.02:
    # 4 %, the guard's sign, the norm over both matrices, NorMuon's direction) is off by more than 1.5 %
    step = (P_ref - P).abs().max().item()
    torch.testing.assert_close(Pk, P_ref, rtol=0, atol=0.015 * step)


@pytest.mark.parametrize("shape", [(4, 2), (2, 4)])
def test_muon_one_polar_express_iteration_by_hand(shape):
    G, P, M0, S0 = muon_inputs(shape, 1.0, seed=2)
    mu, lr, wd, beta2 = 0.5, 1.0, 0.0, 0.5
    P_ref, *_ = reference_muon(G, P, M0, S0.double(), mu, lr, wd, beta2, ns_steps=1)
    P_two, *_ = reference_muon(G, P, M0, S0.double(), mu, lr, wd, beta2, ns_steps=2)
    Pk, *_ = run_kernel(G, P, M0, S0, mu, lr, wd, beta2, ns_steps=1)
    step = (P_ref - P).abs().max().item()
    # the first iteration's coefficients (8.2, -22.5, 15.9) cancel to ~1.2: bf16 keeps ~5 % of the result
    torch.testing.assert_close(Pk, P_ref, rtol=0, atol=0.1 * step)
    assert (P_two - P_ref).abs().max().item() > 0.2 * step  # one more iteration would be told apart


@pytest.mark.parametrize("beta2, factor", [(1.0, 1e-6), (1.0, 1e4), (0.5, 1e4)])
def test_normuon_is_invariant_to_the_scale_of_its_state(beta2, factor):
    # NorMuon divides rows by sqrt(S) and then restores X's Frobenius norm, so scaling the whole state
    # (beta2=1 keeps it as it is) changes nothing; with a state far above mean(X^2) (1e4) its
    # rescaling reads a norm well below 1, with one far below (1e-6) the state itself is tiny: clamps
    # meant only for zeros (1e-10) must not touch either.
    G, P, M0, S0 = muon_inputs((4, 2), 1.0, seed=3)
    mu, lr, wd = 0.5, 1.0, 0.0
    P_ref, *_ = reference_muon(G, P, M0, (S0 * factor).double(), mu, lr, wd, beta2, ns_steps=0)
    Pk, *_ = run_kernel(G, P, M0, S0 * factor, mu, lr, wd, beta2, ns_steps=0)
    step = (P_ref - P).abs().max().item()
    torch.testing.assert_close(Pk, P_ref, rtol=0, atol=0.015 * step)


def test_muon_runs_in_bf16_params_and_state():
    # params and both buffers in bf16: the hyperparameters and the new second moment are cast to the
    # state's dtype (lerp takes its weight and end only in the input's dtype); results as in fp32
    G, P, M0, S0 = muon_inputs((4, 2), 1.0, seed=4)
    args = (0.5, 0.5, 0.25, 0.5, 5)
    P32, *_ = run_kernel(G.float(), P.float(), M0.float(), S0, *args)
    P16, M16, _, S16 = run_kernel(G.bfloat16(), P.bfloat16(), M0.bfloat16(), S0.bfloat16(), *args)
    assert P16.dtype == M16.dtype == S16.dtype == torch.bfloat16
    step = (P32 - P.float()).abs().max().item()
    torch.testing.assert_close(P16.float(), P32, rtol=0, atol=0.05 * step + 0.01)


class MatmulShapes(TorchDispatchMode):
    """Records the output shapes of the matrix products a call runs."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in ("mm", "bmm", "matmul", "addmm", "baddbmm"):
            self.shapes.add(tuple(out.shape[-2:]))
        return out


@pytest.mark.parametrize("shape", [(8, 2), (2, 8)])
def test_polar_express_iterates_on_the_small_gram_matrix(shape):
    # A tall (r > c) matrix iterates on X^T X (c x c), a wide one on X X^T (r x r): the same result
    # (X(X^T X) = (X X^T)X), at the cost of the small side. No r x r product for tall, no c x c for wide.
    r, c = shape
    G, P, M0, S0 = muon_inputs(shape, 1.0, seed=5, K=1)
    with MatmulShapes() as mm:
        run_kernel(G, P, M0, S0, 0.5, 0.5, 0.0, 0.5, ns_steps=2)
    small = min(r, c)
    assert mm.shapes and (small, small) in mm.shapes
    assert all(max(a, b) <= max(r, c) and min(a, b) <= small for a, b in mm.shapes), mm.shapes


def test_muon_hyperparameters_act_in_the_updates_dtype():
    # As nanochat (`momentum_t.to(stacked_grads.dtype)`), lr and wd are cast to the update's dtype,
    # bf16 after Polar Express: lr=0.1 acts as 0.10009765625, so a zero gradient (a zero update)
    # decays the weights by exactly bf16(0.1) * 0.5 = 0.050048828125, not by 0.05.
    P = torch.tensor([[[1.0, -2.0], [0.5, 3.0], [-0.25, 1.5]]])
    Pk, *_ = run_kernel(torch.zeros(1, 3, 2), P, torch.zeros(1, 3, 2), torch.zeros(1, 3, 1), 0.5, 0.1, 0.5, 0.5, 5)
    assert torch.equal(Pk, P - torch.tensor(0.050048828125) * P)
