"""The schedules each training stage actually applies, step by step, against values computed by hand
(issue 19: a stage that stopped scheduling, e.g. every step at the peak LR, passed the whole suite).

tests/train/test_schedules.py checks the schedule functions; here the REAL stage (pretrain, sft, rl,
through nanopipe.stage.run_stage, on the tiny in-process inputs of test_dist_equivalence.py) runs with
`optimizer_step` wrapped where the stage looks it up: the wrapper calls the real one, then records every
param group's lr / initial_lr / momentum / weight_decay, i.e. what the optimizer stepped with. The
expected per-step values are literal numbers written from the formulas (nanochat base_train.py,
chat_sft.py, chat_rl.py), never from the functions under test:

- pretrain, step s of N: LR x (s + 1) / warmup during the round(warmup_ratio N) warmup steps, x 1 up to
  step N - warmdown, then x p + (1 - p) final_lr_frac with p = (N - s) / warmdown; Muon momentum
  0.85 + 0.1 s / 300; Muon weight decay wd (1 - s / N);
- sft (num_iterations N > 0), progress after step s is (s + 1) / N: LR x progress / warmup_ratio in the
  warmup, x 1, then x f + (1 - f) final_lr_frac with f = (1 - progress) / warmdown_ratio; Muon momentum
  as in pretrain; weight decay constant; every initial LR is the configured one x init_lr_frac;
- rl: LR x (1 - s / num_steps) from the configured LRs x init_lr_frac; momentum and weight decay are
  not scheduled (nanochat chat_rl.py touches neither), so they stay at their setup values.

Planted bugs these tests fail on (each checked, then reverted): a constant LR (`optimizer_step(..., 1.0, ...)`)
in pretrain, sft and rl; pretrain's or sft's momentum schedule dropped (0.95 every step); pretrain's
weight-decay schedule dropped or made constant; rl's decay inverted ((s + 1) / N) or shifted by one step
(1 - (s + 1) / N); sft's or rl's init_lr_frac not applied.
"""
import json
import math
import shutil

import pytest
import torch
from helpers import make_cfg
from test_dist_equivalence import _pretrain_inputs, _rl_inputs, _sft_inputs

from nanopipe.stage import run_stage
from nanopipe.stages import pretrain, rl, sft
from nanopipe.train.schedules import lr_multiplier_by_progress

