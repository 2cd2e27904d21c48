"""Distributed equivalence of the training stages at fp32 tolerance (issue 19, item 3).

The real stage code (pretrain, sft, rl: its loop, gradient accumulation, schedules, and
`model.setup_optimizer`, i.e. MuonAdamW in one process and DistMuonAdamW with 2 gloo ranks) runs
once in 1 process and once under torchrun with 2 processes on the SAME global batch, and the final
weights (models/<stage>/model.pt) are compared element by element.

Same global batch:
- pretrain and sft: their loaders stride the data by rank (row groups, conversations), so a 2-rank
  run would train on other rows than a 1-rank run by design. Here the stage's loader is replaced by
  the single-process loader's own stream, micro-batch i going to rank i % world: 1 process with
  gradient accumulation 2 trains each step on micro-batches (2s, 2s+1); rank r of 2 (accumulation 1)
  trains on micro-batch 2s+r. Everything else is the stage's code.
- rl: no substitution; its questions are assigned globally (step s: positions s*E..s*E+E-1, rank r
  every world-th one) and rollout seeds depend on (step, question, chunk) only.

Tolerance: 0 (bit-identical), and why no looser fp32 tolerance would do. With W=2 both sides do
the same fp32 operations on each micro-batch (same shapes, 1 thread); the gradient is g0/2 + g1/2
(accumulation) vs (g0 + g1)/2 (reduce-scatter / all-reduce AVG), equal in binary floating point
(halving is exact, a two-term sum is commutative); DistMuonAdamW's shards do per-matrix / per-element
work only. Measured (torch 2.13 CPU): max |one - two| = 0 for pretrain, sft and rl. What a
reduction-order change does instead, measured on 1-process runs against the plain one:

                                       pretrain (6 steps)   sft (6 steps)   rl (3 steps)
    every grad element x (1 +- 2^-23)    1.0 (wte)            3.0 (wte)       7.2e-3 (value embeds)
    one micro-batch of 2B rows           1.2 (value embeds)   -               -
    (after 1 step: 2.4e-7, i.e. one fp32 ulp)
    planted, 1 vs 2 processes:
    rank 1 halves its Muon grads           2.7 (matrices 1.6e-2)  3.0             4.3e-2 (wte)
    rank 1 halves its sharded AdamW grads  5.1 (matrices 3.0e-2)  5.6             9.5e-2 (wte)

A one-ulp change of the gradients grows to O(1) within a few steps (Muon's bf16 orthogonalisation
and AdamW's sign-like early steps at high embedding LR amplify it), as large as the planted bugs do:
"a small multiple of the reduction-order effect" would let those bugs pass. So the tests require
what W=2 guarantees, exact equality; a platform where it does not hold would need the comparison
moved to after one step (where reordering leaves ~1 ulp). Both planted bugs fail these tests (with
max differences as in the table).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_cfg

TESTS = REPO / "tests"
TOL = 0.0  # max |one - two| over every weight; see the module docstring

RUNNER = r'''
import sys
sys.path.insert(0, {tests!r})
sys.path.insert(0, {here!r})
import importlib
import torch
from helpers import make_cfg
from test_dist_equivalence import perturb_output_projections
from nanopipe.runtime import get_dist_info
from nanopipe.stage import run_stage

stage, mode, *overrides = sys.argv[1:]
mod = importlib.import_module("nanopipe.stages." + stage)


def strided(make):
    """The 1-process stream, micro-batch i to rank i % world (world 1: all of it)."""
    _, rank, _, world = get_dist_info()
    for i, item in enumerate(make()):
        if i % world == rank:
            yield item


def merged(make):
    """Pairs of the 1-process stream's micro-batches as one batch of twice the rows."""
    it = make()
    for x0, y0, _ in it:
        x0, y0 = x0.clone(), y0.clone()  # the loader may reuse its buffers for the next batch
        x1, y1, s = next(it)
        yield torch.cat([x0, x1]), torch.cat([y0, y1]), s


