"""Training guards (issue 18): a nan/inf loss stops the stage naming the step and leaves nothing for DVC to
cache, or is skipped up to the configured tolerance; identical weights give an identical models/base."""
import json

import pytest
import torch
from helpers import make_cfg, run

from nanopipe.model import gpt
from nanopipe.stage import run_stage
from nanopipe.stages import pretrain
from nanopipe.train.loop import NonFiniteLoss


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    from helpers import make_repo_copy

    repo = make_repo_copy(tmp_path_factory.mktemp("guards") / "repo", "experiment=smoke")
    run(["dvc", "repro", "tokenizer"], repo)
    return repo


@pytest.fixture
def workdir(smoke_repo, tmp_path, monkeypatch):
    """A fresh cwd that sees the smoke repo's shards and tokenizer (in-process stage runs write only here)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "data").symlink_to(smoke_repo / "data")
    (tmp_path / "models/tokenizer").symlink_to(smoke_repo / "models/tokenizer")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _nan_at(monkeypatch, calls):
    """Make the training forward of the given (0-based) call numbers return a nan loss (whose grads are nan).
    The smoke run accumulates 2 micro-steps per step: calls 2k and 2k+1 are step k."""
    forward, n = gpt.GPT.forward, [0]

    def poisoned(self, idx, targets=None, *args, **kwargs):
        out = forward(self, idx, targets, *args, **kwargs)
        if targets is not None and self.training and torch.is_grad_enabled():
            n[0] += 1
            if n[0] - 1 in calls:
                return out * float("nan")
        return out

    monkeypatch.setattr(gpt.GPT, "forward", poisoned)


SMOKE = ("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "pretrain.sample_every=-1")


def test_a_nan_loss_stops_pretrain_naming_the_step_and_writes_nothing(workdir, monkeypatch):
    # step 5's first micro-step (not the last, whose loss is the one logged), after the resume checkpoint of step 4
    _nan_at(monkeypatch, {10})
    with pytest.raises(NonFiniteLoss, match=r"stage pretrain: the training loss is nan at step 5; .*"
                                            r"pretrain.max_nonfinite_steps=0 tolerates none"):
        run_stage(pretrain, make_cfg(*SMOKE))
    assert not (workdir / "models/base").exists()
    assert not (workdir / "metrics/pretrain.json").exists()
    kept = sorted(p.name for p in (workdir / "models/resume/pretrain").glob("step_*"))
    assert kept == ["step_000004"]  # the good checkpoint before the nan; nothing of the poisoned state


def test_spike_tolerance_skips_the_update_and_training_continues(workdir, monkeypatch):
    _nan_at(monkeypatch, {5})  # step 2
    run_stage(pretrain, make_cfg(*SMOKE, "pretrain.max_nonfinite_steps=1"))
    metrics = json.loads((workdir / "metrics/pretrain.json").read_text())
    assert metrics["step"] == 12 and metrics["nonfinite_steps_skipped"] == [2]
    assert metrics["final_val_bpb"] is not None and metrics["train_loss"] == pytest.approx(metrics["train_loss"])  # finite
    weights = torch.load(workdir / "models/base/model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_tolerance_is_a_count(workdir, monkeypatch):
    _nan_at(monkeypatch, {2, 7})  # steps 1 and 3
    with pytest.raises(NonFiniteLoss, match=r"at step 3 \(updates already skipped at steps \[1\]\)"):
        run_stage(pretrain, make_cfg(*SMOKE, "pretrain.max_nonfinite_steps=1"))
    assert not (workdir / "models/base").exists()


def _lock(repo):
    path = repo / "dvc.lock"
    return path.read_text() if path.exists() else ""


def _out_hash(repo, stage, out):
    import yaml

    lock = yaml.safe_load(_lock(repo))
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)


@pytest.mark.slow
def test_divergence_through_dvc_caches_nothing_then_reruns_hash_identically(smoke_repo):
    """A config that really diverges: `dvc repro` fails naming the stage and step; models/base is absent and
    dvc.lock gains no pretrain entry. Then two runs of the good config give one DVC hash for models/base
    (no wall-clock time in meta.json)."""
    import yaml

    repo = smoke_repo
    params = (repo / "params.yaml").read_text()
    lock_before = _lock(repo)
    diverging = yaml.safe_load(params)
    diverging["pretrain"]["matrix_lr"] = 1e30  # finite, so the config accepts it; Muon's updates overflow the MLP
    (repo / "params.yaml").write_text(yaml.safe_dump(diverging, sort_keys=False))
    try:
        p = run(["dvc", "repro", "pretrain"], repo, check=False)
    finally:
        (repo / "params.yaml").write_text(params)
    assert p.returncode != 0
    assert "nanopipe pretrain: stage pretrain: the training loss is nan at step" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert not (repo / "models/base").exists()
    assert _lock(repo) == lock_before and "pretrain:" not in lock_before

    run(["dvc", "repro", "pretrain"], repo)
    first = _out_hash(repo, "pretrain", "models/base")
    run(["dvc", "repro", "-f", "-s", "pretrain"], repo)
    assert _out_hash(repo, "pretrain", "models/base") == first
