"""The sft stage: packing masks, truncation without stalls, mixture determinism and resume,
and an end-to-end run on a tiny base checkpoint whose loss goes down."""
import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_cfg, make_repo_copy, run

from nanopipe.eval.chat_format import PROBES, chat_samples, format_problems
from nanopipe.stage import run_stage
from nanopipe.stages import sft
from nanopipe.tasks import IDENTITY_PATH
from nanopipe.train.schedules import lr_multiplier_by_progress
from nanopipe.train.sft_data import build_mixture, describe, render, sft_batches

VOCAB = 512


@pytest.fixture(scope="module")
def tok():
    from nanopipe.tokenizer import Tokenizer

    text = IDENTITY_PATH.read_text(encoding="utf-8")
    words = "apple banana garden strawberry count letters spell the word how many are in Python gives us final answer "
    return Tokenizer.train_from_iterator(iter([text, words * 50, "0123456789 +-*/=#" * 50]), VOCAB)


def conv(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


TOOL_CONV = conv("How many r in 'strawberry'?", [
    {"type": "text", "text": "Let me count with Python:"},
    {"type": "python", "text": "'strawberry'.count('r')"},
    {"type": "python_output", "text": "3"},
    {"type": "text", "text": "\n#### 3"},
])
TWO_TURNS = {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, I'm nanopipe."},
                          {"role": "user", "content": "Spell apple"}, {"role": "assistant", "content": "apple:a,p,p,l,e"}]}


def expected_targets(ids, mask):
    return [t if m else -1 for t, m in zip(ids[1:], mask[1:])]


# -----------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("conversation", [TOOL_CONV, TWO_TURNS], ids=["tool-call", "two-turns"])
def test_targets_are_exactly_the_assistant_tokens(tok, conversation):
    ids, mask = tok.render_conversation(conversation)
    T = len(ids) + 9  # one conversation + padding in the row
    x, y, state = next(sft_batches([conversation], tok, batch_size=1, seq_len=T, buffer_size=1))
    assert x.shape == y.shape == (1, T)
    assert x[0, :len(ids)].tolist() == ids
    assert x[0, len(ids):].tolist() == [tok.get_bos_token_id()] * (T - len(ids))  # BOS padding
    assert y[0].tolist() == expected_targets(ids, mask) + [-1] * (T + 1 - len(ids))
    # what is supervised, by name: assistant text, the tool call with its delimiters, <|assistant_end|>
    supervised = tok.decode([t for t in y[0].tolist() if t >= 0])
    for piece in ("Let me count", "<|python_start|>'strawberry'.count('r')<|python_end|>", "#### 3<|assistant_end|>") \
            if conversation is TOOL_CONV else ("Hello, I'm nanopipe.<|assistant_end|>apple:a,p,p,l,e<|assistant_end|>",):
        assert piece in supervised
    for never in ("<|bos|>", "<|user_start|>", "How many", "<|output_start|>", "<|assistant_start|>", "Spell apple"):
        assert never not in supervised
    assert state["supervised_tokens"] == sum(mask[1:]) and state["truncated"] == 0


def test_rows_pack_whole_conversations_best_fit(tok):
    data = [conv(f"question {i}", "answer " * (i % 7 + 1)) for i in range(40)]
    T = 64
    rendered = {i: tok.render_conversation(c) for i, c in enumerate(data)}
    gen = sft_batches(data, tok, batch_size=4, seq_len=T, buffer_size=10)
    lookup = {tuple(ids): mask for ids, mask in rendered.values()}
    bos = tok.get_bos_token_id()
    for _ in range(5):
        x, y, state = next(gen)
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert row_x[0] == bos
            # the full row of T+1 tokens (a conversation always ends supervised, padding never is)
            full = row_x + [row_y[-1] if row_y[-1] >= 0 else bos]
            starts = [i for i, t in enumerate(full) if t == bos]
            row_mask = []
            for piece in [full[a:b] for a, b in zip(starts, starts[1:] + [len(full)])]:
                if len(piece) == 1:  # BOS padding
                    row_mask += [0]
                    continue
                assert tuple(piece) in lookup, "a conversation was split or altered"
                row_mask += lookup[tuple(piece)]
            assert row_y == [t if m else -1 for t, m in zip(full[1:], row_mask[1:])]
    assert state["conversations"] > 0 and state["padding_tokens"] < 5 * 4 * (T + 1) * 0.5


