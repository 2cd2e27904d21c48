"""The report card's pictures and numbers: charts drawn from the stages' plot files, rounded numbers,
accuracies with their sample sizes, the two val bpb told apart."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from helpers import make_cfg

from nanopipe import paths
from nanopipe.stage import fmt_acc, fmt_num, run_stage, wilson
from nanopipe.stages import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(root: Path, rel, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _csv(root: Path, stage: str, plot: str, header: list[str], rows: list[list]) -> None:
    _write(root, paths.plot_file(stage, plot), "\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")


def _run(root: Path, loss_scale: float = 1.0) -> None:
    """The metrics tree of a whole run, as the stages write it."""
    _csv(root, "pretrain", "train", ["step", "loss", "loss_smooth"],
         [[s, 8 - s * loss_scale / 100, 8 - s * loss_scale / 100] for s in range(50)])
    _csv(root, "pretrain", "val", ["step", "val_bpb", "total_training_flops"], [[0, 3.1, 0], [25, 1.9, 1e9], [50, 1.23456789, 2e9]])
    _csv(root, "sft", "train", ["step", "loss", "loss_smooth"], [[s, 2 - s / 50, 2 - s / 50] for s in range(30)])
    _csv(root, "sft", "val", ["step", "val_loss", "val_bpb"], [[0, 2.0, 1.5], [30, 0.3, 0.2]])
    _csv(root, "rl", "reward", ["step", "reward"], [[s, (s % 4) / 4] for s in range(16)])
    _csv(root, "rl", "pass_at_k", ["step", "pass_at_1", "pass_at_2"], [[0, 0.5, 0.6], [8, 0.55, 0.7], [16, 0.6, 0.8]])
    stages = {
        "pretrain": {"final_val_bpb": 1.23456789, "min_val_bpb": 1.23456789, "val_bpb_tokens": 65536, "wall_time_s": 100, "world_size": 1},
        "base_eval": {"val_bpb": 1.26675190, "train_bpb": 0.6744638, "val_bpb_tokens": 131072, "core_metric": None,
                      "core_unavailable": "eval bundle unavailable: cannot fetch https://x/eval_bundle.zip (ClientError); "
                                          "point base_eval.bundle_url at a reachable URL or a local copy of eval_bundle.zip",
                      "wall_time_s": 10, "world_size": 1},
        "sft": {"val_bpb": 0.2, "wall_time_s": 50, "world_size": 1},
        "rl": {"wall_time_s": 20, "world_size": 1},
        "chat_eval": {"tasks": "Arithmetic,SpellingBee,MMLU",
                      "unavailable": {"MMLU": "no local copy in chat_eval.dataset_dir and the hub is unreachable"},
                      "sft": {"step": 150, "Arithmetic": 0.5, "SpellingBee": 0.0, "ChatCORE": 0.25,
                              "counts": {"Arithmetic": {"passed": 4, "total": 8}, "SpellingBee": {"passed": 0, "total": 8}}},
                      "rl": {"step": 16, "Arithmetic": 0.75, "SpellingBee": 0.125, "ChatCORE": 0.4375,
                             "counts": {"Arithmetic": {"passed": 6, "total": 8}, "SpellingBee": {"passed": 1, "total": 8}}},
                      "wall_time_s": 17, "world_size": 1},
    }
    for stage, metrics in stages.items():
        _write(root, paths.metrics_file(stage), json.dumps(metrics))
        _write(root, paths.section_file(stage), f"## {stage}\n\n{stage} section\n")


def _pixels(png: bytes):
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


@pytest.mark.parametrize("x, text", [
    (1.231232290625794, "1.2312"), (0.2038, "0.2038"), (6321.650718073546, "6,322"), (162.19165, "162.2"),
    (-0.5, "-0.5000"), (0.0, "0.0000"), (3.2e-7, "3.20e-07"), (7340296, "7,340,296"), (None, "n/a"),
    (float("nan"), "n/a"), (float("inf"), "n/a"), (True, "True"),
])
def test_fmt_num(x, text):
    assert fmt_num(x) == text


def test_fmt_acc_and_its_interval():
    assert fmt_acc(4, 8) == "4/8 = 50.0 % (95 % CI 21.5-78.5)"
    # no zero-width interval at 0/n or n/n: 16 problems all failed still leave up to ~19 % possible
    assert fmt_acc(0, 16) == "0/16 = 0.0 % (95 % CI 0.0-19.4)"
    assert fmt_acc(16, 16) == "16/16 = 100.0 % (95 % CI 80.6-100.0)"
    assert fmt_acc(0, 0) == "n/a (0 problems)"
    # the interval narrows as 1/sqrt(n): what a larger chat_eval.max_problems buys
    widths = {n: wilson(n // 2, n)[1] - wilson(n // 2, n)[0] for n in (8, 64, 256)}
    assert widths[8] > 2 * widths[64] and widths[64] > 1.9 * widths[256]
    lo, hi = wilson(400, 1000)
    assert lo < 0.4 < hi and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.4 * 0.6 / 1000), rel=0.01)


def test_report_stage_writes_charts_rounded_numbers_and_sample_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(tmp_path)
    run_stage(report, make_cfg("experiment=smoke", "tracking.enabled=false"))

    images = {p.name: p.read_bytes() for p in (tmp_path / report.IMAGES).iterdir()}
    assert set(images) == {"pretrain.png", "sft.png", "rl.png", "chat_eval.png"}
    for name, png in images.items():
        assert png.startswith(PNG_MAGIC), name
        px = _pixels(png)
        assert px.shape[0] > 200 and px.shape[1] > 400, name
        assert px[..., :3].std() > 0.05, f"{name} is blank"  # drawn, not one colour
    text = (tmp_path / report.REPORT).read_text()
    for stage in ("pretrain", "sft", "rl", "chat_eval"):
        link = f"![{stage} charts](report/{stage}.png)"
        assert link in text and text.index(link) > text.index(f"## {stage}\n"), stage  # under its own section
        assert (tmp_path / report.REPORT).parent.joinpath(f"report/{stage}.png").is_file()  # the link resolves

    summary = text[text.index("## Summary"):]
    assert "1.2668" in summary and "1.26675190" not in summary and "0.6745" in summary
    assert "4/8 = 50.0 % (95 % CI 21.5-78.5)" in summary and "6/8 = 75.0 % (95 % CI " in summary and "1/8 = 12.5 %" in summary
    # the two val bpb, each said for what it is, with its token budget
    assert "| val bpb (base_eval)" in summary
    assert "on the val shard over the first 131,072 tokens" in summary
    assert "pretrain's own val bpb, 1.2346, is its in-training estimate over the first 65,536 tokens" in summary
    # what was not measured, one line each, with the stage's reason
    assert "- CORE: not measured: eval bundle unavailable: cannot fetch https://x/eval_bundle.zip (ClientError); " in summary
    assert "- MMLU: not measured: no local copy in chat_eval.dataset_dir and the hub is unreachable" in summary


def test_charts_follow_the_data(tmp_path):
    """Other curves, other pictures; the same curves, the same bytes (DVC sees no change on a rerun)."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, scale in ((a, 1.0), (b, 5.0), (c, 1.0)):
        _run(root, loss_scale=scale)
    ca, cb, cc = (report.build_charts(r) for r in (a, b, c))
    assert ca["pretrain.png"] != cb["pretrain.png"]
    assert ca == cc
    # the accuracies are drawn from the counts: one more problem passed changes the chart
    chat = json.loads((b / paths.metrics_file("chat_eval")).read_text())
    chat["rl"]["counts"]["Arithmetic"]["passed"] = 7
    (b / paths.metrics_file("chat_eval")).write_text(json.dumps(chat))
    assert report.build_charts(b)["chat_eval.png"] != ca["chat_eval.png"]


