"""The scheduler's batched sampler (serving/sampling.py) against probabilities computed by hand.

Statistical checks draw n independent samples of one known distribution as n rows of ONE call
(seeds 0..n-1, step 0): every token's frequency within 5 standard deviations (sqrt(p(1-p)/n)) of
its probability, and exactly 0 for tokens the transform removes.
"""
import math

import pytest
import torch

from nanopipe.serving.sampling import RowParams, apply_penalties, counter_uniform, sample, split_seed, token_logprobs

# 4 live tokens, the rest at -1e4 (probability 0); probabilities at T=1: 0.5, 0.25, 0.125, 0.125
V = 40
LIVE = {3: math.log(0.5), 17: math.log(0.25), 8: math.log(0.125), 30: math.log(0.125)}


def logits_row():
    row = torch.full((V,), -1e4)
    for t, v in LIVE.items():
        row[t] = v
    return row


def rows(n, temperature=1.0, top_k=0, top_p=1.0, presence=0.0, frequency=0.0, step=0, seed0=0):
    out = []
    for i in range(n):
        out.append((temperature, top_k, top_p, presence, frequency, split_seed(seed0 + i), step))
    return out


def draw(n=6000, **kw):
    params = RowParams(rows(n, **kw), "cpu")
    return sample(logits_row().expand(n, V).clone(), params).tolist()


def by_hand(temperature=1.0, top_k=None, top_p=1.0):
    """{token: probability}: softmax(l / T) over the k largest, then the top-p prefix, renormalised."""
    ranked = sorted(LIVE.items(), key=lambda kv: -kv[1])[:top_k or len(LIVE)]
    w = [math.exp(v / temperature) for _, v in ranked]
    p = [x / sum(w) for x in w]
    kept, mass = [], 0.0
    for (t, _), q in zip(ranked, p):
        if mass >= top_p:
            break
        kept.append((t, q))
        mass += q
    total = sum(q for _, q in kept)
    return {t: q / total for t, q in kept}


def assert_matches(draws, expected):
    n = len(draws)
    counts = {t: draws.count(t) for t in set(draws)}
    assert set(counts) <= set(expected), f"drew removed tokens {sorted(set(counts) - set(expected))}"
    for t, p in expected.items():
        freq = counts.get(t, 0) / n
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (t, freq, p)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_softmax_over_temperature(temperature):
    # at T=0.5 the probabilities are 0.5^2 : 0.25^2 : ... = 16:4:1:1 / 22
    assert_matches(draw(temperature=temperature), by_hand(temperature))
    if temperature == 0.5:
        assert by_hand(0.5)[3] == pytest.approx(16 / 22)


def test_top_k():
    assert set(draw(temperature=1.7, top_k=1)) == {3}  # k=1: always the best, even hot
    assert_matches(draw(top_k=2), {3: 2 / 3, 17: 1 / 3})
    assert_matches(draw(top_k=V), by_hand())  # k = V and k > V keep everything
    assert_matches(draw(top_k=10 * V), by_hand())


def test_top_p_cuts_at_the_exact_boundary():
    # 0.5 + 0.25 reaches 0.75 exactly: the 0.125s are cut; a hair more keeps them
    assert_matches(draw(top_p=0.75), {3: 2 / 3, 17: 1 / 3})
    # ... a hair more keeps the third (mass before it 0.75 < p) but not the fourth (0.875 >= p); the two
    # 0.125 tokens tie, so which of them is third is the sort's choice: exactly one of them is drawn
    out = draw(top_p=0.7500001)
    tail = {t for t in out if t in (8, 30)}
    assert len(tail) == 1
    assert_matches([t if t not in tail else 8 for t in out], {3: 4 / 7, 17: 2 / 7, 8: 1 / 7})
    assert_matches(draw(top_p=0.875001), by_hand())
    assert_matches(draw(top_p=0.5), {3: 1.0})  # the first token alone reaches 0.5
    assert_matches(draw(top_p=0.3), {3: 1.0})  # the first token is always kept
    # top-k first, then top-p over the renormalised three: 4/7 + 2/7 = 0.857 >= 0.8 cuts the third
    assert_matches(draw(top_p=0.8, top_k=3), {3: 2 / 3, 17: 1 / 3})


