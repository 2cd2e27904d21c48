"""The offline tasks: SpellingBee, SimpleSpelling, Arithmetic, CustomJSON + identity set, HumanEval."""
import importlib.util
import json

import pytest

from nanopipe.tasks import (
    IDENTITY_PATH,
    Arithmetic,
    CustomJSON,
    HumanEval,
    SimpleSpelling,
    SpellingBee,
    TaskMixture,
    check_conversation,
)
from nanopipe.tasks.arithmetic import calculator_output
from nanopipe.tasks.humaneval import extract_imports, extract_program
from nanopipe.tasks.spellingbee import USER_MSG_TEMPLATES, load_words


def tool_calls(conv):
    parts = conv["messages"][-1]["content"]
    return [(a["text"], b["text"]) for a, b in zip(parts, parts[1:]) if a["type"] == "python"]


# ----------------------------------------------------------------------------- spelling

def test_word_list_is_offline_lowercase_and_sorted():
    words = load_words()
    assert len(words) > 200_000
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words[:1000] + words[-1000:])
    assert list(words[:1000]) == sorted(words[:1000])


def test_spellingbee_deterministic_valid_and_correct():
    train, test = SpellingBee(size=50, split="train"), SpellingBee(size=50, split="test")
    assert len(USER_MSG_TEMPLATES) == 51 and train.eval_type == "generative"
    assert train[7] == SpellingBee(size=50, split="train")[7]  # same index -> same conversation
    assert [c["messages"][0]["content"] for c in train] != [c["messages"][0]["content"] for c in test]
    for conv in train:
        check_conversation(conv)
        parts = conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        (expr, output), = tool_calls(conv)
        word, letter = expr.split("'")[1], expr.split("'")[3]
        count = word.count(letter)
        assert output == str(count) and eval(expr) == count  # the tool call computes the true count
        assert f"This gives us {count}." in parts[0]["text"]  # and so does the manual trace
        assert parts[-1]["text"].endswith(f"#### {count}")
        assert train.evaluate(conv, f"I count them.\n\n#### {count}") == 1
        assert train.evaluate(conv, f"#### {count + 1}") == 0
        assert train.reward(conv, f"#### {count}") == 1.0


