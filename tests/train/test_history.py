"""Checkpoint history: a training stage keeps its checkpoints at save_every (keep_checkpoints of them)
in models/<stage>/steps/, through interruptions; the consumers (chat_eval, chat, serve, export, base_eval)
take a step, and an unknown step is named in one line. The resume checkpoint stays separate."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import make_cfg

from nanopipe.model.checkpoint import UnknownStep, checkpoint_at, history_steps, load_model
from nanopipe.stage import run_stage
from nanopipe.stages import chat_eval, export, sft
from nanopipe.tasks import IDENTITY_PATH

SFT = ["experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "sft.num_iterations=6", "sft.eval_every=-1",
       "sft.save_every=2", "sft.max_seq_len=64", "sft.total_batch_size=256", "sft.sample_tokens=0"]


@pytest.fixture(scope="module")
def tok():
    from nanopipe.tokenizer import Tokenizer

    return Tokenizer.train_from_iterator(iter([IDENTITY_PATH.read_text(encoding="utf-8"), "0123456789 +-*/=#" * 50]), 512)


def make_base(root, cfg, tok):
    """models/tokenizer and a random-init models/base, as the SFT tests make them."""
    from test_sft import _make_inputs

    _make_inputs(root, cfg, tok)


def weights(path):
    return torch.load(path / "model.pt", weights_only=True)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_keeps_its_checkpoints_and_they_survive_an_interruption(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*SFT)
    make_base(tmp_path, cfg, tok)
    run_stage(sft, cfg)
    out = tmp_path / "models/sft"
    assert history_steps(out) == [2, 4] and json.loads((out / "meta.json").read_text())["history_steps"] == [2, 4]
    assert not (tmp_path / "models/resume/sft").exists()  # the resume checkpoint is separate, and gone when done
    reference = {s: weights(out / f"steps/step_{s:06d}") for s in (2, 4)}
    final = weights(out)
    assert not same(reference[2], reference[4]) and not same(reference[4], final)
    model, meta = load_model(checkpoint_at(out, 2), "cpu", "eval", tokenizer=tok)
    assert meta["step"] == 2 and same({k: v for k, v in model.state_dict().items()}, reference[2])
    assert checkpoint_at(out, -1) == out and checkpoint_at(out, 6) == out  # the final step is the final checkpoint

    # interrupted right after its step-4 save, then rerun: the same history, bit for bit
    import nanopipe.train.loop as loop

    original = loop.Resume.save

    def save_then_crash(self, step, *a, **k):
        original(self, step, *a, **k)
        if step == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(loop.Resume, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage(sft, cfg)
    assert sorted(p.name for p in (tmp_path / "models/resume/sft/history").iterdir()) == ["step_000002", "step_000004"]
    monkeypatch.setattr(loop.Resume, "save", original)
    run_stage(sft, cfg)
    assert json.loads((tmp_path / "metrics/sft.json").read_text())["resumed_from_step"] == 4
    assert history_steps(out) == [2, 4]
    for s in (2, 4):
        assert same(weights(out / f"steps/step_{s:06d}"), reference[s]), s
    assert same(weights(out), final)


def test_retention_keeps_the_newest(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*SFT, "sft.num_iterations=7", "sft.keep_checkpoints=2")
    make_base(tmp_path, cfg, tok)
    run_stage(sft, cfg)
    assert history_steps(tmp_path / "models/sft") == [4, 6]
    cfg = make_cfg(*SFT, "sft.keep_checkpoints=0")
    run_stage(sft, cfg)
    assert history_steps(tmp_path / "models/sft") == [] and not (tmp_path / "models/sft/steps").exists()


def test_consumers_take_a_step_and_name_an_unknown_one(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*SFT)
    make_base(tmp_path, cfg, tok)
    run_stage(sft, cfg)

    # export: the step-2 weights, as the step-2 checkpoint holds them
    run_stage(export, make_cfg(*SFT, "export.source=sft", "export.step=2", "export.verify=false"))
    m = json.loads((tmp_path / "metrics/export.json").read_text())
    assert m["step"] == 2
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "models/hf/model.safetensors")
    assert same(exported, weights(tmp_path / "models/sft/steps/step_000002"))
    assert json.loads((tmp_path / "models/hf/nanopipe.json").read_text())["checkpoint"] == "models/sft/steps/step_000002"

    # chat_eval: each source at the step asked for
    chat = make_cfg(*SFT, "chat_eval.sources=[sft]", "chat_eval.tasks=[Arithmetic]", "chat_eval.max_problems=1",
                    "chat_eval.max_new_tokens=4", "chat_eval.step=4")
    run_stage(chat_eval, chat)
    assert json.loads((tmp_path / "metrics/chat_eval.json").read_text())["sft"]["step"] == 4

    # an unknown step: a config error naming the key, the directory and the steps there are
    with pytest.raises(UnknownStep, match=r"`export.step` = 3: models/sft has no checkpoint at that step; "
                                          r"it has steps \[2, 4, 6\]"):
        run_stage(export, make_cfg(*SFT, "export.source=sft", "export.step=3"))
    from nanopipe.stage import main

    (tmp_path / "params.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(make_cfg(*SFT)))
    with pytest.raises(SystemExit, match=r"^nanopipe chat_eval: `chat_eval.step` = 5: models/sft has no checkpoint"):
        main(chat_eval, ["chat_eval.sources=[sft]", "chat_eval.tasks=[Arithmetic]", "chat_eval.step=5"])


@pytest.mark.parametrize("module,key", [("chat", "serve.step"), ("serve", "serve.step"), ("base_eval", "base_eval.step")])
def test_every_consumer_resolves_its_step(tmp_path, monkeypatch, tok, module, key):
    """chat, serve and base_eval look the step up before any other work: an unknown one fails naming the key."""
    import importlib

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*SFT)
    make_base(tmp_path, cfg, tok)
    from nanopipe.model.checkpoint import read_meta

    (tmp_path / "models/sft").mkdir(parents=True)
    for name in ("meta.json", "model.pt"):  # an sft "run" with no kept steps: the base checkpoint's files
        (tmp_path / "models/sft" / name).write_bytes((tmp_path / "models/base" / name).read_bytes())
    assert read_meta(tmp_path / "models/sft")["step"] == 0
    stage = importlib.import_module(f"nanopipe.stages.{module}")
    with pytest.raises(UnknownStep, match=rf"`{key}` = 9: models/(sft|base) has no checkpoint at that step; "
                                          r"it has steps \[0\]"):
        run_stage(stage, make_cfg(*SFT, "serve.source=sft", f"{key}=9"))
