"""nanochat's schedules (nanopipe.train.schedules) against values computed by hand, and the sampler's
distribution away from temperature 1 (nanopipe.inference.engine.sample_next_token)."""
import math

import pytest
import torch

from nanopipe.inference.engine import sample_next_token
from nanopipe.train.schedules import apply_schedule, lr_multiplier, lr_multiplier_by_progress, muon_momentum


@pytest.mark.parametrize("it, expected", [
    # N=100, warmup 10 steps, warmdown the last 50, final 0.1
    (0, 0.1), (4, 0.5), (9, 1.0),  # warmup: (it + 1) / 10
    (10, 1.0), (50, 1.0),  # constant up to and including N - warmdown
    (51, 0.98 + 0.02 * 0.1), (75, 0.5 + 0.5 * 0.1), (99, 0.02 + 0.98 * 0.1), (100, 0.1),  # (N - it) / 50 towards 0.1
])
def test_pretrain_lr_with_warmup_and_final_fraction(it, expected):
    assert lr_multiplier(it, 100, 0.1, 0.5, 0.1) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("it, expected", [(0, 1.0), (250, 1.0), (251, 249 / 250), (400, 100 / 250), (499, 1 / 250)])
def test_pretrain_lr_tiny_preset(it, expected):
    """The tiny preset: 500 steps, no warmup, warmdown over the last half to 0."""
    assert lr_multiplier(it, 500, 0.0, 0.5, 0.0) == pytest.approx(expected, abs=1e-12)


def test_pretrain_lr_warmdown_ratio_zero_is_constant():
    assert [lr_multiplier(it, 20, 0.0, 0.0, 0.0) for it in range(20)] == [1.0] * 20


@pytest.mark.parametrize("progress, expected", [
    (0.025, 0.25), (0.1, 1.0), (0.8, 1.0), (0.9, 0.5 + 0.5 * 0.2), (1.0, 0.2), (1.2, 0.2),  # warmup 0.1, warmdown 0.2, final 0.2
])
def test_sft_lr_by_progress(progress, expected):
    assert lr_multiplier_by_progress(progress, 0.1, 0.2, 0.2) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("it, expected", [(0, 0.85), (30, 0.86), (150, 0.90), (300, 0.95), (5000, 0.95)])
def test_muon_momentum_ramp(it, expected):
    assert muon_momentum(it) == pytest.approx(expected, abs=1e-12)


def test_apply_schedule_scales_initial_lr_and_sets_muon_only_knobs():
    groups = [{"kind": "muon", "initial_lr": 0.02, "lr": 0.0, "momentum": 0.0, "weight_decay": 0.0},
              {"kind": "adamw", "initial_lr": 0.3, "lr": 0.0, "weight_decay": 0.0}]
    opt = type("Opt", (), {"param_groups": groups})()
    apply_schedule(opt, 0.5, momentum=0.9, weight_decay=0.1)
    assert groups[0] == {"kind": "muon", "initial_lr": 0.02, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.1}
    assert groups[1] == {"kind": "adamw", "initial_lr": 0.3, "lr": 0.15, "weight_decay": 0.0}


def _frequencies(logits, temperature, top_k, n=40_000, seed=0):
    rng = torch.Generator().manual_seed(seed)
    rows = logits.expand(n, -1).contiguous()
    draws = sample_next_token(rows, rng, temperature=temperature, top_k=top_k).view(-1)
    return torch.bincount(draws, minlength=logits.size(-1)).double() / n


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampler_distribution_at_temperature(temperature):
    """p_i = exp(l_i / T) / sum_j exp(l_j / T), computed by hand; 40k draws, 5 sigma."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights = [math.exp(v / temperature) for v in logits[0].tolist()]
    expected = torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)
    freq = _frequencies(logits, temperature, None)
    sigma = (expected * (1 - expected) / 40_000).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-12), (freq, expected)


def test_sampler_top_k_renormalises_over_the_k_largest_at_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w = [math.exp(2.0 / 0.5), math.exp(1.0 / 0.5)]
    freq = _frequencies(logits, 0.5, 2)
    assert freq[2] == 0 and freq[3] == 0
    assert freq[0].item() == pytest.approx(w[0] / sum(w), abs=5 * math.sqrt(0.25 / 40_000))


def test_sampler_top_k_edges_and_seeds():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    # k = 1 is greedy at any temperature
    assert torch.equal(sample_next_token(logits, torch.Generator().manual_seed(0), 1.7, 1), logits.argmax(-1, keepdim=True))
    # k >= V keeps every token: the full softmax at T (the draws come in top-k order, so compare distributions)
    small = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights = [math.exp(v / 0.8) for v in small[0].tolist()]
    expected = torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)
    assert torch.all((_frequencies(small, 0.8, 500) - expected).abs() <= 5 * (expected * (1 - expected) / 40_000).sqrt())
    # the same seed gives the same tokens; temperature 0 ignores the generator
    b = sample_next_token(logits, torch.Generator().manual_seed(5), 0.8, None)
    c = sample_next_token(logits, torch.Generator().manual_seed(5), 0.8, None)
    assert torch.equal(b, c)
    assert torch.equal(sample_next_token(logits, None, 0.0), logits.argmax(-1, keepdim=True))