def test_a_stage_that_did_not_run_has_no_chart_and_no_stale_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(tmp_path)
    run_stage(report, make_cfg("experiment=smoke", "tracking.enabled=false"))
    assert (tmp_path / "metrics/report/rl.png").exists()
    for f in [*(tmp_path / "metrics/rl").iterdir(), tmp_path / paths.metrics_file("rl")]:  # rl did not run this time
        f.unlink()
    run_stage(report, make_cfg("experiment=smoke", "tracking.enabled=false"))
    assert not (tmp_path / "metrics/report/rl.png").exists()
    assert "report/rl.png" not in (tmp_path / report.REPORT).read_text()
    assert (tmp_path / "metrics/report/pretrain.png").exists()


def test_curves_without_the_stage_result_are_not_charted(tmp_path):
    """Plot files left by a run that failed (no metrics file) draw nothing."""
    _run(tmp_path)
    (tmp_path / paths.metrics_file("sft")).unlink()
    assert "sft.png" not in report.build_charts(tmp_path) and "pretrain.png" in report.build_charts(tmp_path)


def test_val_bpb_from_pretrain_alone_says_so(tmp_path):
    _write(tmp_path, paths.metrics_file("pretrain"), json.dumps({"final_val_bpb": 1.5, "val_bpb_tokens": 2048}))
    _, summary, metrics = report.build(tmp_path, 3.0, 0.1, 0, env={"gpu": {"available": False, "count": 0}})
    assert metrics["summary"] == {"base": {"val bpb": 1.5}}
    assert "| val bpb (pretrain)" in summary
    assert "pretrain's in-training estimate on the val shard over the first 2,048 tokens (base_eval has not run)" in summary
