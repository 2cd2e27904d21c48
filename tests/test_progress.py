"""Progress in logs that are not a terminal (dvc repro), and one log format for everything a stage says.

A training stage whose stderr is piped logs a status line with an ETA every runtime.progress_interval
seconds; every line on stderr has the format of nanopipe.runtime.setup_logging; stdout stays empty."""
import re
import subprocess
import sys

import pytest
from helpers import make_repo_copy, run, subprocess_env

from nanopipe import runtime

LINE = re.compile(r"^\d\d:\d\d:\d\d \[nanopipe\] ")
STATUS = re.compile(r"^\d\d:\d\d:\d\d \[nanopipe\] pretrain: step (\d+)/(\d+) \(\d+%\) \| loss [\d.]+, [\d,]+ tok/s, "
                    r"MFU [\d.]+% \| elapsed \d+:\d\d:\d\d \| ETA (\d+:\d\d:\d\d)$")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_status_line_every_interval_with_an_eta(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(runtime.time, "time", clock)
    monkeypatch.setattr(runtime, "PROGRESS_INTERVAL", [30.0])
    monkeypatch.delenv("RANK", raising=False)
    caplog.set_level("INFO", logger="nanopipe")
    p = runtime.Progress("pretrain", 100, "step", done=10)  # resumed at step 10
    for step in range(11, 41):
        clock.now += 2.0  # 2 s a step
        p.update(step, "loss 3.0")
    # 30 steps in 60 s: a line at 30 s and at 60 s, each with the ETA of the steps left at that rate
    assert [r.getMessage() for r in caplog.records] == [
        "pretrain: step 25/100 (25%) | loss 3.0 | elapsed 0:00:30 | ETA 0:02:30",
        "pretrain: step 40/100 (40%) | loss 3.0 | elapsed 0:01:00 | ETA 0:02:00"]
    caplog.clear()
    unknown = runtime.Progress("sft", None, "step")
    clock.now += 31
    unknown.update(7)
    assert caplog.records[0].getMessage() == "sft: step 7 | elapsed 0:00:31 | ETA unknown (no fixed total)"
    monkeypatch.setattr(runtime, "PROGRESS_INTERVAL", [0.0])  # 0: off
    caplog.clear()
    off = runtime.Progress("x", 10)
    clock.now += 100
    off.update(5)
    assert caplog.records == []


def test_print0_warnings_and_tracebacks_share_the_log_format():
    code = ("import logging, warnings; from nanopipe import runtime; runtime.setup_logging(); "
            "runtime.print0('Evaluating: x... ', end=''); runtime.print0('accuracy: 1'); "
            "warnings.warn('careful'); logging.getLogger('nanopipe').exception('boom', exc_info=ValueError('v'))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert p.returncode == 0 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert lines[0].endswith("[nanopipe] Evaluating: x... accuracy: 1")
    assert any("UserWarning: careful" in line for line in lines) and any("ValueError: v" in line for line in lines)
    assert all(LINE.match(line) for line in lines), p.stderr


@pytest.mark.slow
def test_piped_training_stage_logs_status_lines_in_one_format(tmp_path):
    repo = make_repo_copy(tmp_path / "repo", "experiment=smoke", "pretrain.num_iterations=4", "pretrain.eval_every=-1",
                          "pretrain.sample_every=-1", "pretrain.save_every=-1", "pretrain.core_metric_every=-1")
    run(["dvc", "repro", "tokenizer"], repo)
    p = run([sys.executable, "-m", "nanopipe.cli", "pretrain", "runtime.progress_interval=0.001"], repo)
    assert p.stdout == ""  # stdout is for answers; a stage has none
    lines = p.stderr.splitlines()
    bad = [line for line in lines if not LINE.match(line)]
    assert not bad, f"lines not in the log format: {bad}"
    status = [STATUS.match(line) for line in lines if STATUS.match(line)]
    assert [int(m[1]) for m in status] == [1, 2, 3, 4] and {int(m[2]) for m in status} == {4}
    assert status[-1][3] == "0:00:00"  # nothing left at the last step


def test_evaluation_loops_report_progress(monkeypatch, caplog):
    """bpb's batches (base_eval, and pretrain/SFT validation) log status lines too."""
    import torch

    from nanopipe.eval.bpb import evaluate_bpb

    class ZeroLoss(torch.nn.Module):
        def forward(self, x, y, loss_reduction="none"):
            return torch.zeros(y.numel())

    clock = Clock()
    monkeypatch.setattr(runtime.time, "time", clock)
    monkeypatch.setattr(runtime, "PROGRESS_INTERVAL", [1.0])
    monkeypatch.delenv("RANK", raising=False)
    caplog.set_level("INFO", logger="nanopipe")

    def batches():
        for _ in range(4):
            clock.now += 1.0  # a second a batch
            yield torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    assert evaluate_bpb(ZeroLoss(), batches(), 4, torch.ones(8, dtype=torch.int64)) == 0.0
    assert [r.getMessage() for r in caplog.records] == [
        f"bpb: batch {k}/4 ({25 * k}%) | elapsed 0:00:0{k} | ETA 0:00:0{4 - k}" for k in range(1, 5)]