def test_spellingbee_rng_call_order_is_nanochat_s():
    # re-derive example 0 with nanochat's exact sequence of rng calls
    import random
    task = SpellingBee(size=1)
    rng = random.Random(0)
    word = rng.choice(task.words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    assert task[0]["messages"][1]["content"][2]["text"] == f"'{word}'.count('{letter}')"


def test_simple_spelling():
    task = SimpleSpelling(size=20, split="train")
    assert task[3] == SimpleSpelling(size=20)[3]
    assert task[3] != SimpleSpelling(size=20, split="test")[3]
    for conv in task:
        check_conversation(conv)
        word = conv["messages"][0]["content"].removeprefix("Spell the word: ")
        assert conv["messages"][1]["content"] == f"{word}:{','.join(word)}"
    with pytest.raises(NotImplementedError):
        task.evaluate(task[0], "x")
    with pytest.raises(ValueError, match="split"):
        SimpleSpelling(split="val")


def test_word_list_from_a_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("apple\n\nbanana\n")
    task = SimpleSpelling(size=5, words_path=str(path))
    assert {c["messages"][0]["content"] for c in task} <= {"Spell the word: apple", "Spell the word: banana"}


# ----------------------------------------------------------------------------- arithmetic

def test_arithmetic_problems_are_consistent_and_graded():
    task = Arithmetic(size=60, split="train", max_steps=4)
    assert task[5] == Arithmetic(size=60, max_steps=4)[5]
    assert task[5] != Arithmetic(size=60, split="test", max_steps=4)[5]
    for conv in task:
        check_conversation(conv)
        calls = tool_calls(conv)
        assert 1 <= len(calls) <= 4
        for expr, output in calls:
            assert set(expr) <= set("0123456789+-*/") and output == calculator_output(expr)
        answer = conv["answer"]
        assert isinstance(answer, int) and answer >= 0
        assert float(calls[-1][1]) == answer  # the last computation is the answer
        assert conv["messages"][1]["content"][-1]["text"].endswith(f"#### {answer}")
        assert task.evaluate(conv, f"so\n#### {answer}") == 1 and task.evaluate(conv, f"#### {answer + 1}") == 0
        assert task.reward(conv, f"#### {answer}") == 1.0


def test_arithmetic_difficulty_knobs():
    easy = Arithmetic(size=30, min_steps=1, max_steps=1, max_number=9, ops="+")
    for conv in easy:
        (expr, out), = tool_calls(conv)
        a, b = map(int, expr.split("+"))
        assert a <= 9 and b <= 9
    hard = Arithmetic(size=30, min_steps=5, max_steps=5, ops="+-*/")
    assert all(len(tool_calls(c)) == 5 for c in hard)
    with pytest.raises(ValueError, match="ops"):
        Arithmetic(ops="-/")
    with pytest.raises(ValueError, match="steps"):
        Arithmetic(min_steps=3, max_steps=2)


# ----------------------------------------------------------------------------- CustomJSON + identity

def test_identity_set_is_valid_and_about_nanopipe():
    task = CustomJSON(IDENTITY_PATH)
    assert 60 <= len(task) <= 100
    text = IDENTITY_PATH.read_text()
    for needle in ("nanopipe", "nanochat", "Karpathy", "DVC", "Hydra", "MLflow", "CPU", "internet", "mistakes"):
        assert needle in text, needle
    for conv in task:
        check_conversation(conv)
    assert len({json.dumps(c["messages"]) for c in task}) == len(task)  # no duplicates


def test_identity_set_is_reproducible_from_its_script():
    script = IDENTITY_PATH.parent / "make_identity.py"
    spec = importlib.util.spec_from_file_location("make_identity", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render(module.make_conversations()) == IDENTITY_PATH.read_text(encoding="utf-8")


def test_customjson_missing_file_warns_and_is_empty(tmp_path, capsys):
    task = CustomJSON(tmp_path / "nope.jsonl")
    assert len(task) == 0
    out = capsys.readouterr().out
    assert "-" * 80 in out and "does not exist" in out and "make_identity.py" in out and "curl -L -o" in out


def test_customjson_rejects_malformed_lines(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert len(CustomJSON(path)) == 2 and CustomJSON(path)[1] == {"messages": good}
    for bad, match in [({"messages": good}, "list"), (good[:1], "at least 2"),
                       ([good[1], good[0]], "expected 'user'"), ([good[0], {"role": "assistant"}], "content")]:
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=match) as e:
            CustomJSON(path)
        assert f"{path}:2" in str(e.value)


def test_embedded_sft_mixture_builds_offline():
    mix = TaskMixture([CustomJSON(), CustomJSON(), SimpleSpelling(size=50), SpellingBee(size=20), Arithmetic(size=20)])
    assert len(mix) == 2 * len(CustomJSON()) + 90
    for i in range(0, len(mix), 7):
        check_conversation(mix[i])


# ----------------------------------------------------------------------------- HumanEval

def test_humaneval_helpers():
    prompt = "from typing import List\nimport math\n\n# a comment\n\ndef f(x):\n    import os\n"
    assert extract_imports(prompt) == "from typing import List\nimport math"
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nbye") == "def f():\n    return 1"
    assert extract_program("```\ndef g(): pass\n```") == "def g(): pass"
    assert extract_program("  def h(): pass  \n") == "def h(): pass"
    assert extract_program("```python\na = 1\n```\n```python\nb = 2\n```") == "a = 1"  # the first block


def test_humaneval_problems_order_and_conversation():
    task = HumanEval()
    assert len(task) == 164 and task.eval_type == "generative"
    assert task[0]["task_id"] == "HumanEval/52"  # the hub dataset's shuffle(seed=42) order
    conv = task[0]
    check_conversation(conv)
    assert conv["messages"][1]["content"].startswith(conv["messages"][0]["content"] + "\n")
    assert conv["entry_point"] and "def check" in conv["test"]


def test_humaneval_grades_in_the_sandbox():
    task = HumanEval(timeout=1.0)
    conv = next(c for c in task if c["task_id"] == "HumanEval/0")  # has_close_elements, imports List
    reference = conv["messages"][1]["content"]
    assert task.evaluate(conv, f"Sure:\n```python\n{reference}\n```") is True
    broken = reference.replace("return True", "return False")
    assert task.evaluate(conv, broken) is False
    assert task.evaluate(conv, "def has_close_elements(numbers, threshold):\n    while True: pass") is False
    assert task.evaluate(conv, "this is not python") is False


def test_humaneval_isolation_is_recorded_and_refused_without_bwrap(monkeypatch, tmp_path):
    from nanopipe import sandbox
    task = HumanEval(timeout=2.0, sandbox="in_process")
    conv = task[0]
    assert task.isolation == "in_process" and task.isolations_used == set()
    assert task.evaluate(conv, conv["messages"][1]["content"]) is True
    assert task.isolations_used == {"in_process"}
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    sandbox._bwrap_problem.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailableError, match="apt-get install bubblewrap"):
            HumanEval()  # refused when built, before any program could run
    finally:
        sandbox._bwrap_problem.cache_clear()


@pytest.mark.slow
def test_every_humaneval_reference_solution_passes():
    task = HumanEval(timeout=5.0)
    failed = [c["task_id"] for c in task if not task.evaluate(c, c["messages"][1]["content"])]
    assert failed == []
