"""Pieces every training stage (pretrain, SFT, RL) shares; each stage's loop reads top to bottom.

- `optimizer_step`: set this step's schedules (nanopipe.train.schedules), step, free the grads.
- `Resume`: in-progress checkpoints under models/resume/<stage>/ (not a DVC output, so
  DVC never deletes it before a rerun). A checkpoint is used only when it was written by
  a run with the same fingerprint (config + inputs); otherwise the stage starts fresh.
  Beside each one it keeps a weights-only snapshot for the checkpoint history
  (models/resume/<stage>/history/, `keep` newest of them); the final save moves them into
  the stage's output as models/<stage>/steps/ (nanopipe.model.checkpoint.save_checkpoint).
- `StepMeter`: smoothed loss, tok/s, MFU, ETA, and the progress bar on rank 0 (on a terminal; in a log,
  a status line with the ETA every `runtime.progress_interval` seconds: nanopipe.runtime.Progress).
- `NonFiniteGuard`: a nan/inf training loss stops the stage naming the step, before anything is
  saved, or (`<stage>.max_nonfinite_steps` = N > 0) skips up to N such optimizer steps
  (docs/decisions.md, D13).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanopipe import paths
from nanopipe.artifacts import StageFailed
from nanopipe.model.checkpoint import (
    CheckpointError,
    find_last_step,
    history_steps_in,
    load_checkpoint,
    save_checkpoint,
    step_dir,
)
from nanopipe.runtime import Device, Progress, barrier, broadcast_from_rank0, gather_objects, is_rank0, node_name
from nanopipe.train.schedules import apply_schedule

log = logging.getLogger("nanopipe.train")


def optimizer_step(optimizer, model, lrm: float, momentum: float | None = None, weight_decay: float | None = None) -> None:
    """Set this step's schedules, step, and free the grads."""
    apply_schedule(optimizer, lrm, momentum, weight_decay)
    optimizer.step()
    model.zero_grad(set_to_none=True)


def scale_initial_lrs(optimizer, frac: float) -> None:
    """Start every group at `frac` of its configured LR; the schedules then multiply this initial LR
    (SFT's and RL's `init_lr_frac`, nanochat chat_sft.py / chat_rl.py)."""
    for group in optimizer.param_groups:
        group["lr"] *= frac
        group["initial_lr"] = group["lr"]