def test_overlong_conversations_are_truncated_counted_and_never_stall(tok):
    long_reply = "nanopipe " * 300
    data = [conv("Tell me everything.", long_reply)] * 3 + [conv("hi", "hello")]
    gen = sft_batches(data, tok, batch_size=2, seq_len=32, buffer_size=4)
    batches = [next(gen) for _ in range(20)]  # nanochat's packer would spin forever here (docs/decisions.md, D2)
    x, y, state = batches[-1]
    assert state["truncated"] > 0
    assert state["conversations"] >= 40  # every row got a conversation
    ids, mask, cut = render(tok, data[0], 33)
    assert cut and len(ids) == 33
    for _x, y, _ in batches:
        assert (y >= 0).any(dim=1).all(), "a row without supervised tokens"


def test_conversation_with_nothing_supervised_in_the_row_is_skipped(tok):
    data = [conv("word " * 200, "ok"), conv("hi", "hello")]
    x, y, state = next(sft_batches(data, tok, batch_size=1, seq_len=16, buffer_size=1))
    assert state["skipped"] >= 1 and state["skipped"] == state["truncated"]  # read again after wrapping around
    assert (y >= 0).any()
    with pytest.raises(ValueError, match="nothing to train on"):
        next(sft_batches(data[:1], tok, batch_size=1, seq_len=16, buffer_size=1))