if stage == "pretrain":
    real = mod.tokenizing_distributed_data_loader_with_state_bos_bestfit
    real_create = mod.create_model

    def create_model(config, device):
        model = real_create(config, device)
        perturb_output_projections(model)
        return model
    mod.create_model = create_model

    def loader(tok, B, T, paths, **kw):
        if mode == "merge":
            return merged(lambda: real(tok, B // 2, T, paths, rank=0, world_size=1, **kw))
        return strided(lambda: real(tok, B, T, paths, rank=0, world_size=1, **kw))
    mod.tokenizing_distributed_data_loader_with_state_bos_bestfit = loader
elif stage == "sft":
    real_sft = mod.sft_batches

    def sft_loader(ds, tok, B, T, rank=0, world_size=1, device="cpu", state=None):
        assert state is None
        return strided(lambda: real_sft(ds, tok, B, T, 0, 1, device))
    mod.sft_batches = sft_loader
else:
    from nanopipe.tasks import Arithmetic
    Arithmetic.reward = lambda self, conversation, completion: float(len(completion) % 2)

if mode == "perturb":  # every gradient element moved by ~1 ulp before every optimizer step
    real_step = mod.optimizer_step
    gen = torch.Generator().manual_seed(0)

    def perturbed_step(optimizer, model, *a, **k):
        for p in model.parameters():
            if p.grad is not None:
                sign = torch.randint(0, 2, p.grad.shape, generator=gen).to(p.grad.dtype) * 2 - 1
                p.grad.mul_(1 + sign * 2.0 ** -23)
        real_step(optimizer, model, *a, **k)
    mod.optimizer_step = perturbed_step

run_stage(mod, make_cfg(*overrides))
'''

COMMON = ["tracking.enabled=false", "runtime.device=cpu", "runtime.threads=1"]
STAGE_ARGS = {
    # 6 steps of 1024 tokens: 2 micro-batches of 4 x 128 in 1 process, 1 per rank in 2
    "pretrain": ["experiment=smoke", *COMMON, "pretrain.device_batch_size=4", "pretrain.total_batch_size=1024",
                 "pretrain.num_iterations=6", "pretrain.eval_every=-1", "pretrain.eval_tokens=1024",
                 "pretrain.sample_every=-1", "pretrain.save_every=-1", "pretrain.keep_checkpoints=0",
                 "pretrain.loader_threads=1"],
    # 6 steps of 512 tokens: 2 micro-batches of 4 x 64 in 1 process, 1 per rank in 2
    "sft": ["experiment=smoke", *COMMON, "sft.max_seq_len=64", "sft.device_batch_size=4", "sft.total_batch_size=512",
            "sft.num_iterations=6", "sft.eval_every=-1", "sft.eval_tokens=256", "sft.save_every=-1",
            "sft.keep_checkpoints=0", "sft.sample_tokens=0"],
    # 3 steps x 2 questions x 4 samples; 1 question per rank in 2
    "rl": ["experiment=smoke", *COMMON, "rl.task=arithmetic", "rl.arithmetic_max_steps=1", "rl.num_steps=3",
           "rl.save_every=-1", "rl.keep_checkpoints=0", "rl.eval_every=-1", "rl.eval_examples=2"],
}
OUTPUT = {"pretrain": "models/base", "sft": "models/sft", "rl": "models/rl"}


def perturb_output_projections(model) -> None:
    """Small random weights in the zero-initialised output projections (the same on every rank). At the
    real init the residual and x0 lambdas get an exactly-zero gradient (RMSNorm makes the output
    invariant to their common scale) and AdamW (eps 1e-10) turns the rounding noise in that zero into
    full +-lr steps of either sign: there, ANY change of reduction order moves the weights by up to
    ~1.6 within 6 steps (measured), as much as a real bug does. See the module docstring."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for block in model.transformer.h:
            for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)


# -- inputs ----------------------------------------------------------------------------------------------


def _words_text(seed: int, n_docs: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ("the a garden apple banana river count letters spell word many python answer final one two three "
             "four five six seven eight nine ten plus minus times equals small large quick brown fox jumps over "
             "lazy dog cat runs under bright moon sun star sky blue green red").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 120))) + "." for _ in range(n_docs)]


def _pretrain_inputs(root: Path) -> None:
    """data/shards (a train and a val parquet shard, row groups of 16 documents, and the manifest) and
    models/tokenizer trained on them."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanopipe.tokenizer import Tokenizer

    shards = root / "data/shards"
    shards.mkdir(parents=True)
    docs = {"shard_00000.parquet": _words_text(0, 480), "shard_00001.parquet": _words_text(1, 96)}
    for name, texts in docs.items():
        pq.write_table(pa.table({"text": texts}), shards / name, row_group_size=16)
    (shards / "manifest.json").write_text(json.dumps({
        "shards": [{"name": "shard_00000.parquet", "split": "train", "sha256": "0" * 64},
                   {"name": "shard_00001.parquet", "split": "val", "sha256": "1" * 64}],
        "val_shard": "shard_00001.parquet"}))
    Tokenizer.train_from_iterator(iter(docs["shard_00000.parquet"]), 384).save(root / "models/tokenizer")


def _sft_inputs(root: Path) -> None:
    """models/tokenizer and a random-init models/base matching the smoke preset (as tests/train/test_sft.py)."""
    from nanopipe.model.checkpoint import save_checkpoint
    from nanopipe.model.gpt import config_from_depth, create_model
    from nanopipe.tasks import IDENTITY_PATH
    from nanopipe.tokenizer import Tokenizer

    words = "apple banana garden strawberry count letters spell the word how many are in Python gives us final answer "
    tok = Tokenizer.train_from_iterator(iter([IDENTITY_PATH.read_text(encoding="utf-8"), words * 50,
                                              "0123456789 +-*/=#" * 50]), 512)
    tok.save(root / "models/tokenizer")
    m = make_cfg("experiment=smoke").model
    torch.manual_seed(0)
    model = create_model(config_from_depth(m.depth, tok.get_vocab_size(), m.max_seq_len, m.aspect_ratio, m.head_dim,
                                           m.window_pattern), "cpu")
    perturb_output_projections(model)
    save_checkpoint(root / "models/base", model, None, {"step": 0, "device_batch_size": 4, "total_batch_size": 512},
                    save_rng=False)


def _rl_inputs(root: Path) -> None:
    """models/tokenizer (trained on arithmetic text) and a random-init models/sft (as tests/train/test_rl.py)."""
    from nanopipe.model.checkpoint import save_checkpoint
    from nanopipe.model.gpt import config_from_depth, create_model
    from nanopipe.tasks import Arithmetic
    from nanopipe.tokenizer import Tokenizer

    task = Arithmetic(size=300, split="train", max_steps=1)
    texts = [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
             for i in range(len(task)) for m in task[i]["messages"]]
    tok = Tokenizer.train_from_iterator(iter(texts), 300)
    tok.save(root / "models/tokenizer")
    torch.manual_seed(0)
    model = create_model(config_from_depth(2, tok.get_vocab_size(), 128, 64, 64, "L"), "cpu")
    perturb_output_projections(model)
    save_checkpoint(root / "models/sft", model, None, {"step": 0}, save_rng=False)


INPUTS = {"pretrain": _pretrain_inputs, "sft": _sft_inputs, "rl": _rl_inputs}


# -- runs ------------------------------------------------------------------------------------------------


def run_stage_in(root: Path, stage: str, nproc: int, mode: str = "plain", extra=()) -> dict:
    """Run `stage` in a fresh copy of the inputs under root/<name>; returns the final weights."""
    name = f"{stage}-{nproc}-{mode}"
    work = root / name
    inputs = root / f"inputs-{stage}"
    if not inputs.exists():
        INPUTS[stage](inputs)
    shutil.copytree(inputs, work, symlinks=True)
    runner = root / "runner.py"
    runner.write_text(RUNNER.format(tests=str(TESTS), here=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if nproc == 1:
        launch = [sys.executable]
    else:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        launch = [torchrun, "--standalone", f"--nproc-per-node={nproc}"]
    if mode == "merge":  # one micro-batch of 2 x 4 rows instead of two of 4
        extra = [*extra, "pretrain.device_batch_size=8"]
    p = subprocess.run([*launch, str(runner), stage, mode, *STAGE_ARGS[stage], *extra], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{name}:\n{p.stdout[-2000:]}\n{p.stderr[-6000:]}"
    return torch.load(work / OUTPUT[stage] / "model.pt", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys()
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


# -- the tests -------------------------------------------------------------------------------------------


def _assert_equivalent(one: dict, two: dict, stage: str) -> None:
    diff, worst = max_abs_diff(one, two)
    assert diff <= TOL, (f"{stage}: 2 processes differ from 1 process on the same global batch by {diff:.3e} "
                         f"(max |one - two|, in {worst}); tolerance {TOL}: a gradient-sync bug?")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "rl"])
def test_two_processes_train_like_one_on_the_same_global_batch(stage, tmp_path):
    one = run_stage_in(tmp_path, stage, 1)
    two = run_stage_in(tmp_path, stage, 2)
    _assert_equivalent(one, two, stage)