def fingerprint(*parts: Any) -> str:
    """A stable hash of config sections / input hashes identifying one training run."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Resume:
    """In-progress checkpoints of one stage, valid only for the run that wrote them."""

    def __init__(self, stage, run_fingerprint: str, root: Path = paths.RESUME, keep: int = 0):
        """`stage`: the running nanopipe.stage.Stage (its name, and its plot rows to save and restore).
        keep: snapshots kept for the checkpoint history: -1 all, 0 none, N the newest N."""
        self.stage = stage
        self.dir = root / stage.name
        self.history = self.dir / "history"
        self.fingerprint = run_fingerprint
        self.keep = keep

    def latest(self) -> Path | None:
        step = find_last_step(self.dir)
        if step is None:
            return None
        ckpt = step_dir(self.dir, step)
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta.get("fingerprint") != self.fingerprint:
            log.info("ignoring %s: written by a run with another config or inputs", ckpt)
            return None
        return ckpt

    def load(self, model, optimizer) -> dict | None:
        """Resume from the checkpoint rank 0 chose, on every rank, or start fresh on every rank.

        Rank 0 decides and broadcasts (a rank deciding from its own disk could start at step 0 while the
        others load step N: mixed weights, then a hang). A rank that cannot load the chosen checkpoint
        fails the whole run, every rank raising one message that names the node and the path."""
        chosen = self.latest() if is_rank0() else None
        ckpt = broadcast_from_rank0(str(chosen) if chosen else None)
        if ckpt is None:
            if is_rank0():  # a fresh run: snapshots of another run are not this run's history
                shutil.rmtree(self.history, ignore_errors=True)
            return None
        ckpt = Path(ckpt)
        try:
            meta, problem = load_checkpoint(ckpt, model, optimizer), None
        except (CheckpointError, OSError) as e:
            meta, problem = None, f"{node_name()}: {e}"
        problems = [p for p in gather_objects(problem) if p]
        if problems:
            raise CheckpointError(f"cannot resume {self.stage.name} from {ckpt.resolve()} (chosen by rank 0) on every rank; "
                                  "the nodes must share the working directory (README, \"Scale out\"):\n  "
                                  + "\n  ".join(problems))
        self.stage.restore_plots(meta.get("plots", {}), meta["step"])  # the curves so far, not just after the resume
        if is_rank0():  # a snapshot written after this checkpoint, by the interrupted run, is redone
            for later in [s for s in history_steps_in(self.history) if s > meta["step"]]:
                shutil.rmtree(step_dir(self.history, later), ignore_errors=True)
        return meta

    def save(self, step: int, model, optimizer, meta: dict) -> None:
        """Every rank calls this; the previous checkpoint is removed once the new one is on disk."""
        previous = find_last_step(self.dir)
        if is_rank0():
            for stale in [*self.dir.glob(".step_*"), *self.history.glob(".step_*")]:  # temp dirs of a killed save
                shutil.rmtree(stale, ignore_errors=True)
        if self.keep != 0:
            self.snapshot(step, model, meta)
        save_checkpoint(step_dir(self.dir, step), model, optimizer,
                        {**meta, "step": step, "fingerprint": self.fingerprint, "plots": self.stage.plot_rows()})
        barrier()
        if is_rank0() and previous is not None and previous != step:
            shutil.rmtree(step_dir(self.dir, previous), ignore_errors=True)

    def snapshot(self, step: int, model, meta: dict) -> None:
        """The weights at `step` for the checkpoint history (no optimizer, no RNG), with the caller's
        scalar meta (val_bpb, ...); the oldest snapshots beyond `keep` are removed."""
        small = {k: v for k, v in meta.items() if v is None or isinstance(v, (bool, int, float, str))}
        save_checkpoint(step_dir(self.history, step), model, None, {**small, "step": step}, save_rng=False)
        if is_rank0() and self.keep > 0:
            for old in history_steps_in(self.history)[:-self.keep]:
                shutil.rmtree(step_dir(self.history, old), ignore_errors=True)

    def clear(self) -> None:
        if is_rank0():
            shutil.rmtree(self.dir, ignore_errors=True)


class NonFiniteLoss(StageFailed):
    """The training loss went nan/inf more often than the stage tolerates."""


def synced_losses(dev: Device, last_loss: torch.Tensor, loss_sum: torch.Tensor) -> tuple[float, float]:
    """(the last micro-step's loss, averaged over ranks: what is logged; the sum of every micro-step's loss
    over every rank: what the guard checks). One host transfer and one all-reduce; a nan or inf on any
    rank, in any micro-step, makes the sum non-finite on every rank, so all ranks decide alike."""
    last, total = dev.all_reduce_sum(torch.stack([last_loss.float(), loss_sum.float()]).tolist())
    return last / dev.world_size, total


class NonFiniteGuard:
    """What a training stage does about a non-finite loss (docs/decisions.md, D13).

    tolerance 0 (the default): the first one stops the stage with NonFiniteLoss, naming the stage and the
    step; the check reads the loss already synced after the optimizer step for logging (no extra host
    sync on a GPU), so the poisoned step has updated the weights in memory, but the stage raises before
    it evaluates, saves a resume checkpoint or writes its output. tolerance N > 0: the loss is synced
    before the optimizer step (one more host sync per step), a non-finite step's update is skipped
    (grads dropped; the step still counts, as Megatron-LM counts its skipped iterations) up to N times
    in the run; the next one stops the stage. Skipped steps are listed in the stage's metrics.
    """

    def __init__(self, stage: str, tolerance: int, skipped: list[int] | None = None):
        self.stage, self.tolerance = stage, tolerance
        self.skipped: list[int] = list(skipped or [])  # steps whose update was skipped (kept across a resume)
        self._synced: tuple[float, float] | None = None

    def check(self, step: int, value: float) -> bool:
        """True when `value` is finite; False: skip this step's update. Raises beyond the tolerance."""
        if math.isfinite(value):
            return True
        key = f"{self.stage}.max_nonfinite_steps"
        if len(self.skipped) >= self.tolerance:
            before = f" (updates already skipped at steps {self.skipped})" if self.skipped else ""
            raise NonFiniteLoss(f"stage {self.stage}: the training loss is {value} at step {step}{before}; stopped "
                                f"before saving anything ({key}={self.tolerance} tolerates {self.tolerance or 'none'}). "
                                "Lower the learning rates, or raise the tolerance to skip isolated spikes")
        self.skipped.append(step)
        log.warning("stage %s: the training loss is %s at step %d: update skipped (%d of %s=%d)", self.stage, value, step,
                    len(self.skipped), key, self.tolerance)
        return False

    def before_step(self, step: int, dev: Device, last_loss: torch.Tensor, loss_sum: torch.Tensor) -> bool:
        """Before the optimizer step: False = skip it (the caller drops the grads). Syncs only with a tolerance."""
        self._synced = None
        if self.tolerance == 0:
            return True
        self._synced = synced_losses(dev, last_loss, loss_sum)
        return self.check(step, self._synced[1])

    def after_step(self, step: int, dev: Device, last_loss: torch.Tensor, loss_sum: torch.Tensor) -> float:
        """After it: the loss to log (nan for a skipped step); without a tolerance, the check (raises)."""
        if self._synced is None:
            self._synced = synced_losses(dev, last_loss, loss_sum)
            self.check(step, self._synced[1])
        return self._synced[0]


