"""Lineage (docs/decisions.md, D21): every metrics file records the fingerprints of the artifacts its stage read
and wrote, and `nanopipe.experiments show` flags a stage whose metrics were computed from artifacts that are not
this experiment's own. The slow test drives real `dvc exp run` in a repo copy."""
import json
import re
import shutil

import pytest
import yaml
from helpers import REPO, make_cfg, make_repo_copy, run

from nanopipe import artifacts, experiments, paths
from nanopipe.stage import run_stage
from nanopipe.stages import download as download_stage
from nanopipe.stages import tokenizer as tokenizer_stage


def _non_code(items) -> set[str]:
    names = {next(iter(i)) if isinstance(i, dict) else i for i in items or []}
    return {n for n in names if not n.startswith("src/") and not n.startswith(str(paths.SECTIONS) + "/")}


def test_lineage_table_is_dvc_yaml():
    """paths.LINEAGE lists each stage's data deps and its outputs (not its own metrics, section or plots)
    exactly as dvc.yaml does: the stamps describe what DVC tracks."""
    stages = {}
    for f in ("dvc.yaml", "stages/lm_eval/dvc.yaml"):
        stages.update(yaml.safe_load((REPO / f).read_text())["stages"])
    for name, st in stages.items():
        outs = _non_code(st.get("outs")) - {str(paths.metrics_file(name))}
        if name == "report":  # its own report card and its charts, not artifacts another stage reads
            outs -= {"metrics/report.md", "metrics/report"}
        assert name in paths.LINEAGE, f"stage {name}: not in paths.LINEAGE"
        inputs, outputs = paths.LINEAGE[name]
        assert {str(p) for p in inputs} == _non_code(st.get("deps")), f"stage {name}: inputs differ from dvc.yaml deps"
        assert {str(p) for p in outputs} == outs, f"stage {name}: outputs differ from dvc.yaml outs"
    assert set(paths.LINEAGE) == set(stages)


