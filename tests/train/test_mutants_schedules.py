"""Boundary cases of nanopipe.train.schedules that mutation testing showed no other test pins
(docs/testing.md); each expected value is worked out by hand in its comment."""
import pytest

from nanopipe.train.schedules import lr_multiplier, lr_multiplier_by_progress


def test_pretrain_lr_without_warmdown_is_1_at_the_last_step():
    # warmdown = round(0 * 20) = 0: `it <= N - 0` holds at it = N, so no (N - it) / 0 is ever computed
    assert lr_multiplier(20, 20, 0.0, 0.0, 0.0) == 1.0


def test_sft_lr_without_warmdown_past_the_end_is_1():
    # warmdown 0 means constant: progress 1.2 (the last batch overshoots the epoch) must not divide by 0
    assert lr_multiplier_by_progress(1.2, 0.0, 0.0, 0.5) == 1.0


def test_sft_lr_is_exactly_1_where_the_warmdown_starts():
    # progress = 1 - 0.2 = 0.8 is still the constant part; computed as a warmdown it would be
    # (1 - 0.8) / 0.2 = 0.9999999999999998, not 1.0
    assert lr_multiplier_by_progress(1 - 0.2, 0.0, 0.2, 0.0) == 1.0


def test_sft_lr_end_of_warmup_inside_an_overlapping_warmdown():
    # warmup 0.6 and warmdown 0.6 overlap; at progress 0.6 the warmup is over, so the warmdown applies:
    # frac = (1 - 0.6) / 0.6 = 2/3, lr = 2/3 + 1/3 * 0.1
    assert lr_multiplier_by_progress(0.6, 0.6, 0.6, 0.1) == pytest.approx(2 / 3 + 0.1 / 3, abs=1e-12)