class StepMeter:
    """Per-step throughput and loss bookkeeping, with a progress bar on rank 0."""

    def __init__(self, num_iterations: int, start_step: int, tokens_per_step: int, flops_per_token: float,
                 dev: Device, desc: str, smooth_loss: float = 0.0, train_time: float = 0.0):
        self.n, self.tokens_per_step, self.flops_per_token, self.dev = num_iterations, tokens_per_step, flops_per_token, dev
        self.smooth_loss, self.train_time, self.step0 = smooth_loss, train_time, start_step
        self.bar = tqdm(total=num_iterations, initial=start_step, desc=desc, disable=not dev.master or None, dynamic_ncols=True)
        self.progress = Progress(desc, num_iterations, "step", start_step, bar=True)
        self._t = 0.0
        self.tok_rates: list[float] = []  # steady-state steps only

    def start(self) -> None:
        self.dev.sync()
        self._t = time.time()

    def stop(self, step: int, loss: float) -> dict:
        """Close the step; returns the step's metrics."""
        self.dev.sync()
        dt = time.time() - self._t
        if math.isfinite(loss):  # a skipped non-finite step (NonFiniteGuard) must not poison the average
            self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss
        debiased = self.smooth_loss / (1 - 0.9 ** (step + 1))
        tok_s = self.tokens_per_step / dt
        if step - self.step0 > 1:  # the first steps include warm-up/compile time
            self.train_time += dt
            self.tok_rates.append(tok_s)
        mfu = 100 * self.flops_per_token * tok_s / (self.dev.peak_flops * self.dev.world_size)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{debiased:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1f}%", refresh=False)
        self.progress.update(step + 1, f"loss {debiased:.4f}, {tok_s:,.0f} tok/s, MFU {mfu:.1f}%")
        return {"loss": loss, "loss_smooth": debiased, "dt_ms": dt * 1000, "tok_per_sec": tok_s, "mfu": mfu}

    def say(self, text: str) -> None:
        """A line in the one log format (nanopipe.runtime.setup_logging), on rank 0; with a bar on the
        terminal it is printed above the bar (tqdm's own write would go to stdout, in no format)."""
        if not self.dev.master:
            return
        if self.bar.disable:
            log.info(text)
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            log.info(text)

    def loop_state(self) -> dict:
        """What a resume needs to continue the smoothed loss and the training time."""
        return {"smooth_train_loss": self.smooth_loss, "total_training_time": self.train_time}

    def median_tok_per_sec(self) -> float | None:
        return statistics.median(self.tok_rates) if self.tok_rates else None

    def close(self) -> None:
        self.bar.close()


def lr_scale_note(scale: float) -> str:
    return "" if math.isclose(scale, 1.0) else f" (LRs scaled by {scale:.4f})"
