"""The rl stage: rollouts keep the stop token, the batch/loss follow REINFORCE's formula, and a few
offline steps on a tiny model (fake SFT checkpoint, tokenizer trained here) log rewards, resume
exactly, and leave a checkpoint the Engine can load."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from doubles import ScriptedModel
from helpers import REPO, make_cfg

from nanopipe import paths
from nanopipe.config import ConfigError
from nanopipe.inference.engine import Engine
from nanopipe.model.checkpoint import load_model, save_checkpoint
from nanopipe.model.gpt import GPTConfig, config_from_depth, create_model
from nanopipe.stage import run_stage
from nanopipe.stages import rl as rl_stage
from nanopipe.tasks import Arithmetic
from nanopipe.tokenizer import Tokenizer
from nanopipe.train import rl


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def byte_tokenizer():
    """The real Tokenizer with no merges: ids 0-255 are bytes, the 9 specials follow."""
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)})


def test_rollout_keeps_sampled_stop_token_and_masks_forced_calculator_output():
    tok = byte_tokenizer()
    sp = tok.encode_special
    end, py0, py1, out0, out1 = (sp(s) for s in ("<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                                                 "<|output_start|>", "<|output_end|>"))
    X = ord("x")  # what the model would say while the Engine forces the calculator output
    script = [py0, *b"2+3", py1, X, X, X, *b"#### 5", end]
    engine = Engine(ScriptedModel(script, tok.get_vocab_size()), tok)
    prompt = [tok.get_bos_token_id(), *b"hi", sp("<|assistant_start|>")]
    seqs, masks, stopped = rl.rollout(engine, prompt, num_samples=2, max_tokens=30, temperature=1.0, top_k=None, seed=1)
    want = prompt + [py0, *b"2+3", py1, out0, ord("5"), out1, *b"#### 5", end]
    assert seqs == [want, want] and stopped == [True, True]
    assert masks[0] == [0] * len(prompt) + [1] * 5 + [0] * 3 + [1] * 6 + [1]  # stop token sampled: mask 1
    assert rl.completion_text(tok, seqs[0], len(prompt), True).endswith("#### 5")
    # a row cut by max_tokens did not stop: nothing is appended
    seqs, masks, stopped = rl.rollout(engine, prompt, num_samples=1, max_tokens=4, temperature=1.0, top_k=None, seed=1)
    assert seqs[0] == prompt + [py0, *b"2+3"] and stopped == [False]


def test_batch_and_loss_follow_the_spec_formula():
    torch.manual_seed(0)
    tok = byte_tokenizer()
    V = tok.get_vocab_size()
    model = create_model(GPTConfig(sequence_len=32, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                                   window_pattern="L"), "cpu")
    with torch.no_grad():  # the real init zeroes the output projections: make every token's logit differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    end = tok.encode_special("<|assistant_end|>")
    prompt = [tok.get_bos_token_id(), 5, 6, tok.encode_special("<|assistant_start|>")]
    # row 0: 2 sampled, 3 forced, 1 sampled, stop; row 1: 3 sampled, stop; row 2: cut at max tokens
    seqs = [prompt + [10, 11, 20, 21, 22, 12, end], prompt + [13, 14, 15, end], prompt + [16, 17, 18, 19]]
    masks = [[0] * 4 + [1, 1, 0, 0, 0, 1, 1], [0] * 4 + [1, 1, 1, 1], [0] * 4 + [1, 1, 1, 1]]
    rewards = [1.0, 0.0, 0.0]
    inputs, targets, rew, adv = rl.build_batch(seqs, masks, rewards, pad_id=end, device="cpu")

    T = max(len(s) for s in seqs)
    assert inputs.shape == targets.shape == (3, T - 1)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3])) and abs(adv.sum().item()) < 1e-6
    assert targets[0].tolist() == [-1, -1, -1, 10, 11, -1, -1, -1, 12, end]  # forced 20-22 ignored, stop trained
    assert targets[1].tolist() == [-1, -1, -1, 13, 14, 15, end, -1, -1, -1]  # padding ignored
    assert targets[2].tolist() == [-1, -1, -1, 16, 17, 18, 19, -1, -1, -1]

    normaliser = 2  # e.g. 1 pass x 2 questions on this rank
    loss = rl.pg_loss(model, inputs, targets, adv, normaliser)
    # by hand: -sum_{valid (r,t)} adv[r] * log softmax(logits[r, t])[target] / (num_valid * normaliser)
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs), dim=-1)
    total, valid = 0.0, 0
    for r in range(3):
        for t in range(len(seqs[r]) - 1):  # padding is never a target
            if masks[r][t + 1] == 1:  # a sampled token (forced output and prompt have mask 0)
                total += adv[r].item() * logp[r, t, seqs[r][t + 1]].item()
                valid += 1
    assert valid == (targets >= 0).sum().item() == 4 + 4 + 4
    assert loss.item() == pytest.approx(-total / (valid * normaliser), rel=1e-5, abs=1e-7)
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0

    # identical rewards: zero advantages, loss exactly 0 (nothing to learn from the group)
    _, _, _, adv0 = rl.build_batch(seqs, masks, [1.0, 1.0, 1.0], pad_id=end, device="cpu")
    assert torch.equal(adv0, torch.zeros(3))
    assert rl.pg_loss(model, inputs, targets, adv0, normaliser).item() == 0.0


# ----------------------------------------------------------------------------- the stage, offline

def fake_sft(root, vocab_size=300, depth=2, seq_len=128):
    """models/tokenizer (trained here on arithmetic text) and a freshly initialised models/sft."""
    task = Arithmetic(size=300, split="train", max_steps=1)
    texts = [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
             for i in range(len(task)) for m in task[i]["messages"]]
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size)
    tok.save(root / paths.TOKENIZER)
    torch.manual_seed(0)
    model = create_model(config_from_depth(depth, tok.get_vocab_size(), seq_len, 64, 64, "L"), "cpu")
    save_checkpoint(root / paths.CHECKPOINTS["sft"], model, None, {"step": 0}, save_rng=False)
    return tok


def parity_reward(self, conversation, completion):
    """A crafted 0/1 reward that varies within a group (a random tiny model never solves a problem)."""
    return float(len(completion) % 2)


def smoke_cfg(*extra):
    return make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "runtime.threads=1",
                    "rl.task=arithmetic", "rl.arithmetic_max_steps=1", *extra)


def test_config_errors_name_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"rl.num_samples.*>= 2"):
        smoke_cfg("rl.num_samples=1")
    with pytest.raises(ConfigError, match=r"rl.task.*one of gsm8k, arithmetic"):
        smoke_cfg("rl.task=mmlu")
    fake_sft(tmp_path)
    (tmp_path / paths.CHECKPOINTS["sft"] / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"models/sft/meta.json.*`sft` stage"):
        run_stage(rl_stage, smoke_cfg())


def test_rl_steps_offline_log_reward_and_checkpoint_loads_in_engine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = fake_sft(tmp_path)
    monkeypatch.setattr(Arithmetic, "reward", parity_reward)
    run_stage(rl_stage, smoke_cfg())

    metrics = json.loads((tmp_path / "metrics/rl.json").read_text())
    assert metrics["task"] == "arithmetic" and metrics["num_steps"] == 2
    assert set(metrics["pass_at_k_end"]) == {"pass_at_1", "pass_at_2"}
    with open(tmp_path / "metrics/rl/reward.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(0.0 <= float(r["reward"]) <= 1.0 and float(r["sequence_length"]) > 0 for r in rows)
    with open(tmp_path / "metrics/rl/pass_at_k.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1, 2]
    assert "pass@1" in (tmp_path / "metrics/sections/rl.md").read_text()
    assert not (tmp_path / "models/resume/rl").exists()  # in-progress checkpoints cleared at the end

    model, meta = load_model(tmp_path / paths.CHECKPOINTS["rl"], "cpu", "eval", tokenizer=tok)
    sft, _ = load_model(tmp_path / paths.CHECKPOINTS["sft"], "cpu", "eval")
    assert meta["step"] == 2 and meta["source"] == "sft"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, sft.state_dict()[k])]
    assert changed, "RL with varying rewards left every weight unchanged"
    results, masks = Engine(model, tok).generate_batch(tok.render_for_completion(Arithmetic(split="test")[0]),
                                                      num_samples=2, max_tokens=4, temperature=1.0)
    assert len(results) == 2 and all(len(r) == len(m) for r, m in zip(results, masks))


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(Arithmetic, "reward", parity_reward)
    for name in ("clean", "resumed"):
        (tmp_path / name).mkdir()
        fake_sft(tmp_path / name)
    monkeypatch.chdir(tmp_path / "clean")
    run_stage(rl_stage, smoke_cfg())

    monkeypatch.chdir(tmp_path / "resumed")
    real_step = rl_stage.optimizer_step

    def crash_on_second_step(optimizer, model, lrm, *a, **k):
        if lrm < 1.0:
            raise KeyboardInterrupt("simulated interruption")
        real_step(optimizer, model, lrm, *a, **k)

    monkeypatch.setattr(rl_stage, "optimizer_step", crash_on_second_step)
    with pytest.raises(KeyboardInterrupt):
        run_stage(rl_stage, smoke_cfg())
    assert (tmp_path / "resumed/models/resume/rl/step_000001/meta.json").exists()
    monkeypatch.setattr(rl_stage, "optimizer_step", real_step)
    run_stage(rl_stage, smoke_cfg())
    assert json.loads((tmp_path / "resumed/metrics/rl.json").read_text())["resumed_from_step"] == 1
    a = torch.load(tmp_path / "clean/models/rl/model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/models/rl/model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from helpers import make_cfg
from nanopipe.tasks import Arithmetic
from nanopipe.config import ConfigError
from nanopipe.stage import run_stage
from nanopipe.stages import rl as rl_stage
from nanopipe.train import rl
Arithmetic.reward = lambda self, conversation, completion: float(len(completion) % 2)
run_stage(rl_stage, make_cfg(*sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_ranks_train_like_one(tmp_path):
    """torchrun with 2 CPU ranks (gloo): same questions, samples and rewards per step as 1 process,
    and the same weights up to float reduction order."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(tests=str(REPO / "tests")))
    args = ["experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "runtime.threads=1", "rl.task=arithmetic",
            "rl.arithmetic_max_steps=1", "rl.save_every=-1", "rl.eval_examples=3"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    for name, launch in (("one", [sys.executable]), ("two", [torchrun, "--standalone", "--nproc-per-node=2"])):
        (tmp_path / name).mkdir()
        fake_sft(tmp_path / name)
        p = subprocess.run([*launch, str(runner), *args], cwd=tmp_path / name, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
    rows = {}
    for name in ("one", "two"):
        with open(tmp_path / name / "metrics/rl/reward.csv") as f:
            rows[name] = [(r["reward"], r["sequence_length"]) for r in csv.DictReader(f)]
    assert rows["one"] == rows["two"]
    m1 = json.loads((tmp_path / "one/metrics/rl.json").read_text())
    m2 = json.loads((tmp_path / "two/metrics/rl.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2) and m1["pass_at_k_end"] == m2["pass_at_k_end"]
    a = torch.load(tmp_path / "one/models/rl/model.pt", weights_only=True)
    b = torch.load(tmp_path / "two/models/rl/model.pt", weights_only=True)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), (k, (a[k] - b[k]).abs().max().item())


def test_rl_disabled_records_the_skip_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    """The speedrun preset (nanochat's speedrun.sh runs no RL): the stage writes its outputs as DVC
    expects, none of them a checkpoint, so chat_eval skips the source and serve's `auto` picks sft."""
    from helpers import make_cfg

    from nanopipe import paths
    from nanopipe.stage import run_stage
    from nanopipe.stages import rl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/sft").mkdir(parents=True)
    (tmp_path / "models/sft/meta.json").write_text("{}")
    cfg = make_cfg("experiment=speedrun", "tracking.enabled=false", "runtime.device=cpu")
    assert cfg.rl.enabled is False and list(cfg.chat_eval.sources) == ["sft"] and cfg.export.source == "sft"
    run_stage(rl, cfg)  # no tokenizer, no model: a skipped stage reads nothing
    assert sorted(p.name for p in (tmp_path / "models/rl").iterdir()) == ["SKIPPED.txt"]
    assert "rl.enabled is false" in json.loads((tmp_path / "metrics/rl.json").read_text())["skipped"]
    assert (tmp_path / "metrics/rl/reward.csv").read_text() == "step,reward\n"
    assert (tmp_path / "metrics/rl/pass_at_k.csv").read_text() == "step,pass_at_1\n"
    assert "Skipped" in (tmp_path / "metrics/sections/rl.md").read_text()
    assert paths.checkpoint_dir("auto") == paths.CHECKPOINTS["sft"]
