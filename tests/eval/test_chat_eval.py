"""chat_eval: categorical scoring picks the max-logit letter, generative grading of GSM8K-format and
HumanEval completions, ChatCORE centring, hub-schema fixtures through the real loading path, and the
stage end to end (a missing source skipped, an unavailable task reported)."""
import json
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from doubles import ScriptedModel
from helpers import make_cfg

from nanopipe import paths
from nanopipe.eval import chatcore as chat_eval
from nanopipe.inference.engine import Engine
from nanopipe.model.checkpoint import save_checkpoint
from nanopipe.model.gpt import config_from_depth, create_model
from nanopipe.stage import run_stage
from nanopipe.stages import chat_eval as chat_eval_stage
from nanopipe.tasks import DatasetUnavailableError, HumanEval, Task
from nanopipe.tokenizer import Tokenizer

# hub schema (openai/gsm8k, allenai/ai2_arc, cais/mmlu), a few rows each
GSM8K_TEST = [
    {"question": "Janet has 3 apples and buys 4 more. How many apples does she have?",
     "answer": "Janet has 3+4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "There are 6*5 = <<6*5=30>>30 eggs.\n#### 30"},
]
ARC_TEST = [
    {"id": "a", "question": "Which is a conductor?", "choices": {"text": ["wax", "plastic", "rubber", "iron"],
     "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
    {"id": "b", "question": "Which is renewable?", "choices": {"text": ["coal", "oil", "wood"],
     "label": ["A", "B", "C"]}, "answerKey": "C"},
    {"id": "c", "question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock", "wood", "iron"],
     "label": ["A", "B", "C", "D", "E"]}, "answerKey": "B"},
]
MMLU_TEST = [
    {"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 2},
    {"question": "Red planet?", "subject": "astronomy", "choices": ["Venus", "Jupiter", "Mars", "Saturn"], "answer": 2},
    {"question": "H2O is", "subject": "chemistry", "choices": ["water", "salt", "sugar", "oxygen"], "answer": 0},
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    """Local copies in the hub layout (ARC-Challenge deliberately absent), and a private datasets cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    root = tmp_path / "hf"
    for rel, rows in (("openai/gsm8k/main/test", GSM8K_TEST), ("allenai/ai2_arc/ARC-Easy/test", ARC_TEST),
                      ("cais/mmlu/all/test", MMLU_TEST)):
        path = root / f"{rel}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
    return root


def byte_tokenizer():
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)})


class LetterModel:
    """Categorical double: logits 0 everywhere except, at <|assistant_start|>, `favour(row_ids)` -> a token."""

    def __init__(self, vocab_size, assistant_start, favour):
        self.V, self.ast, self.favour = vocab_size, assistant_start, favour

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, ids):
        logits = torch.zeros(*ids.shape, self.V)
        for b in range(ids.size(0)):
            for t in range(ids.size(1)):
                if ids[b, t] == self.ast:
                    logits[b, t, self.favour(ids[b, :t].tolist())] = 5.0
        return logits


def replying(tok, text):
    return Engine(ScriptedModel(tok.encode(text) + [tok.encode_special("<|assistant_end|>")], tok.get_vocab_size()), tok)


class HintTask(Task):
    """Multiple choice whose user message ends with a hint letter; the key is `answer`."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, i):
        hint, letters, answer = self.rows[i]
        question = "Q" * (i + 1) + hint  # different prompt lengths in one batch
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "letters": letters}

    def evaluate(self, conversation, letter):
        assert letter in conversation["letters"]
        return letter == conversation["messages"][-1]["content"]


def test_categorical_eval_picks_the_max_logit_letter_at_the_answer_position():
    tok = byte_tokenizer()
    ast, user_end = tok.encode_special("<|assistant_start|>"), tok.encode_special("<|user_end|>")
    # the model favours the token just before <|user_end|>: the hint letter
    model = LetterModel(tok.get_vocab_size(), ast, lambda row: row[row.index(user_end) - 1])
    rows = [("C", ["A", "B", "C", "D"], "C"), ("2", ["1", "2", "3"], "2"), ("A", ["A", "B"], "B"),
            ("E", list("ABCDE"), "E"), ("B", ["A", "B", "C", "D"], "B")]
    for batch_size in (1, 2, 3, 8):  # partial last batch, BOS right-padding
        assert chat_eval.run_categorical_eval(HintTask(rows), tok, model, batch_size) == (4, 5)
    assert chat_eval.run_categorical_eval(HintTask(rows), tok, model, 2, max_problems=3) == (2, 3)
    # a letter that is not one token is refused with the reason
    with pytest.raises(ValueError, match="single token"):
        chat_eval.run_categorical_eval(HintTask([("C", ["AB", "C"], "C")]), tok, model, 2)


def test_generative_eval_grades_gsm8k_format_answers(hf_dir):
    tok = byte_tokenizer()
    gsm8k = chat_eval.build_task("GSM8K", str(hf_dir))
    answers = {gsm8k[i]["messages"][-1]["content"][-1]["text"][-2:] for i in range(len(gsm8k))}
    assert answers == {" 7", "30"}  # the fixture rows, through the real loader
    engine = replying(tok, "Janet has 3+4 = 7 apples.\n#### 7")
    assert chat_eval.run_generative_eval(gsm8k, tok, engine, 1, 64, 0.0, None) == (1, 2)
    assert chat_eval.run_generative_eval(gsm8k, tok, replying(tok, "#### 30"), 2, 16, 0.0, None) == (1, 2)
    assert chat_eval.run_generative_eval(gsm8k, tok, replying(tok, "no idea"), 1, 16, 0.0, None) == (0, 2)


def test_generative_eval_runs_humaneval_in_the_sandbox():
    tok = byte_tokenizer()
    task = HumanEval()
    reference = task[0]["messages"][-1]["content"]  # prompt + canonical solution
    right = replying(tok, f"```python\n{reference}\n```")
    assert chat_eval.run_generative_eval(task, tok, right, 1, 2000, 0.0, None, max_problems=1) == (1, 1)
    wrong = replying(tok, f"def {task[0]['entry_point']}(*args):\n    return None\n")
    assert chat_eval.run_generative_eval(task, tok, wrong, 1, 200, 0.0, None, max_problems=1) == (0, 1)


def test_chatcore_centres_on_the_baselines():
    score, used = chat_eval.chatcore({"ARC-Easy": 0.5, "MMLU": 0.25, "GSM8K": 0.1, "SpellingBee": 0.3})
    assert used == ["ARC-Easy", "MMLU", "GSM8K", "SpellingBee"]
    assert score == pytest.approx(((0.5 - 0.25) / 0.75 + 0.0 + 0.1 + 0.3) / 4)
    six = dict.fromkeys(chat_eval.STANDARD_TASKS, 0.25)
    assert chat_eval.chatcore(six)[0] == pytest.approx((0 + 0 + 0 + 0.25 + 0.25 + 0.25) / 6)
    assert chat_eval.chatcore({}) == (None, [])


def test_fixture_datasets_drive_arc_and_mmlu_through_the_hub_loader(hf_dir):
    tok = byte_tokenizer()
    ast = tok.encode_special("<|assistant_start|>")
    always_b = LetterModel(tok.get_vocab_size(), ast, lambda row: ord("B"))
    arc = chat_eval.build_task("ARC-Easy", str(hf_dir))
    mmlu = chat_eval.build_task("MMLU", str(hf_dir))
    assert (arc.eval_type, len(arc), mmlu.eval_type, len(mmlu)) == ("categorical", 3, "categorical", 3)
    # "B" everywhere it is a choice; the 1-4 row has no preference and takes its first letter ("1", wrong)
    assert chat_eval.run_categorical_eval(arc, tok, always_b, 2) == (1, 3)
    assert chat_eval.run_categorical_eval(mmlu, tok, always_b, 2) == (0, 3)
    with pytest.raises(DatasetUnavailableError, match="ARC-Challenge"):
        chat_eval.build_task("ARC-Challenge", str(hf_dir))
    with pytest.raises(ValueError, match="unknown task 'BoolQ'"):
        chat_eval.build_task("BoolQ")


def test_stage_end_to_end_offline(tmp_path, hf_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_sft(tmp_path, ["How many r are in the word strawberry? #### 3", "Multiple Choice question: Which? - A=1 - B=2"])
    tasks = "[ARC-Easy,ARC-Challenge,GSM8K,SpellingBee,Arithmetic]"
    cfg = make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "runtime.threads=1",
                   f"chat_eval.tasks={tasks}", "chat_eval.sources=[sft,rl]", "chat_eval.max_problems=2",
                   "chat_eval.max_new_tokens=8", f"chat_eval.dataset_dir={hf_dir}")
    run_stage(chat_eval_stage, cfg)

    m = json.loads((tmp_path / "metrics/chat_eval.json").read_text())
    assert "ARC-Challenge" in m["unavailable"] and "rl" in m and "not found" in m["rl"]["skipped"]
    sft = m["sft"]
    assert sft["step"] == 7 and sft["ARC-Challenge"] is None
    for name in ("ARC-Easy", "GSM8K", "SpellingBee", "Arithmetic"):
        assert 0.0 <= sft[name] <= 1.0 and sft["counts"][name]["total"] == 2
    assert sft["ChatCORE_tasks"] == "ARC-Easy,GSM8K,SpellingBee,Arithmetic" and sft["ChatCORE_complete"] is False
    want, _ = chat_eval.chatcore({k: sft[k] for k in ("ARC-Easy", "GSM8K", "SpellingBee", "Arithmetic")})
    assert sft["ChatCORE"] == pytest.approx(want)
    section = (tmp_path / "metrics/sections/chat_eval.md").read_text()
    assert "ARC-Challenge: unavailable" in section and "Skipped" in section and "not the six standard tasks" in section


def _tiny_sft(tmp_path, texts=("def f(x):\n    return x + 1\n", "How many r are in the word strawberry? #### 3")):
    """A tokenizer fitted on `texts` and an untrained depth-1 model saved as models/sft (step 7)."""
    tok = Tokenizer.train_from_iterator(iter(list(texts) * 50), 300)
    tok.save(paths.TOKENIZER)
    torch.manual_seed(0)
    model = create_model(config_from_depth(1, tok.get_vocab_size(), 64, 64, 64, "L"), "cpu")
    save_checkpoint(paths.CHECKPOINTS["sft"], model, None, {"step": 7}, save_rng=False)


def _humaneval_cfg(*overrides):
    return make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "runtime.threads=1",
                    "chat_eval.tasks=[HumanEval]", "chat_eval.sources=[sft]", "chat_eval.max_problems=1",
                    "chat_eval.max_new_tokens=4", *overrides)


def test_stage_records_the_isolation_of_model_written_code(tmp_path, monkeypatch):
    import os

    from nanopipe import sandbox
    try:
        sandbox.resolve_isolation("auto")
        have_bwrap = True
    except sandbox.SandboxUnavailableError:
        if os.environ.get("CI"):
            pytest.fail("CI must run the OS sandbox: install bubblewrap (.ci/run does)")
        have_bwrap = False
    monkeypatch.chdir(tmp_path)
    _tiny_sft(tmp_path)
    if have_bwrap:
        run_stage(chat_eval_stage, _humaneval_cfg())
        m = json.loads((tmp_path / "metrics/chat_eval.json").read_text())
        assert m["sandbox"] == "auto" and m["sft"]["counts"]["HumanEval"]["isolation"] == "bwrap"
        assert m["sft"]["counts"]["HumanEval"]["total"] == 1
        assert "ran under: bwrap" in (tmp_path / "metrics/sections/chat_eval.md").read_text()
    # no bubblewrap: auto runs none of the model's code and says why (the chain still finishes); bwrap
    # asked for by name is an error; the opt-in runs the guard and says so
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    sandbox._bwrap_problem.cache_clear()
    try:
        run_stage(chat_eval_stage, _humaneval_cfg())
        m = json.loads((tmp_path / "metrics/chat_eval.json").read_text())
        assert re.search(r"not run, no OS sandbox: chat_eval\.sandbox=auto.*apt-get install bubblewrap",
                         m["unavailable"]["HumanEval"])
        assert "HumanEval" not in m["sft"].get("counts", {})
        with pytest.raises(sandbox.SandboxUnavailableError, match=r"chat_eval\.sandbox=bwrap.*apt-get install bubblewrap"):
            run_stage(chat_eval_stage, _humaneval_cfg("chat_eval.sandbox=bwrap"))
        run_stage(chat_eval_stage, _humaneval_cfg("chat_eval.sandbox=in_process"))
    finally:
        sandbox._bwrap_problem.cache_clear()
    m = json.loads((tmp_path / "metrics/chat_eval.json").read_text())
    assert m["sandbox"] == "in_process" and m["sft"]["counts"]["HumanEval"]["isolation"] == "in_process"


def test_sandbox_setting_is_checked():
    from nanopipe.config import ConfigError
    with pytest.raises(ConfigError, match=r"`chat_eval\.sandbox`"):
        make_cfg("chat_eval.sandbox=docker")
    assert make_cfg().chat_eval.sandbox == "auto"