def test_penalties_change_logits_by_the_right_amount():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    out = apply_penalties(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    # token 1: -0.5 - 2*0.25; token 2: -0.5 - 0.25; unseen tokens untouched
    assert out.tolist() == [[1.0, 1.0, 2.25, 4.0]]
    # through sample(): greedy on the penalised logits (token 3 seen 3 times: 4 - 0.5 - 3*0.6 < 2.5)
    counts = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    params = RowParams([(0.0, 0, 1.0, 0.5, 0.6, (0, 0), 0)], "cpu")
    assert sample(logits.clone(), params, counts).tolist() == [2]
    negative = RowParams([(0.0, 0, 1.0, -1.0, 0.0, (0, 0), 0)], "cpu")  # a negative presence penalty favours seen tokens
    assert sample(torch.tensor([[3.5, 0.0, 3.0, 0.0]]), negative, torch.tensor([[0.0, 0.0, 1.0, 0.0]])).tolist() == [2]


def test_a_mixed_batch_keeps_each_rows_parameters():
    """Greedy, top-k=1, hot and top-p rows in one call: each behaves as it would alone."""
    n = 2000
    spec = rows(n, temperature=0.0) + rows(n, temperature=2.0, top_k=1, seed0=n) + rows(n, seed0=2 * n) + \
        rows(n, top_p=0.75, seed0=3 * n)
    out = sample(logits_row().expand(4 * n, V).clone(), RowParams(spec, "cpu")).tolist()
    assert set(out[:n]) == {3} and set(out[n:2 * n]) == {3}
    assert_matches(out[2 * n:3 * n], by_hand())
    assert_matches(out[3 * n:], {3: 2 / 3, 17: 1 / 3})


def test_seeds_and_steps():
    """A draw is a function of (seed, step) alone: same in any batch, at any row; other seeds or
    steps draw independently."""
    one = RowParams([(1.0, 0, 1.0, 0.0, 0.0, split_seed(77), 5)], "cpu")
    alone = sample(logits_row().unsqueeze(0), one).item()
    crowd = rows(50, seed0=1000, step=3)
    crowd[31] = (1.0, 0, 1.0, 0.0, 0.0, split_seed(77), 5)
    assert sample(logits_row().expand(50, V).clone(), RowParams(crowd, "cpu"))[31].item() == alone
    # one seed over 6000 steps is a sample of the distribution too
    steps = [(1.0, 0, 1.0, 0.0, 0.0, split_seed(77), s) for s in range(6000)]
    assert_matches(sample(logits_row().expand(6000, V).clone(), RowParams(steps, "cpu")).tolist(), by_hand())
    # negative seeds are the same as torch's (2**64 + seed)
    assert split_seed(-1) == split_seed(2**64 - 1) == (2**32 - 1, 2**32 - 1)


def test_counter_uniform_is_uniform_and_in_range():
    n = 100_000
    u = torch.tensor([counter_uniform(split_seed(i % 997), i // 997) for i in range(n)])
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=50, min=0, max=1)
    chi2 = (((counts - n / 50) ** 2) / (n / 50)).sum().item()
    assert chi2 < 100, chi2  # 49 degrees of freedom: p(chi2 > 100) < 1e-4
    assert len(set(u.tolist())) > 0.99 * n
    # neighbouring seeds, seeds that differ in the high word, and neighbouring steps are not correlated
    for other in (lambda i: (split_seed(i + 1), 0), lambda i: (split_seed(i + 2**32), 0), lambda i: (split_seed(i), 1)):
        a = torch.tensor([counter_uniform(split_seed(i), 0) for i in range(20_000)])
        b = torch.tensor([counter_uniform(*other(i)) for i in range(20_000)])
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.04


def test_token_logprobs():
    logits = logits_row().unsqueeze(0)
    lp, top_lp, top_ids = token_logprobs(logits, torch.tensor([17]), 3)
    assert lp.item() == pytest.approx(math.log(0.25), abs=1e-6)
    assert top_ids.tolist() == [[3, 17, 8]] or top_ids.tolist() == [[3, 17, 30]]
    assert top_lp[0].tolist() == pytest.approx([math.log(0.5), math.log(0.25), math.log(0.125)], abs=1e-6)
    assert token_logprobs(logits, torch.tensor([3]), 0)[1].shape == (1, 0)


@pytest.mark.parametrize("other_k", [3, 0], ids=["top-3", "no top-k"])
def test_rows_with_different_top_k(other_k):
    """top-k 2 next to top-k 3 (one topk(3) call, masked per row) or next to no top-k (a full sort)."""
    n = 3000
    spec = rows(n, top_k=2) + rows(n, top_k=other_k, seed0=n)
    out = sample(logits_row().expand(2 * n, V).clone(), RowParams(spec, "cpu")).tolist()
    assert_matches(out[:n], {3: 2 / 3, 17: 1 / 3})
    if other_k:
        out_other = [t if t != 30 else 8 for t in out[n:]]  # the 0.125 tie: either may be third
        assert len({t for t in out[n:] if t in (8, 30)}) == 1
        assert_matches(out_other, {3: 4 / 7, 17: 2 / 7, 8: 1 / 7})
    else:
        assert_matches(out[n:], by_hand())