def test_resume_from_state_continues_exactly_and_ranks_are_disjoint(tok):
    data = [conv(f"q{i}", "a " * (i % 11 + 1)) for i in range(60)]
    ref = sft_batches(data, tok, batch_size=3, seq_len=48, buffer_size=8)
    batches = [next(ref) for _ in range(6)]
    state = json.loads(json.dumps(batches[2][2]))  # what a checkpoint stores (JSON-able)
    resumed = sft_batches(data, tok, batch_size=3, seq_len=48, buffer_size=8, state=[state])
    for want in batches[3:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[2] == want[2]
    # rank r reads conversations r, r+W, ...: two ranks never see the same conversation in an epoch
    seen = {}
    for rank in (0, 1):
        st = next(sft_batches(data, tok, batch_size=2, seq_len=48, rank=rank, world_size=2, buffer_size=5))[2]
        seen[rank] = set(st["buffer"])
        assert all(i % 2 == rank for i in st["buffer"])
    assert not seen[0] & seen[1]


# -----------------------------------------------------------------------------
# Mixture, schedule, format checks


def test_embedded_mixture_is_deterministic_and_sized_from_config():
    cfg = make_cfg("experiment=smoke").sft
    a, b = build_mixture(cfg, "train"), build_mixture(cfg, "train")
    assert len(a) == cfg.identity_epochs * 80 + cfg.simple_spelling_examples + cfg.spelling_bee_examples + cfg.arithmetic_examples
    assert [a[i] for i in range(0, len(a), 7)] == [b[i] for i in range(0, len(b), 7)]
    assert describe(a) == {"CustomJSON": cfg.identity_epochs * 80, "SimpleSpelling": cfg.simple_spelling_examples,
                           "SpellingBee": cfg.spelling_bee_examples, "Arithmetic": cfg.arithmetic_examples}
    val = build_mixture(cfg, "val")
    assert len(val) == 3 * cfg.val_examples
    train_prompts = {a[i]["messages"][0]["content"] for i in range(len(a))}
    assert sum(val[i]["messages"][0]["content"] in train_prompts for i in range(len(val))) < len(val) // 2
    with pytest.raises(ValueError, match="`sft.mixture` = 'nope': expected one of full, embedded"):
        make_cfg("experiment=smoke", "sft.mixture=nope")


def test_full_mixture_follows_nanochat(monkeypatch):
    import nanopipe.train.sft_data as sd

    made = []

    def fake(name):
        class Fake:
            def __init__(self, *a, **k):
                made.append((name, k))

            def __len__(self):
                return 3

            def __getitem__(self, i):
                return conv(name, str(i))
        Fake.__name__ = name
        return Fake

    for name in ("SmolTalk", "MMLU", "GSM8K"):
        monkeypatch.setattr(sd, name, fake(name))
    cfg = make_cfg("sft.mixture=full", "sft.identity_epochs=2", "sft.gsm8k_epochs=2", "sft.simple_spelling_examples=5",
                   "sft.spelling_bee_examples=4", "sft.arithmetic_examples=0", "sft.dataset_dir=/data/hf").sft
    mix = build_mixture(cfg, "train")
    assert describe(mix) == {"SmolTalk": 3, "MMLU": 3, "GSM8K": 2 * 3, "CustomJSON": 2 * 80, "SimpleSpelling": 5,
                             "SpellingBee": 4}
    assert ("MMLU", {"subset": "auxiliary_train", "split": "train", "dataset_dir": "/data/hf"}) in made
    made.clear()
    build_mixture(cfg, "val")
    assert made == [("SmolTalk", {"split": "test", "dataset_dir": "/data/hf"}),
                    ("MMLU", {"subset": "all", "split": "test", "stop": 5200, "dataset_dir": "/data/hf"}),
                    ("GSM8K", {"subset": "main", "split": "test", "stop": 420, "dataset_dir": "/data/hf"})]


def test_lr_schedule_is_nanochats():
    assert lr_multiplier_by_progress(0.5, 0.0, 0.2, 0.0) == 1.0
    assert lr_multiplier_by_progress(0.8, 0.0, 0.2, 0.0) == 1.0
    assert lr_multiplier_by_progress(0.9, 0.0, 0.2, 0.0) == pytest.approx(0.5)
    assert lr_multiplier_by_progress(1.0, 0.0, 0.2, 0.0) == 0.0
    assert lr_multiplier_by_progress(1.0, 0.0, 0.2, 0.1) == pytest.approx(0.1)
    assert lr_multiplier_by_progress(0.05, 0.1, 0.2, 0.0) == pytest.approx(0.5)


def test_format_problems_flag_bad_replies_only():
    good = [{"kind": "identity", "prompt": "Who are you?", "reply": "I'm nanopipe, a small chat model.", "finished": True},
            {"kind": "spelling", "prompt": "Spell the word: apple", "reply": "apple:a,p,p,l,e", "finished": True},
            {"kind": "spelling", "prompt": "Spell the word: cat", "reply": "cot:c,a,t", "finished": True},  # wrong, well formed
            {"kind": "arithmetic", "prompt": "...", "reply": "12 + 5 = <|python_start|>12+5<|python_end|>"
             "<|output_start|>17<|output_end|>17 apples.\n#### 17", "finished": True}]
    assert format_problems(good) == []
    bad = [{"kind": "identity", "prompt": "hi", "reply": "nanopipe nanopipe nanopipe", "finished": False},
           {"kind": "identity", "prompt": "hi", "reply": "", "finished": True},
           {"kind": "spelling", "prompt": "Spell the word: apple", "reply": "apple is a fruit", "finished": True},
           {"kind": "arithmetic", "prompt": "...", "reply": "17 apples.<|user_start|>", "finished": True}]
    problems = format_problems(bad)
    assert len(problems) == 5, problems
    assert any("no <|assistant_end|>" in p for p in problems) and any("empty reply" in p for p in problems)


# -----------------------------------------------------------------------------
# The stage end to end, on a tiny base model


def _make_inputs(root: Path, cfg, tok, steps_of_pretraining: int = 0):
    """models/tokenizer and a (random-init) models/base checkpoint matching the smoke preset."""
    from nanopipe.model.checkpoint import save_checkpoint
    from nanopipe.model.gpt import config_from_depth, create_model

    tok.save(root / "models/tokenizer")
    m = cfg.model
    torch.manual_seed(0)
    model = create_model(config_from_depth(m.depth, tok.get_vocab_size(), m.max_seq_len, m.aspect_ratio, m.head_dim,
                                           m.window_pattern), "cpu")
    save_checkpoint(root / "models/base", model, None, {"step": 0, "device_batch_size": 4, "total_batch_size": 512},
                    save_rng=False)


def test_missing_base_checkpoint_names_pretrain(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    tok.save(tmp_path / "models/tokenizer")
    with pytest.raises(FileNotFoundError, match="models/base.*`pretrain` stage"):
        run_stage(sft, make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu"))


def test_stage_end_to_end_loss_goes_down(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "sft.num_iterations=16",
                   "sft.eval_every=8", "sft.save_every=-1", "sft.max_seq_len=64", "sft.total_batch_size=512")
    _make_inputs(tmp_path, cfg, tok)
    run_stage(sft, cfg)
    m = json.loads((tmp_path / "metrics/sft.json").read_text())
    assert m["step"] == 16 and m["grad_accum_steps"] == 2  # 512 tokens = 2 micro-batches of 4 x 64
    assert m["supervised_tokens"] > 0 and m["conversations_trained"] > 0
    assert m["truncated_conversations"] > 0  # SpellingBee traces do not fit 64-token rows: cut, counted, trained
    val = list(csv.DictReader(open(tmp_path / "metrics/sft/val.csv")))
    assert [int(r["step"]) for r in val] == [0, 8, 16]
    assert float(val[-1]["val_loss"]) < float(val[0]["val_loss"]) - 0.5
    train = list(csv.DictReader(open(tmp_path / "metrics/sft/train.csv")))
    assert len(train) == 16 and float(train[-1]["loss_smooth"]) < float(train[0]["loss"])
    assert len(m["samples"]) == len(PROBES) and isinstance(m["format_problems"], list)
    assert (tmp_path / "metrics/sections/sft.md").read_text().startswith("## sft")
    from nanopipe.model.checkpoint import load_model

    model, meta = load_model(tmp_path / "models/sft", "cpu", "eval", tokenizer=tok)
    assert meta["step"] == 16 and meta["max_seq_len"] == 64
    assert not (tmp_path / "models/resume/sft").exists()


def test_stage_resumes_from_its_checkpoint_bit_identically(tmp_path, monkeypatch, tok):
    overrides = ["experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "sft.num_iterations=6",
                 "sft.eval_every=-1", "sft.save_every=3", "sft.max_seq_len=64", "sft.total_batch_size=256"]
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*overrides)
    _make_inputs(tmp_path, cfg, tok)
    run_stage(sft, cfg)
    reference = torch.load(tmp_path / "models/sft/model.pt", weights_only=True)

    # the same run, interrupted after its step-3 checkpoint: replay it by stopping at 4, then rerun
    import nanopipe.train.loop as loop

    saved = []
    original = loop.Resume.save

    def save_then_crash(self, step, *a, **k):
        original(self, step, *a, **k)
        saved.append(step)
        raise KeyboardInterrupt
    monkeypatch.setattr(loop.Resume, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage(sft, cfg)
    assert saved == [3] and (tmp_path / "models/resume/sft/step_000003").exists()
    monkeypatch.setattr(loop.Resume, "save", original)
    run_stage(sft, cfg)
    m = json.loads((tmp_path / "metrics/sft.json").read_text())
    assert m["resumed_from_step"] == 3
    resumed = torch.load(tmp_path / "models/sft/model.pt", weights_only=True)
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), f"{k} differs after resume"


@pytest.mark.slow
def test_two_process_torchrun(tmp_path, tok):
    _make_inputs(tmp_path, make_cfg("experiment=smoke"), tok)
    from omegaconf import OmegaConf

    OmegaConf.save(make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "sft.max_seq_len=64",
                            "sft.total_batch_size=512", "sft.num_iterations=4", "runtime.threads=1"),
                   tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run([shutil.which("torchrun") or "torchrun", "--standalone", "--nproc-per-node=2", "-m", "nanopipe.cli",
                        "sft"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    m = json.loads((tmp_path / "metrics/sft.json").read_text())
    assert m["world_size"] == 2 and m["step"] == 4 and m["grad_accum_steps"] == 1  # 4 x 64 x 2 ranks = 512


# -----------------------------------------------------------------------------
# A model trained through the real stages: does it chat in its format?

# The smoke preset, with enough SFT (on more identity and arithmetic rows) to learn the chat format:
# at the preset's 6 steps every probe rambles on past the token budget.
FORMAT_SFT = ["sft.num_iterations=300", "sft.eval_every=100", "sft.save_every=-1", "sft.identity_epochs=4",
              "sft.arithmetic_examples=400"]


@pytest.fixture(scope="module")
def smoke_sft_repo(tmp_path_factory):
    """A repo copy on the smoke preset where `dvc repro sft` trained tokenizer, base and SFT models."""
    repo = make_repo_copy(tmp_path_factory.mktemp("sft_format") / "repo", "experiment=smoke", "tracking.enabled=false",
                          *FORMAT_SFT)
    run(["dvc", "repro", "sft"], repo, timeout=1500)
    return repo


@pytest.mark.slow
def test_tiny_sft_model_answers_in_format(smoke_sft_repo):
    """Greedy replies to the probes: identity a sentence, spelling 'word:l,e,t,t,e,r,s', arithmetic ending
    '#### <number>', each closed by <|assistant_end|>, no chat-format token leaked (chat_format.format_problems)."""
    from nanopipe.model.checkpoint import load_model
    from nanopipe.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smoke_sft_repo / "models/tokenizer")
    model, meta = load_model(smoke_sft_repo / "models/sft", "cpu", "eval", tokenizer=tokenizer)
    assert meta["step"] == 300
    samples = chat_samples(model, tokenizer)
    assert [(s["kind"], s["prompt"]) for s in samples] == PROBES
    assert all(s["finished"] for s in samples), samples
    problems = format_problems(samples)
    assert problems == [], "\n".join(problems)
