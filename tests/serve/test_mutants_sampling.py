"""The sampler's draw pinned to its definition (docs/testing.md): one uniform per row, in the
probabilities' dtype, from the caller's generator, and the first index whose CDF exceeds it."""
import itertools

import torch

from nanopipe.inference.engine import _draw, sample_next_token


def _by_hand(probs, seed):
    """Inverse CDF of u ~ U[0, total) per row, in plain Python."""
    u = torch.rand((probs.size(0), 1), generator=torch.Generator().manual_seed(seed), dtype=probs.dtype)
    out = []
    for row, ur in zip(probs.tolist(), u[:, 0].tolist()):
        cdf = list(itertools.accumulate(row))
        x = ur * cdf[-1]
        out.append(next((i for i, c in enumerate(cdf) if c > x), len(row) - 1))
    return out


def test_draw_is_the_inverse_cdf_of_one_uniform_per_row_in_the_probs_dtype():
    for dtype in (torch.float64, torch.float32):
        probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0]], dtype=dtype).repeat(20, 1)
        got = _draw(probs, torch.Generator().manual_seed(3))
        assert got.shape == (60, 1) and got.dtype == torch.int64
        assert got[:, 0].tolist() == _by_hand(probs, 3)


def test_draw_with_unnormalised_rows_scales_u_by_the_row_total():
    probs = torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.float64).repeat(50, 1)  # total 4
    got = _draw(probs, torch.Generator().manual_seed(0))[:, 0].tolist()
    assert got == _by_hand(probs, 0) and set(got) == {0, 1, 2}


def test_top_k_returns_vocabulary_ids_not_positions_in_the_top_k():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    rng = torch.Generator().manual_seed(1)
    got = sample_next_token(logits.repeat(100, 1), rng, temperature=1.0, top_k=2)
    assert set(got[0::2, 0].tolist()) <= {1, 3} and set(got[1::2, 0].tolist()) <= {0, 1, 2, 3}
    assert set(got[0::2, 0].tolist()) == {1, 3}


def test_draw_edges_of_the_uniform(monkeypatch):
    """u = 0 must skip zero-probability tokens (right=True: first CDF value > u); u = the row total
    (what rounding can produce) must stay a valid index (the clamp to V - 1)."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda size, **kw: torch.zeros(size, dtype=kw.get("dtype")))
    assert _draw(probs, None)[:, 0].tolist() == [1, 2]
    monkeypatch.setattr(torch, "rand", lambda size, **kw: torch.ones(size, dtype=kw.get("dtype")))
    assert _draw(probs[:1], None)[:, 0].tolist() == [3]
