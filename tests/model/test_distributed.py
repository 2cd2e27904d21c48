"""DistMuonAdamW on 2 CPU processes (gloo) against MuonAdamW in one process, and checkpoints
moving between world sizes (2 -> 1 and 1 -> 2) with the same next-step loss.

One spawn of 2 workers does all the distributed work (keeps the test to seconds):
  a) train STEPS steps from the shared init on half the batch each -> parameters;
  b) after SAVE_AT steps save a checkpoint (collective) and record the next-step loss;
  c) resume the 1-process checkpoint written by the parent, record next-step loss and one more step.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_helpers import batch, schedule, tiny_model

from nanopipe.model.checkpoint import load_checkpoint, save_checkpoint
from nanopipe.model.optim import DistMuonAdamW, MuonAdamW

SAVE_AT, STEPS = 2, 3
B = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(world, rank):
    x, y = batch(B=B)
    n = B // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def global_loss(model, x, y):
    """Full-batch mean loss: the average of equal-size per-rank means."""
    with torch.no_grad():
        loss = model(x, y).detach()
    if dist.is_initialized():
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item()


def train(model, opt, x, y, start, steps):
    for step in range(start, start + steps):
        schedule(opt, step)
        model(x, y).backward()
        opt.step()
        model.zero_grad(set_to_none=True)


def worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from nanopipe.runtime import compute_cleanup, compute_init
    ddp, r, _, w, device = compute_init("cpu")
    assert ddp and (r, w) == (rank, world) and device.type == "cpu"
    out = {}
    try:
        x, y = rows(world, rank)
        model = tiny_model(perturb=True, double=True)
        opt = model.setup_optimizer(weight_decay=0.1)
        assert isinstance(opt, DistMuonAdamW)
        train(model, opt, x, y, 0, SAVE_AT)
        save_checkpoint(f"{tmp}/ckpt_2ranks", model, opt, meta={"step": SAVE_AT})
        out["loss_after_save"] = global_loss(model, x, y)
        train(model, opt, x, y, SAVE_AT, STEPS - SAVE_AT)
        out["params"] = {k: v.clone() for k, v in model.state_dict().items()}
        # c) resume what one process saved
        model = tiny_model(seed=9, double=True)
        opt = model.setup_optimizer()
        load_checkpoint(f"{tmp}/ckpt_1rank", model, opt)
        out["resumed_loss"] = global_loss(model, x, y)
        train(model, opt, x, y, SAVE_AT, 1)
        out["resumed_params"] = {k: v.clone() for k, v in model.state_dict().items()}
        # a world size that cannot shard the embedding rows is refused, naming it
        try:
            DistMuonAdamW([dict(kind="adamw", params=[torch.nn.Parameter(torch.ones(3, 512))], lr=0.1,
                                betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)])
        except ValueError as e:
            out["bad_world_error"] = str(e)
    finally:
        if rank == 0:
            torch.save(out, f"{tmp}/rank0.pt")
        compute_cleanup()


def test_dist_equivalence_and_resume_across_world_sizes(tmp_path):
    x, y = batch(B=B)
    # single process reference, and the checkpoint the 2-rank run will resume
    ref = tiny_model(perturb=True, double=True)
    ref_opt = ref.setup_optimizer(weight_decay=0.1)
    assert isinstance(ref_opt, MuonAdamW)
    train(ref, ref_opt, x, y, 0, SAVE_AT)
    save_checkpoint(tmp_path / "ckpt_1rank", ref, ref_opt, meta={"step": SAVE_AT})
    ref_loss_after_save = global_loss(ref, x, y)
    train(ref, ref_opt, x, y, SAVE_AT, STEPS - SAVE_AT)
    ref_params = ref.state_dict()

    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    out = torch.load(tmp_path / "rank0.pt", weights_only=True)

    def close(a, b):
        # float64 model: the only difference between 1 process and 2 ranks is the order of the
        # gradient reductions, so the parameters agree to ~1e-13; a real discrepancy is >> 1e-9.
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-9, rtol=0, msg=lambda m, k=k: f"{k}: {m}")

    # Equivalence: 2 ranks with DistMuonAdamW == 1 process with MuonAdamW on the same global batch
    close(out["params"], ref_params)
    assert out["loss_after_save"] == pytest.approx(ref_loss_after_save, abs=2e-6)  # logits are fp32 by design
    # 1 -> 2: resuming the single-process checkpoint on 2 ranks gives the same next-step loss and step
    assert out["resumed_loss"] == pytest.approx(ref_loss_after_save, abs=2e-6)  # logits are fp32 by design
    close(out["resumed_params"], ref_params)
    # 2 -> 1: resuming the 2-rank checkpoint in one process
    model = tiny_model(seed=11, double=True)
    opt = model.setup_optimizer()
    meta = load_checkpoint(tmp_path / "ckpt_2ranks", model, opt)
    assert meta["world_size"] == 2 and meta["step"] == SAVE_AT
    assert global_loss(model, x, y) == pytest.approx(out["loss_after_save"], abs=2e-6)  # logits are fp32 by design
    train(model, opt, x, y, SAVE_AT, 1)
    close(model.state_dict(), out["params"])
    assert "world size 2" in out["bad_world_error"] and "(3, 512)" in out["bad_world_error"]
