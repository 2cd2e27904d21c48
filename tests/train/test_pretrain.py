"""The pretrain stage: bad inputs, the kill -9 resume drill through dvc repro, and a 2-process torchrun run."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import make_cfg, run, subprocess_env

from nanopipe.config import ConfigError
from nanopipe.stage import run_stage
from nanopipe.stages import pretrain


def _ran(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    from helpers import make_repo_copy

    repo = make_repo_copy(tmp_path_factory.mktemp("pretrain") / "repo", "experiment=smoke")
    run(["dvc", "repro", "tokenizer"], repo)
    return repo


def _weights(path):
    return torch.load(path / "model.pt", weights_only=True)


def test_bad_inputs_fail_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="models/tokenizer.*`tokenizer` stage"):
        run_stage(pretrain, make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu"))
    with pytest.raises(Exception, match="model.depth"):
        make_cfg("experiment=smoke", "model.depth=0")


def test_batch_not_divisible_is_a_clear_error(smoke_repo, monkeypatch):
    monkeypatch.chdir(smoke_repo)
    cfg = make_cfg("experiment=smoke", "tracking.enabled=false", "pretrain.total_batch_size=1000")
    with pytest.raises(ConfigError, match=r"`pretrain.total_batch_size` = 1000: expected a multiple of .* = 1024"):
        run_stage(pretrain, cfg)
    assert not (smoke_repo / "models/base").exists()


@pytest.mark.slow
def test_kill9_resume_is_bit_identical(smoke_repo):
    repo = smoke_repo
    out = run(["dvc", "repro", "pretrain"], repo).stdout
    assert "pretrain" in _ran(out)
    reference = _weights(repo / "models/base")
    assert not (repo / "models/resume/pretrain").exists()  # cleared after a successful run

    # Force a rerun and kill it (the whole process group, -9) right after its first checkpoint.
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", "pretrain"], cwd=repo, start_new_session=True, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = repo / "models/resume/pretrain/step_000004/meta.json"
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    # forced: the inputs equal the first run's and every output is cached, so a plain `dvc repro` restores
    # that run's outputs from the cache (docs/decisions.md D20), which is right but skips the resume
    p = run(["dvc", "repro", "-f", "-s", "pretrain"], repo)
    assert "resuming from step" in p.stderr, p.stderr[-3000:]
    steps = [int(r["step"]) for r in csv.DictReader(open(repo / "metrics/pretrain/val.csv"))]
    assert steps == [0, 6, 12]  # the curve from before the kill is kept, nothing is logged twice
    resumed = _weights(repo / "models/base")
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), f"{k} differs after resume"


@pytest.mark.slow
def test_two_process_torchrun_matches_single_process(smoke_repo):
    repo = smoke_repo
    run(["dvc", "repro", "pretrain"], repo)
    single = {int(r["step"]): float(r["val_bpb"]) for r in csv.DictReader(open(repo / "metrics/pretrain/val.csv"))}
    run([sys.executable, "-m", "nanopipe.cli", "compose", "experiment=smoke", "runtime.nproc_per_node=2"], repo)
    p = run(["dvc", "repro", "pretrain"], repo)
    assert "--nproc-per-node=2" in p.stderr
    import json

    m = json.loads((repo / "metrics/pretrain.json").read_text())
    assert m["world_size"] == 2
    double = {int(r["step"]): float(r["val_bpb"]) for r in csv.DictReader(open(repo / "metrics/pretrain/val.csv"))}
    assert single.keys() == double.keys()
    # Same init, global batch and schedule; but the ranks stride over row groups, so both the training
    # documents and the val documents differ from the single process's: the curves agree only closely.
    assert double[0] == pytest.approx(single[0], rel=0.1)
    last = max(single)
    assert double[last] == pytest.approx(single[last], rel=0.1)
    assert double[last] < double[0] - 0.3


# -- the GPU path, driven on CPU through its two outside boundaries ------------------------------


class CountingFloat8Linear(torch.nn.Linear):
    """Stand-in for torchao's Float8Linear: what disable_fp8 looks for (a Linear whose class name holds
    "Float8") and a count of the forwards that went through the fp8 path."""

    forwards = 0

    def forward(self, x):
        type(self).forwards += 1
        return super().forward(x)


class _StandInFloat8Config:
    @classmethod
    def from_recipe_name(cls, name):
        return cls()


def _stand_in_convert(model, *, config=None, module_filter_fn=None):
    """torchao.float8.convert_to_float8_training's contract: swap each Linear the filter accepts, in place."""
    for fqn, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and (module_filter_fn is None or module_filter_fn(mod, fqn)):
            new = CountingFloat8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            new.weight, new.bias = mod.weight, mod.bias
            parent, _, attr = fqn.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)


