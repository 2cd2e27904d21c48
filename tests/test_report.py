"""The report stage: assembly from stage sections, cost arithmetic, git state, the stage itself."""
import json
import subprocess
from pathlib import Path

import pytest
from helpers import make_cfg

from nanopipe import paths
from nanopipe.stage import run_stage
from nanopipe.stages import report

NO_GPU = {"available": False, "count": 0}


def _write(root: Path, rel, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _stage(root: Path, stage: str, metrics: dict | None, section: str | None) -> None:
    if metrics is not None:
        _write(root, paths.metrics_file(stage), json.dumps(metrics))
    if section is not None:
        _write(root, paths.section_file(stage), f"## {stage}\n\n{section}\n")


def test_report_assembles_present_sections_and_marks_missing_ones(tmp_path):
    _stage(tmp_path, "download", {"train_rows": 10, "wall_time_s": 60, "world_size": 1}, "downloaded 4 shards")
    _stage(tmp_path, "pretrain", {"final_val_bpb": 1.5, "core_metric": None, "wall_time_s": 3600, "world_size": 1},
           "trained for 30 steps")
    _stage(tmp_path, "base_eval", {"val_bpb": 1.25, "train_bpb": 1.2, "core_metric": 0.21, "wall_time_s": 120,
                                   "world_size": 1}, None)  # a metrics file without its section
    # chat_eval.json as nanopipe.eval.chat_eval writes it: {source: {task: acc, ChatCORE, ...}}
    chat = {"tasks": "ARC-Easy,GSM8K", "unavailable": {"MMLU": "offline"},
            "sft": {"step": 200, "ARC-Easy": 0.5, "GSM8K": 0.1, "MMLU": None, "ChatCORE": 0.2,
                    "ChatCORE_tasks": "ARC-Easy,GSM8K", "ChatCORE_complete": False,
                    "counts": {"ARC-Easy": {"passed": 8, "total": 16}}},
            "rl": {"skipped": "models/rl: checkpoint not found"},
            "problems_per_s": 3.5, "wall_time_s": 30, "world_size": 1}
    _stage(tmp_path, "chat_eval", chat, "### sft\n\n| task | accuracy |")
    _write(tmp_path, paths.SECTIONS / "mystery.md", "## mystery\n\na section under a name the report does not know\n")
    _write(tmp_path, paths.section_file("report"), "## report\n\nthe previous report's own section\n")

    text, summary, metrics = report.build(tmp_path, gpu_hourly_rate=3.0, cpu_hourly_rate=0.5, gpus_per_node=0,
                                          env={"gpu": NO_GPU})

    # every lifecycle stage appears, in order; the missing ones say so
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads[:2] == ["## Environment", "## Stages"]
    assert heads[2:] == [f"## {s}" for s in report.STAGES] + ["## mystery", "## Summary"]
    for s in ("tokenizer", "tok_eval", "sft", "rl", "export"):
        assert f"## {s}\n\n_not run_" in text
        assert f"| {s} | not run |" in text
    assert "downloaded 4 shards" in text and "trained for 30 steps" in text and "| task | accuracy |" in text
    assert "metrics/sections/base_eval.md is missing" in text and "| base_eval | no section |" in text
    assert "a section under a name the report does not know" in text
    assert "the previous report's own section" not in text
    assert metrics["stages_run"] == 4 and metrics["stages_not_run"] == 5 and "git_dirty" not in metrics
    assert "Not run: tokenizer, tok_eval, sft, rl, export" in summary

    # headline metrics: base_eval's bpb/CORE win over pretrain's; chat scores per model; bookkeeping left out
    assert metrics["summary"] == {"base": {"val bpb": 1.25, "train bpb": 1.2, "CORE": 0.21},
                                  "sft": {"ARC-Easy": 0.5, "GSM8K": 0.1, "ChatCORE": 0.2}}
    rows = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ")]
    assert rows == ["Metric", "train bpb (base_eval)", "val bpb (base_eval)", "CORE", "ARC-Easy", "GSM8K", "ChatCORE"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in summary.splitlines()
             if line.startswith("| ")}
    assert cells["Metric"] == ["BASE", "SFT"]
    assert cells["val bpb (base_eval)"] == ["1.2500", "-"] and cells["ChatCORE"] == ["-", "0.2000"]
    # an accuracy with the counts chat_eval recorded shows its sample size; one without shows the number alone
    assert cells["ARC-Easy"] == ["-", "8/16 = 50.0 % (95 % CI 28.0-72.0)"] and cells["GSM8K"] == ["-", "0.1000"]

    # header
    assert text.startswith("# nanopipe run report") and "- GPUs: none available" in text
    assert "- torch: " in text and "- mlflow: " in text and "- Python: " in text
    assert "- Commit: unknown (state unknown)" in text  # tmp_path is no git checkout


def test_report_with_nothing_run(tmp_path):
    text, summary, metrics = report.build(tmp_path, 3.0, 0.1, 0, env={"gpu": NO_GPU})
    assert metrics["stages_run"] == 0 and "No headline metrics yet" in summary
    assert all(f"| {s} | not run |" in text for s in report.STAGES)


def test_report_survives_a_corrupt_metrics_file(tmp_path):
    _write(tmp_path, paths.metrics_file("pretrain"), "{not json")
    _stage(tmp_path, "pretrain", None, "section text")
    text, _, metrics = report.build(tmp_path, 3.0, 0.1, 0, env={"gpu": NO_GPU})
    assert "| pretrain | metrics unreadable |" in text and "not valid JSON" in text and "section text" in text
    assert metrics["summary"] == {}


def test_cost_arithmetic():
    # GPUs: hours x max(world size, GPUs per node) x rate
    assert report.stage_cost(3600, 8, 8, 3.0, 0.1)["cost_usd"] == pytest.approx(24.0)
    assert report.stage_cost(1800, 1, 8, 3.0, 0.1) == pytest.approx({"hours": 0.5, "device_hours": 4.0, "cost_usd": 12.0})
    assert report.stage_cost(3600, 16, 8, 2.0, 0.1)["cost_usd"] == pytest.approx(32.0)  # two nodes
    # CPU: machine-hours x cpu rate, ranks share the machine
    assert report.stage_cost(7200, 2, 0, 3.0, 0.5) == pytest.approx({"hours": 2.0, "device_hours": 2.0, "cost_usd": 1.0})
    assert report.hourly_rate(8, 3.0, 0.1)[0] == pytest.approx(24.0)
    assert report.hourly_rate(0, 3.0, 0.1)[0] == pytest.approx(0.1)
    assert report.fmt_duration(3 * 3600 + 25 * 60 + 10) == "3h25m" and report.fmt_duration(75) == "1m15s"


def test_report_cost_totals_from_stage_wall_times(tmp_path):
    _stage(tmp_path, "download", {"wall_time_s": 360, "world_size": 1}, "x")  # 0.1 h on the node: 8 GPUs billed
    _stage(tmp_path, "pretrain", {"wall_time_s": 7200, "world_size": 8}, "x")  # 2 h x 8 GPUs
    _stage(tmp_path, "base_eval", {"wall_time_s": 1800, "world_size": 16}, "x")  # 0.5 h x 16 GPUs (two nodes)
    gpu = {"available": True, "count": 8, "names": ["NVIDIA H100 80GB HBM3"] * 8, "memory_gb": [80.0] * 8, "cuda_version": "12.8"}
    text, summary, m = report.build(tmp_path, 3.0, 0.1, gpus_per_node=-1, env={"gpu": gpu})
    assert m["gpus_per_node"] == 8 and m["hourly_rate_usd"] == pytest.approx(24.0)
    assert m["device_hours"] == pytest.approx(0.8 + 16 + 8)
    assert m["estimated_cost_usd"] == pytest.approx((0.8 + 16 + 8) * 3.0)
    assert m["total_wall_time_s"] == pytest.approx(9360)
    assert "Estimated cost: $74.40 at $24.00/hour (8 GPU x $3.00)" in summary
    assert "Total wall clock time: 2h36m over 3 stage(s) (24.80 GPU-hours)" in summary
    assert "| pretrain | ok | 2h00m | 8 | $48.00 |" in text
    assert "- GPUs: 8x NVIDIA H100 80GB HBM3" in text and "- GPU memory: 640.0 GB total" in text


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_git_dirty_detection(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert report.git_info(repo)["dirty"] is None  # not a checkout
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@t")
    _git(repo, "config", "user.name", "t")
    (repo / "a.py").write_text("x = 1\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first commit with a message longer than eighty characters, which the report cuts short")
    info = report.git_info(repo)
    assert info["dirty"] is False and info["changed"] == [] and len(info["commit"]) == 40
    assert info["message"] == "first commit with a message longer than eighty characters, which the report cuts"[:80]

    # what the pipeline writes while it runs is not dirt: dvc.lock, metrics/, DVC's .gitignore files
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    _write(repo, "metrics/sections/pretrain.md", "## pretrain\n")
    _write(repo, "models/.gitignore", "/base\n")
    assert report.git_info(repo)["dirty"] is False
    _write(repo, "src/pkg/new.py", "y = 2\n")  # untracked code is dirty, named by file
    info = report.git_info(repo)
    assert info["dirty"] is True and info["changed"] == ["src/pkg/new.py"]
    (repo / "src/pkg/new.py").unlink()
    (repo / "a.py").write_text("x = 2\n")
    assert report.git_info(repo)["changed"] == ["a.py"]


def test_code_size(tmp_path):
    _write(tmp_path, "src/pkg/a.py", "a\nb\n")
    _write(tmp_path, "src/pkg/ui.html", "<p>\n")
    _write(tmp_path, "src/pkg/__pycache__/a.cpython-311.pyc", "junk\n")
    _write(tmp_path, "src/pkg.egg-info/PKG-INFO", "junk\n")
    assert report.code_size(tmp_path / "src") == {"files": 2, "lines": 3, "chars": 8, "tokens_approx": 2}


def test_report_stage_writes_outputs_and_logs_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _stage(tmp_path, "pretrain", {"final_val_bpb": 1.5, "wall_time_s": 10, "world_size": 1}, "trained")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg("experiment=smoke", f"tracking.uri={store}", "tracking.experiment=report-test")
    run_stage(report, cfg)

    text = (tmp_path / "metrics/report.md").read_text()
    assert "## pretrain\n\ntrained" in text and "## Summary" in text
    section = (tmp_path / paths.section_file("report")).read_text()
    assert section.startswith("## report\n") and "val bpb" in section
    m = json.loads((tmp_path / paths.metrics_file("report")).read_text())
    assert m["summary"] == {"base": {"val bpb": 1.5}} and m["stages_run"] == 1 and "wall_time_s" in m

    import mlflow

    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["report-test"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["stage"] == "report"
    assert runs[0].data.metrics["summary.base.val bpb"] == pytest.approx(1.5)
    assert runs[0].data.params["report.gpu_hourly_rate"] == "3.0"
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"report.md", "report.json", "config.yaml"} <= logged