def test_fingerprints(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes(b"weights")
    (ckpt / "meta.json").write_text('{"files": {"model.pt": {"sha256": "abc"}}}')
    fp = artifacts.fingerprint(ckpt)
    assert fp == "sha256:" + artifacts.sha256_file(ckpt / "meta.json")
    (ckpt / "meta.json").write_text('{"files": {"model.pt": {"sha256": "abd"}}}')
    assert artifacts.fingerprint(ckpt) != fp
    # a meta.json that does not record every file's hash cannot stand for the directory: every file is hashed
    (ckpt / "meta.json").write_text('{"files": {"model.pt": {"bytes": 7}}}')
    before = artifacts.fingerprint(ckpt)
    (ckpt / "model.pt").write_bytes(b"weightz")
    assert artifacts.fingerprint(ckpt) != before
    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    (plain / "sub/a.txt").write_text("a")
    before = artifacts.fingerprint(plain)
    (plain / "sub/a.txt").rename(plain / "a.txt")  # same bytes, another name: another artifact
    assert artifacts.fingerprint(plain) != before
    assert artifacts.fingerprint(tmp_path / "missing") is None
    # a JSON file: the fingerprint a reader of `dvc exp show --json` recomputes from the parsed data
    m = tmp_path / "m.json"
    m.write_text('{"b": 1.5,\n "a": [1, null]}\n')
    assert artifacts.fingerprint(m) == artifacts.json_fingerprint(json.loads(m.read_text())) \
        == artifacts.json_fingerprint({"a": [1, None], "b": 1.5})


def test_stamps_and_a_stale_downstream_stage(tmp_path, monkeypatch):
    """The contract stamps download.json and tokenizer.json; after download reruns with another seed, the
    tokenizer's metrics (not rerun) no longer match the shards: inherited."""
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("experiment=smoke", "tracking.enabled=false")
    run_stage(download_stage, cfg)
    run_stage(tokenizer_stage, cfg)
    d, t = artifacts.read_json("metrics/download.json"), artifacts.read_json("metrics/tokenizer.json")
    shards_fp = "sha256:" + artifacts.sha256_file("data/shards/manifest.json")
    assert d["lineage"] == {"inputs": {}, "outputs": {"data/shards": shards_fp}}
    assert t["lineage"] == {"inputs": {"data/shards": shards_fp},
                            "outputs": {"models/tokenizer": artifacts.fingerprint("models/tokenizer")}}
    assert t["lineage"]["outputs"]["models/tokenizer"].startswith("sha256:")
    assert experiments.stage_origins({"download": d, "tokenizer": t}) == {"download": "own", "tokenizer": "own"}

    run_stage(download_stage, make_cfg("experiment=smoke", "tracking.enabled=false", "data.seed=7"))
    d2 = artifacts.read_json("metrics/download.json")
    assert d2["lineage"]["outputs"]["data/shards"] != shards_fp
    assert experiments.stage_origins({"download": d2, "tokenizer": t}) == {"download": "own", "tokenizer": "inherited"}
    # a chain: whatever ran on the inherited tokenizer is inherited too, although its input matches
    tok_eval = {"lineage": {"inputs": {"data/shards": d2["lineage"]["outputs"]["data/shards"],
                                       "models/tokenizer": t["lineage"]["outputs"]["models/tokenizer"]}, "outputs": {}}}
    assert experiments.stage_origins({"download": d2, "tokenizer": t, "tok_eval": tok_eval})["tok_eval"] == "inherited"
    # a file from before lineage was recorded: unknown, never claimed as own
    legacy = {k: v for k, v in t.items() if k != "lineage"}
    assert experiments.stage_origins({"download": d2, "tokenizer": legacy})["tokenizer"] == "unknown"
    assert experiments.stage_origins({"download": {"x": 1}, "tokenizer": t})["tokenizer"] == "unknown"
    # an input whose producer did not run in this experiment cannot be its own
    assert experiments.stage_origins({"tokenizer": t})["tokenizer"] == "inherited"


def test_export_metrics_inputs_compare_with_the_parsed_metrics():
    pre = {"final_val_bpb": 1.25, "lineage": {"inputs": {}, "outputs": {}}}
    export = {"lineage": {"inputs": {"metrics/pretrain.json": artifacts.json_fingerprint(pre)}, "outputs": {}}}
    assert experiments.stage_origins({"pretrain": pre, "export": export})["export"] == "own"
    assert experiments.stage_origins({"pretrain": {**pre, "final_val_bpb": 1.2}, "export": export})["export"] == "inherited"


def test_show_table_stays_at_15_columns():
    """A grid over a different preset changes many params at once: 6 columns, a note names the rest."""
    def rev(name, k):
        params = {"model": {f"p{i}": k for i in range(8)}, "same": 1}
        metrics = {"metrics/pretrain.json": {"data": {"final_val_bpb": 1.0 + k}}}
        return {"rev": name * 5, "name": name, "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}
    exp_show = [{**rev("a", 0), "experiments": [{"name": "b", "executor": {"state": "success"}, "revs": [rev("b", 1)]},
                                                {"name": "c", "executor": {"state": "failed"}, "revs": [rev("c", 2)]}]}]
    header, table, notes = experiments.show_table(exp_show)
    assert len(header) == 15 and header[1:7] == [f"model.p{i}" for i in range(6)]
    assert [r[0] for r in table] == ["a", "b"]  # the failed experiment is not a result
    assert table[1][header.index("pretrain val_bpb")] == "2?"  # no lineage recorded: never shown as own
    assert notes[0].startswith("2 more params differ between the rows, not shown: model.p6, model.p7")
    header, _, _ = experiments.show_table(exp_show, ["same"])
    assert header[:2] == ["experiment", "same"]


# ----------------------------------------------------------------------------- real DVC experiments

def _ran(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


@pytest.mark.slow
def test_an_experiment_up_to_pretrain_shows_downstream_metrics_as_inherited(tmp_path):
    """Baseline: the smoke chain through chat_eval (base_eval is not on its way), committed. Experiment:
    another matrix_lr, run up to pretrain only; its commit carries the baseline's sft/rl/chat_eval metrics
    files and curves. `dvc exp show` lists them as the experiment's; `experiments show` marks them
    inherited and `experiments plots` leaves their curves out. The baseline's SFT model is then fetched by
    its registry name (`dvc artifacts get`)."""
    repo = make_repo_copy(tmp_path / "repo", "experiment=smoke", "tracking.enabled=false")
    env = {"PYTHONPATH": str(repo / "src")}
    run(["dvc", "repro", "chat_eval"], repo, env=env)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    out = run(["dvc", "exp", "run", "-n", "lr01", "-S", "experiment=smoke", "-S", "tracking.enabled=false",
               "-S", "pretrain.matrix_lr=0.01", "pretrain"], repo, env=env).stdout
    assert _ran(out) == ["pretrain"], out

    exp_show = json.loads(run(["dvc", "exp", "show", "--json"], repo, env=env).stdout)
    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps(exp_show))
    header, table, _ = experiments.show_table(exp_show)
    assert len(header) <= 15
    rows = {r[0]: dict(zip(header, r)) for r in table}
    exp, base = rows["lr01"], rows[next(n for n in rows if n not in ("lr01", "workspace"))]
    assert exp["pretrain.matrix_lr"] == "0.01" and base["pretrain.matrix_lr"] == "0.02"
    assert base["inherited"] == "-" and exp["inherited"].split(",") == ["sft", "rl", "chat_eval"]
    assert exp["sft val_bpb"] == base["sft val_bpb"] + "*"  # the baseline's number, marked
    assert not exp["pretrain val_bpb"].endswith("*") and exp["pretrain val_bpb"] != base["pretrain val_bpb"]
    assert exp["tok_eval bytes/tok"] == base["tok_eval bytes/tok"]  # shared upstream, reused: own, not marked

    # the CLI a researcher types
    out = run(["python", "-m", "nanopipe.experiments", "show", "--from-json", str(saved)], repo, env=env).stdout
    line = next(line for line in out.splitlines() if line.startswith("lr01"))
    assert line.rstrip().endswith("sft,rl,chat_eval") and "*" in line
    print(out)  # the table, as docs/experiments.md shows it

    # plots: the pretrain page compares both runs, the SFT and RL pages only the baseline
    out = run(["python", "-m", "nanopipe.experiments", "plots", "lr01", base["experiment"], "--out", str(tmp_path / "pl")],
              repo, env=env).stdout
    assert "sft curves: left out lr01 (inherited)" in out and "rl curves: left out lr01 (inherited)" in out, out
    revs = {stage: set(re.findall(r'"rev": "([^"]+)"', (tmp_path / "pl" / stage / "index.html").read_text()))
            for stage in ("pretrain", "sft", "rl")}
    assert revs == {"pretrain": {"lr01", base["experiment"]}, "sft": {base["experiment"]}, "rl": {base["experiment"]}}

    # the model registry: a version tag (GTO's format) and the model comes back by name
    run(["git", "tag", "-a", "sft@v0.1.0", "-m", "baseline SFT model"], repo)
    run(["dvc", "artifacts", "get", str(repo), "sft", "-o", str(tmp_path / "sft")], tmp_path, env=env)
    assert (tmp_path / "sft/meta.json").read_bytes() == (repo / "models/sft/meta.json").read_bytes()
    shutil.rmtree(repo / ".dvc/tmp", ignore_errors=True)
