"""Experiment workflows: scaling-law queueing and collection, and DVC sweeps through real `dvc exp`."""
import csv
import json
import math
import sys

import pytest
from helpers import make_repo_copy, run

from nanopipe import experiments

# ----------------------------------------------------------------------------- fabricated `dvc exp show --json`


def _rev(name, depth, metrics, params=None):
    params = params or {"model": {"depth": depth, "aspect_ratio": 64, "head_dim": 128},
                        "pretrain": {"num_iterations": metrics.get("_iters", -1), "target_flops": metrics.get("_budget", -1.0),
                                     "target_param_data_ratio": metrics.get("_ratio", -1.0)}}
    metrics = {k: v for k, v in metrics.items() if not k.startswith("_")}
    return {"rev": f"{abs(hash(name)):040x}"[:40], "name": name, "error": None, "experiments": None,
            "data": {"params": {"params.yaml": {"data": params}},
                     "metrics": {"metrics/download.json": {"data": {"wall_time_s": 1}},
                                 "metrics/pretrain.json": {"data": metrics}}}}


def _exp(name, depth, metrics, state="success"):
    return {"name": name, "executor": {"state": state, "name": "dvc-task"}, "revs": [_rev(name, depth, metrics)]}


def _scaling_metrics(budget, n_scaling, bpb):
    tokens = budget / (6 * n_scaling)
    return {"_budget": budget, "num_params": 3 * n_scaling,
            "num_scaling_params": n_scaling, "step": round(tokens / 524288), "total_batch_size": 524288,
            "total_tokens": tokens, "tokens_per_scaling_param": tokens / n_scaling, "flops_per_token": 6 * n_scaling,
            "total_flops": budget, "final_val_bpb": bpb, "min_val_bpb": bpb, "core_metric": None,
            "training_time_s": 100.0, "wall_time_s": 120.0,
            "param_counts": {"wte": n_scaling // 4, "value_embeds": n_scaling, "lm_head": n_scaling // 4,
                             "transformer_matrices": n_scaling - n_scaling // 4, "scalars": 16, "total": 3 * n_scaling}}


# val bpb is an exact quadratic in log10(params) per budget, minimum at 10^7.5 (1e18) and 10^7.7 (2.15e18)
OPT = {1e18: (7.5, 1.0), 2.15e18: (7.7, 0.9)}
DEPTHS = [8, 10, 12, 14, 16]


def _bpb(budget, n):
    x0, y0 = OPT[budget]
    return y0 + 0.3 * (math.log10(n) - x0) ** 2


def fabricated_exp_show():
    exps = []
    for budget in OPT:
        for i, d in enumerate(DEPTHS):
            n = round(10 ** (6.9 + 0.3 * i))
            exps.append(_exp(f"scaling-{experiments.fmt_flops(budget)}-d{d}", d, _scaling_metrics(budget, n, _bpb(budget, n))))
    # not part of the study: still queued, failed, and an ordinary sweep experiment (fixed iterations)
    exps.append(_exp("scaling-1e19-d8", 8, _scaling_metrics(1e19, 10**7, 0.5), state="queued"))
    exps.append(_exp("scaling-1e19-d10", 10, _scaling_metrics(1e19, 10**7, 0.5), state="failed"))
    # an ordinary sweep point: the budget is set, but num_iterations takes precedence
    exps.append(_exp("scaling-sweep", 4, {"_iters": 500, "_budget": 1e18, "final_val_bpb": 2.0, "num_scaling_params": 10**6}))
    mini = {"_ratio": 10.5}
    for d, n, bpb in [(10, 10**7, 1.2), (12, 2 * 10**7, 1.1), (14, 4 * 10**7, 1.0)]:
        exps.append(_exp(f"miniseries-r10.5-d{d}", d, {**mini, "num_scaling_params": n, "final_val_bpb": bpb,
                                                        "total_tokens": 10.5 * n, "num_params": 2 * n}))
    return [{"rev": "workspace", "name": None, "data": {"params": {}, "metrics": {}}, "error": None, "experiments": None},
            {"rev": "a" * 40, "name": "main", "data": {"params": {}, "metrics": {}}, "error": None, "experiments": exps}]


def test_scaling_commands():
    cmds = experiments.scaling_commands([1e18, 2.15e18], [8, 10], sets=["experiment=d12"])
    assert [n for n, _ in cmds] == ["scaling-1e18-d8", "scaling-1e18-d10", "scaling-2.15e18-d8", "scaling-2.15e18-d10"]
    name, argv = cmds[2]
    assert argv[:6] == ["dvc", "exp", "run", "--queue", "--name", name] and argv[-1] == "pretrain"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    assert sets == ["pretrain.target_flops=2.15e+18", "pretrain.target_param_data_ratio=-1", "pretrain.num_iterations=-1",
                    "model.depth=8", "pretrain.core_metric_every=-1", "pretrain.sample_every=-1", "pretrain.save_every=-1",
                    "experiment=d12"]
    core = experiments.scaling_commands([1e18], [8], core=True)[0][1]
    assert "pretrain.core_metric_every=999999" in core and "pretrain.core_metric_max_per_task=-1" in core
    mini = experiments.miniseries_commands([10, 12], 8.25)
    assert [n for n, _ in mini] == ["miniseries-r8.25-d10", "miniseries-r8.25-d12"]
    assert "pretrain.target_param_data_ratio=8.25" in mini[0][1] and "pretrain.target_flops=-1" in mini[0][1]
    assert experiments.fmt_flops(4.64e18) == "4.64e18" and experiments.fmt_flops(1e19) == "1e19"


def test_queue_skips_existing_experiments(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "dvc_json", lambda args, cwd: fabricated_exp_show())
    calls = []
    monkeypatch.setattr(experiments.subprocess, "run", lambda argv, **kw: calls.append(argv))
    queued = experiments.queue(experiments.scaling_commands([1e18], [8, 18]), tmp_path)
    assert queued == ["scaling-1e18-d18"] and len(calls) == 1 and "--name" in calls[0]
    assert "skip scaling-1e18-d8: experiment exists" in capsys.readouterr().out


def test_collect_scaling_from_fabricated_exp_show(tmp_path):
    result = experiments.collect(fabricated_exp_show(), "scaling", out_dir=tmp_path / "scaling")
    with open(tmp_path / "scaling/results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == experiments.COLUMNS
    assert [(float(r["flops_budget"]), int(r["depth"])) for r in rows] == [(b, d) for b in OPT for d in DEPTHS]
    r = rows[1]  # 1e18, d10
    n = round(10**7.2)
    assert r["experiment"] == "scaling-1e18-d10" and r["kind"] == "scaling" and int(r["model_dim"]) == 640
    assert int(r["num_scaling_params"]) == n and int(r["params_total"]) == 3 * n
    assert int(r["params_transformer"]) == n - n // 4 and int(r["params_scalars"]) == 16
    assert float(r["val_bpb"]) == pytest.approx(_bpb(1e18, n)) and float(r["total_flops"]) == 1e18
    assert float(r["tokens_trained"]) == pytest.approx(1e18 / (6 * n))

    # the fitted optimum per budget is the vertex of the quadratic; tokens follow budget / 6N
    optima = {o["group"]: o for o in result["optima"]}
    for budget, (x0, y0) in OPT.items():
        o = optima[budget]
        assert o["fit"] and o["inside"] and o["points"] == 5
        assert math.log10(o["params"]) == pytest.approx(x0, abs=1e-6) and o["val_bpb"] == pytest.approx(y0, abs=1e-6)
        assert o["tokens"] == pytest.approx(budget / (6 * 10**x0), rel=1e-4)
    with open(tmp_path / "scaling/optima.csv") as f:
        opt_rows = list(csv.DictReader(f))
    assert [float(r["flops_budget"]) for r in opt_rows] == list(OPT) and opt_rows[0]["fitted"] == "True"
    png = (tmp_path / "scaling/scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_collect_miniseries_and_cli(tmp_path, monkeypatch, capsys):
    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps(fabricated_exp_show()))
    monkeypatch.chdir(tmp_path)
    experiments.main(["collect", "miniseries", "--from-json", str(saved)])
    with open(tmp_path / "metrics/miniseries/results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["depth"]) for r in rows] == [10, 12, 14] and {r["kind"] for r in rows} == {"miniseries"}
    assert (tmp_path / "metrics/miniseries/miniseries.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote metrics/miniseries/results.csv" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no finished scaling experiments named nope-"):
        experiments.main(["collect", "scaling", "--from-json", str(saved), "--label", "nope"])


def test_fit_optimum_without_an_interior_minimum():
    # two points: no fit, the best measured one
    assert experiments.fit_optimum([1e6, 1e7], [1.2, 1.1]) == {"params": 1e7, "val_bpb": 1.1, "fit": False, "coeffs": None}
    # concave: no minimum, the best measured point
    o = experiments.fit_optimum([1e6, 1e7, 1e8], [1.0, 1.5, 1.2])
    assert not o["fit"] and o["params"] == 1e6
    # monotone decreasing: the vertex lies beyond the largest model; clamp and flag it
    o = experiments.fit_optimum([1e6, 1e7, 1e8], [1.5, 1.2, 1.0])
    assert o["fit"] and not o["inside"] and o["params"] == pytest.approx(1e8)
    assert experiments.fit_optimum([], []) is None


# ----------------------------------------------------------------------------- real DVC + MLflow

@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    """A repo copy on the smoke preset with download+tokenizer reproduced and committed, so that
    queued experiments only run pretrain. The copy runs its own src/ (PYTHONPATH), not the live tree."""
    repo = make_repo_copy(tmp_path_factory.mktemp("exp") / "repo", "experiment=smoke")
    env = {"PYTHONPATH": str(repo / "src")}
    run(["dvc", "repro", "tokenizer"], repo, env=env)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "data and tokenizer"], repo)
    return repo, env


def _exp_show(repo, env):
    return json.loads(run(["dvc", "exp", "show", "--json"], repo, env=env).stdout)


@pytest.mark.slow
def test_queued_grid_sweep_through_dvc_and_mlflow(smoke_repo):
    repo, env = smoke_repo
    # dvc's hydra integration recomposes params.yaml from conf/ with only these overrides: name the preset
    run(["dvc", "exp", "run", "--queue", "-S", "experiment=smoke", "-S", "pretrain.matrix_lr=0.01,0.02",
         "-S", "model.depth=1,2", "pretrain"], repo, env=env)
    run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], repo, env=env)

    found = {}
    for base in _exp_show(repo, env):
        for exp in base.get("experiments") or []:
            rev = exp["revs"][0]
            assert exp["executor"]["state"] == "success", exp
            params = rev["data"]["params"]["params.yaml"]["data"]
            metrics = rev["data"]["metrics"]["metrics/pretrain.json"]["data"]
            assert math.isfinite(metrics["final_val_bpb"]) and metrics["num_scaling_params"] > 0
            assert params["tokenizer"]["vocab_size"] == 512  # the smoke preset, not the default
            found[exp["name"]] = (params["pretrain"]["matrix_lr"], params["model"]["depth"], metrics)
    assert sorted((lr, d) for lr, d, _ in found.values()) == [(0.01, 1), (0.01, 2), (0.02, 1), (0.02, 2)]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")  # queued runs land in the real repo's store
    runs = mlflow.search_runs(experiment_names=["nanopipe"], filter_string="tags.stage = 'pretrain'", output_format="list")
    by_exp = {r.data.tags["dvc_exp"]: r for r in runs}
    assert len(runs) == 4 and set(by_exp) == set(found)
    for name, (lr, depth, metrics) in found.items():
        r = by_exp[name]
        assert r.info.status == "FINISHED" and r.info.run_name == f"{name}/pretrain"
        assert float(r.data.params["pretrain.matrix_lr"]) == lr and int(r.data.params["model.depth"]) == depth
        assert r.data.metrics["final_val_bpb"] == pytest.approx(metrics["final_val_bpb"])
        # artifacts live under the real repo, not the executor's temp dir that DVC deletes
        assert r.info.artifact_uri.startswith(str(repo)) or r.info.artifact_uri.startswith(f"file://{repo}")
        assert {"pretrain.json", "pretrain.md"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}


@pytest.mark.slow
def test_scaling_study_at_tiny_scale(smoke_repo, tmp_path):
    repo, env = smoke_repo
    # budget 4e10 FLOPs: ~33 steps at depth 1, ~6 at depth 2 (smoke: 2048-token batches)
    cmd = [sys.executable, "-m", "nanopipe.experiments", "scaling", "--budgets", "4e10", "--depths", "1,2",
           "--label", "tiny", "--set", "experiment=smoke", "--set", "pretrain.eval_every=-1", "--run"]
    out = run(cmd, repo, env=env).stdout
    assert "queued 2 experiment(s)" in out
    out = run(cmd[:-1], repo, env=env).stdout  # queueing again skips what exists
    assert "queued 0 experiment(s); 2 already existed" in out

    out = run([sys.executable, "-m", "nanopipe.experiments", "collect", "scaling", "--label", "tiny"], repo, env=env).stdout
    with open(repo / "metrics/scaling/results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["experiment"], int(r["depth"])) for r in rows] == [("tiny-4e10-d1", 1), ("tiny-4e10-d2", 2)]
    for r in rows:
        assert float(r["flops_budget"]) == 4e10 and math.isfinite(float(r["val_bpb"]))
        # the horizon came from the budget: iterations x batch x FLOPs/token is the budget, to one step
        assert abs(float(r["total_flops"]) - 4e10) <= float(r["flops_per_token"]) * int(r["total_batch_size"])
    assert int(rows[0]["num_iterations"]) > int(rows[1]["num_iterations"])  # smaller model, more steps
    assert (repo / "metrics/scaling/scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "optimum @ 4e+10" in out