COMMON = ["experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "runtime.threads=1"]
INPUTS = {"pretrain": _pretrain_inputs, "sft": _sft_inputs, "rl": _rl_inputs}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Each stage's inputs, built once: a copy goes to every test's working directory."""
    root = tmp_path_factory.mktemp("inputs")
    built = {}

    def get(stage):
        if stage not in built:
            INPUTS[stage](root / stage)
            built[stage] = root / stage
        return built[stage]
    return get


def run_recorded(module, inputs, tmp_path, monkeypatch, *overrides) -> list[list[dict]]:
    """Run the stage in a copy of its inputs; for each optimizer step, every param group's schedule
    after the stage's `optimizer_step` (what the optimizer stepped with)."""
    stage = module.__name__.rsplit(".", 1)[-1]
    work = tmp_path / stage
    shutil.copytree(inputs(stage), work)
    monkeypatch.chdir(work)
    steps = []
    real = module.optimizer_step

    def recording_step(optimizer, model, *a, **k):
        real(optimizer, model, *a, **k)
        steps.append([{"kind": g.get("kind"), "lr": g["lr"], "initial_lr": g["initial_lr"],
                       "momentum": g.get("momentum"), "weight_decay": g.get("weight_decay")}
                      for g in optimizer.param_groups])
    monkeypatch.setattr(module, "optimizer_step", recording_step)
    torch.manual_seed(0)
    run_stage(module, make_cfg(*COMMON, *overrides))
    return steps


def lr_multipliers(steps) -> list[float]:
    """The per-step LR multiplier, checked to be the same for every group."""
    out = []
    for s, groups in enumerate(steps):
        ratios = [g["lr"] / g["initial_lr"] for g in groups]
        assert max(ratios) - min(ratios) < 1e-12, f"step {s}: groups scheduled apart: {ratios}"
        out.append(ratios[0])
    return out


def muon(steps, key) -> list[float]:
    """A Muon-only knob per step, checked to be the same for every Muon group."""
    out = []
    for s, groups in enumerate(steps):
        values = {g[key] for g in groups if g["kind"] == "muon"}
        assert len(values) == 1, f"step {s}: Muon groups disagree on {key}: {values}"
        out.append(values.pop())
    return out


def assert_close(got, expected, what):
    assert len(got) == len(expected), f"{what}: {len(got)} optimizer steps, expected {len(expected)}"
    bad = [(s, g, e) for s, (g, e) in enumerate(zip(got, expected)) if not math.isclose(g, e, rel_tol=1e-9, abs_tol=1e-12)]
    assert not bad, f"{what} (step, got, expected): {bad}\n  got {got}\n  expected {expected}"


def adamw_initial_lrs(steps) -> list[float]:
    """The AdamW groups' initial LRs: lm_head, wte, value embeds, resid lambdas, x0 lambdas (setup_optimizer)."""
    return [g["initial_lr"] for g in steps[0] if g["kind"] == "adamw"]


# Momentum 0.85 -> 0.95 over 300 steps: 0.85 + 0.1 s / 300 = 0.85 + s / 3000.
MOMENTUM_10 = [0.85, 0.8503333333333334, 0.8506666666666667, 0.851, 0.8513333333333334, 0.8516666666666667,
               0.852, 0.8523333333333334, 0.8526666666666667, 0.853]


# -- pretrain ------------------------------------------------------------------------------------------


PRETRAIN = ["pretrain.device_batch_size=4", "pretrain.total_batch_size=512", "pretrain.num_iterations=10",
            "pretrain.eval_every=-1", "pretrain.eval_tokens=512", "pretrain.sample_every=-1", "pretrain.save_every=-1",
            "pretrain.keep_checkpoints=0", "pretrain.loader_threads=1"]


@pytest.mark.parametrize("settings, expected_lrm", [
    # N=10, warmup round(0.2 N) = 2 steps, warmdown round(0.5 N) = 5 steps towards 0.1
    (["pretrain.warmup_ratio=0.2", "pretrain.warmdown_ratio=0.5", "pretrain.final_lr_frac=0.1"],
     [0.5, 1.0,  # warmup: (s + 1) / 2
      1.0, 1.0, 1.0, 1.0,  # constant through step N - warmdown = 5
      0.82, 0.64, 0.46, 0.28]),  # p = 4/5, 3/5, 2/5, 1/5: p + 0.1 (1 - p)
    # the smoke/tiny shape: no warmup, warmdown round(0.3 N) = 3 steps to 0
    (["pretrain.warmup_ratio=0.0", "pretrain.warmdown_ratio=0.3", "pretrain.final_lr_frac=0.0"],
     [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3]),
], ids=["warmup-warmdown-final", "warmdown-only"])
def test_pretrain_steps_with_the_hand_computed_lr_momentum_and_weight_decay(settings, expected_lrm, inputs, tmp_path,
                                                                           monkeypatch):
    steps = run_recorded(pretrain, inputs, tmp_path, monkeypatch, *PRETRAIN, "pretrain.weight_decay=0.2", *settings)
    assert_close(lr_multipliers(steps), expected_lrm, "pretrain LR multiplier")
    assert_close(muon(steps, "momentum"), MOMENTUM_10, "pretrain Muon momentum")
    wd = json.loads((tmp_path / "pretrain/metrics/pretrain.json").read_text())["weight_decay"]  # the plan's, scaled
    assert wd > 0
    assert_close(muon(steps, "weight_decay"), [wd * f for f in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)],
                 "pretrain Muon weight decay (wd x (1 - s / 10))")
    # the AdamW groups take no momentum / weight-decay schedule: AdamW weight decay stays 0
    assert all(g["weight_decay"] == 0.0 for step in steps for g in step if g["kind"] == "adamw")


# -- sft -------------------------------------------------------------------------------------------------


SFT = ["sft.max_seq_len=64", "sft.device_batch_size=4", "sft.total_batch_size=256", "sft.num_iterations=10",
       "sft.eval_every=-1", "sft.eval_tokens=256", "sft.save_every=-1", "sft.keep_checkpoints=0", "sft.sample_tokens=0",
       "sft.embedding_lr=0.3", "sft.unembedding_lr=0.004", "sft.matrix_lr=0.02", "sft.scalar_lr=0.5",
       "sft.weight_decay=0.1"]
# (n_embd / 768)^-0.5 for the smoke model (depth 2 x aspect ratio 64 = 128 wide): sqrt(6)
SQRT6 = 2.449489742783178


@pytest.mark.parametrize("settings, init_lr_frac, expected_lrm", [
    # progress (s + 1) / 10; warmup 0.2, warmdown 0.4 towards 0.1
    (["sft.warmup_ratio=0.2", "sft.warmdown_ratio=0.4", "sft.final_lr_frac=0.1"], 0.5,
     [0.5,  # progress 0.1: 0.1 / 0.2
      1.0, 1.0, 1.0, 1.0, 1.0,  # progress 0.2 .. 0.6 = 1 - warmdown
      0.775, 0.55, 0.325, 0.1]),  # f = 0.75, 0.5, 0.25, 0: f + 0.1 (1 - f)
    # the default shape: no warmup, warmdown 0.2 to 0, full LR
    (["sft.warmup_ratio=0.0", "sft.warmdown_ratio=0.2", "sft.final_lr_frac=0.0"], 1.0,
     [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0]),
], ids=["warmup-warmdown-final-half-lr", "default-shape"])
def test_sft_steps_with_the_hand_computed_lr_and_momentum(settings, init_lr_frac, expected_lrm, inputs, tmp_path,
                                                          monkeypatch):
    steps = run_recorded(sft, inputs, tmp_path, monkeypatch, *SFT, f"sft.init_lr_frac={init_lr_frac}", *settings)
    assert_close(lr_multipliers(steps), expected_lrm, "sft LR multiplier")
    assert_close(muon(steps, "momentum"), MOMENTUM_10, "sft Muon momentum")
    assert_close(muon(steps, "weight_decay"), [0.1] * 10, "sft Muon weight decay (not scheduled)")
    # initial LRs: configured x init_lr_frac (AdamW lm_head / embeddings also x sqrt(768 / n_embd))
    f = init_lr_frac
    assert_close(adamw_initial_lrs(steps), [0.004 * SQRT6 * f, 0.3 * SQRT6 * f, 0.3 * SQRT6 * f, 0.005 * f, 0.5 * f],
                 "sft AdamW initial LRs")
    assert_close(sorted({g["initial_lr"] for g in steps[0] if g["kind"] == "muon"}), [0.02 * f], "sft Muon initial LR")