def _repo_copy(smoke_repo, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(smoke_repo, repo, symlinks=True, ignore=shutil.ignore_patterns("models/base", "metrics"))
    return repo


def test_fp8_is_swapped_out_for_val_bpb_core_and_sampling(smoke_repo, tmp_path, monkeypatch):
    # fp8 needs CUDA and torchao, so the test replaces exactly those two: the hardware refusal and the
    # torchao converter (its stand-in swaps in CountingFloat8Linear). Everything else is the real stage.
    import json

    from nanopipe.model import fp8

    monkeypatch.chdir(_repo_copy(smoke_repo, tmp_path))
    monkeypatch.setattr(fp8, "unsupported_reason", lambda device: None)
    monkeypatch.setattr(fp8, "_torchao", lambda: (_StandInFloat8Config, _stand_in_convert))
    monkeypatch.setattr(CountingFloat8Linear, "forwards", 0)

    calls = []

    def check(name, model, fn):
        """Run fn; record that no Float8 layer was in the model and none ran a forward meanwhile."""
        before = CountingFloat8Linear.forwards
        fp8_layers = [n for n, m in model.named_modules() if "Float8" in type(m).__name__]
        out = fn()
        calls.append((name, fp8_layers, CountingFloat8Linear.forwards - before))
        return out

    real_bpb, real_samples = pretrain.bpb_on_shards, pretrain.greedy_samples

    def core(model, tokenizer, dev, *a, **k):  # the CORE bundle is offline here: a forward stands in for it
        x = torch.tensor([[tokenizer.get_bos_token_id(), 5, 6, 7]], device=dev.device)
        return check("core", model, lambda: (model(x), {"core_metric": 0.25})[1])

    monkeypatch.setattr(pretrain, "bpb_on_shards", lambda model, *a, **k: check("bpb", model, lambda: real_bpb(model, *a, **k)))
    monkeypatch.setattr(pretrain, "greedy_samples", lambda model, *a, **k: check("samples", model, lambda: real_samples(model, *a, **k)))
    monkeypatch.setattr(pretrain, "core_or_unavailable", core)
    cfg = make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "runtime.dtype=float32",
                   "pretrain.fp8=true", "pretrain.num_iterations=2", "pretrain.eval_every=1", "pretrain.core_metric_every=1",
                   "pretrain.sample_every=2", "pretrain.save_every=-1")
    run_stage(pretrain, cfg)

    assert [c[0] for c in calls] == ["bpb", "bpb", "core", "bpb", "core", "samples"]  # steps 0, 1, 2
    for name, fp8_layers, fp8_forwards in calls:
        assert fp8_layers == [] and fp8_forwards == 0, f"{name} ran with fp8 on: {fp8_layers}, {fp8_forwards} fp8 forwards"
    # ... while every training forward went through the fp8 layers: the 12 of the blocks (6 per block; the
    # small ve_gate is filtered out; lm_head is converted too, but the CPU fused loss reads its weight
    # directly), 2 steps x 2 micro-steps of 8 x 128 in a 2048-token batch.
    assert CountingFloat8Linear.forwards == 12 * 2 * 2
    m = json.loads(open("metrics/pretrain.json").read())
    assert (m["train_precision"], m["eval_precision"]) == ("fp8 (tensorwise)", "fp32")


def test_loader_state_is_gathered_only_for_checkpoints_and_gc_runs_periodically(smoke_repo, tmp_path, monkeypatch):
    import gc
    from types import SimpleNamespace

    monkeypatch.chdir(_repo_copy(smoke_repo, tmp_path))
    gathered, collects = [], []
    real_gather = pretrain.gather_state_dicts
    monkeypatch.setattr(pretrain, "gather_state_dicts", lambda s: gathered.append(s) or real_gather(s))
    # gc: the real one, with collect() counted; GC_EVERY shrunk from nanochat's 5000 to fit 12 steps
    monkeypatch.setattr(pretrain, "gc", SimpleNamespace(collect=lambda: collects.append(1) or gc.collect(),
                                                        freeze=gc.freeze, disable=gc.disable, enable=gc.enable))
    monkeypatch.setattr(pretrain, "GC_EVERY", 2)
    try:
        run_stage(pretrain, make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "pretrain.num_iterations=5",
                                     "pretrain.save_every=2", "pretrain.eval_every=-1", "pretrain.sample_every=-1"))
    finally:
        gc.enable()
    # saves at steps 2 and 4 (the last step writes models/base instead): one gather each, of this
    # rank's own state (not one per micro-step: 10 of them)
    assert len(gathered) == 2 and all(isinstance(s, dict) and s["rank"] == 0 for s in gathered)
    # the first step's collect, then one as the step count reaches 2 and 4
    assert len(collects) == 3


def test_windowed_layers_on_a_gpu_without_flash_stop_the_stage(smoke_repo, monkeypatch):
    # A CUDA GPU with neither FA3 nor FA2, fed to the real decision; the stage must stop before training
    # and name the key that opts in. (CPU runs never get here: SDPA is their only path.)
    from nanopipe.model import attention

    monkeypatch.chdir(smoke_repo)
    seen = []
    base = smoke_repo / "models/base/meta.json"  # an earlier test of this module may have trained one
    before = base.stat().st_mtime_ns if base.exists() else None

    def on_a_bare_gpu(window_sizes, seq_len, device, dtype):
        seen.append(window_sizes)
        return attention.sdpa_window_problem("cuda", torch.bfloat16, window_sizes, seq_len, False, False, None, "none installed")

    monkeypatch.setattr(pretrain, "windowed_sdpa_problem", on_a_bare_gpu)
    cfg = make_cfg("experiment=smoke", "tracking.enabled=false", "model.window_pattern=SSSL")
    with pytest.raises(ConfigError, match=r"1 of 2 layers .*model.window_pattern=L.*model.allow_sdpa_window=true"):
        run_stage(pretrain, cfg)
    assert seen and (base.stat().st_mtime_ns if base.exists() else None) == before  # nothing written
    with pytest.raises(ConfigError, match="total_batch_size"):  # opted in: it goes on (to the next check)
        run_stage(pretrain, make_cfg("experiment=smoke", "tracking.enabled=false", "model.window_pattern=SSSL",
                                     "model.allow_sdpa_window=true", "pretrain.total_batch_size=1000"))
    seen.clear()
    monkeypatch.setattr(pretrain, "windowed_sdpa_problem", lambda *a: seen.append(a) or None)  # flash there: no stop
    with pytest.raises(ConfigError, match="total_batch_size"):
        run_stage(pretrain, make_cfg("experiment=smoke", "tracking.enabled=false", "model.window_pattern=SSSL",
                                     "pretrain.total_batch_size=1000"))
    assert seen