@pytest.mark.parametrize("progress, warmup, warmdown, final, expected", [
    # step 0 / mid / last of N = 4 steps (progress 1/4, 2/4, 3/4, 1)
    (0.25, 0.0, 0.5, 0.0, 1.0), (0.5, 0.0, 0.5, 0.0, 1.0), (0.75, 0.0, 0.5, 0.0, 0.5), (1.0, 0.0, 0.5, 0.0, 0.0),
    # N = 5, warmup 0.4, warmdown 0.4 towards 0.2: 0.2 / 0.4; 1; 1; f = 0.5: 0.6; 0.2
    (0.2, 0.4, 0.4, 0.2, 0.5), (0.4, 0.4, 0.4, 0.2, 1.0), (0.6, 0.4, 0.4, 0.2, 1.0), (0.8, 0.4, 0.4, 0.2, 0.6),
    (1.0, 0.4, 0.4, 0.2, 0.2),
    # the whole run is warmdown (ratio 1) towards 0.5: f = 1 - progress
    (0.1, 0.0, 1.0, 0.5, 0.95), (0.5, 0.0, 1.0, 0.5, 0.75), (1.0, 0.0, 1.0, 0.5, 0.5),
    # warmdown 0: constant, whatever the final fraction
    (0.5, 0.0, 0.0, 0.3, 1.0), (1.0, 0.0, 0.0, 0.3, 1.0),
    # one epoch (num_iterations -1): progress is capped at 1, the last step lands on final_lr_frac
    (1.0, 0.0, 0.2, 0.05, 0.05),
])
def test_sft_schedule_at_step_zero_mid_and_last(progress, warmup, warmdown, final, expected):
    assert lr_multiplier_by_progress(progress, warmup, warmdown, final) == pytest.approx(expected, abs=1e-12)


# -- rl --------------------------------------------------------------------------------------------------


RL = ["rl.task=arithmetic", "rl.arithmetic_max_steps=1", "rl.save_every=-1", "rl.keep_checkpoints=0",
      "rl.eval_every=-1", "rl.eval_examples=2", "rl.embedding_lr=0.2", "rl.unembedding_lr=0.004", "rl.matrix_lr=0.02",
      "rl.weight_decay=0.1"]
# (n_embd / 768)^-0.5 for the RL test model (depth 2 x aspect ratio 64 = 128 wide): sqrt(6); its scalar LR is
# setup_optimizer's default 0.5 (rl sets none)


@pytest.mark.parametrize("num_steps, init_lr_frac, expected_lrm", [
    (4, 0.05, [1.0, 0.75, 0.5, 0.25]),  # 1 - s / 4: never 0 on a step (nanochat chat_rl.py)
    (2, 0.5, [1.0, 0.5]),
], ids=["4-steps-default-frac", "2-steps-half-lr"])
def test_rl_steps_with_the_hand_computed_linear_decay(num_steps, init_lr_frac, expected_lrm, inputs, tmp_path,
                                                      monkeypatch):
    steps = run_recorded(rl, inputs, tmp_path, monkeypatch, *RL, f"rl.num_steps={num_steps}",
                         f"rl.init_lr_frac={init_lr_frac}")
    assert_close(lr_multipliers(steps), expected_lrm, "rl LR multiplier")
    # not scheduled: setup_optimizer's Muon momentum and the configured weight decay on every step
    assert_close(muon(steps, "momentum"), [0.95] * num_steps, "rl Muon momentum")
    assert_close(muon(steps, "weight_decay"), [0.1] * num_steps, "rl Muon weight decay")
    f = init_lr_frac
    assert_close(adamw_initial_lrs(steps), [0.004 * SQRT6 * f, 0.2 * SQRT6 * f, 0.2 * SQRT6 * f, 0.005 * f, 0.5 * f],
                 "rl AdamW initial LRs")
    assert_close(sorted({g["initial_lr"] for g in steps[0] if g["kind"] == "muon"}), [0.02 * f], "rl Muon initial LR")
