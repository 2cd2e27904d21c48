"""GSM8K, MMLU, ARC and SmolTalk loaded from local copies in the hub layout (the hub is never
contacted), plus the offline error at the hub boundary."""
import json

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanopipe.tasks import ARC, GSM8K, MMLU, DatasetUnavailableError, SmolTalk, check_conversation
from nanopipe.tasks.common import load_hf_dataset
from nanopipe.tasks.gsm8k import answer_to_parts, extract_answer


def local(cls, *args, hf_dir, hf_cache, **kwargs):
    return cls(*args, dataset_dir=str(hf_dir), cache_dir=hf_cache, **kwargs)


# ----------------------------------------------------------------------------- GSM8K

def test_gsm8k_parts_parsing():
    parts = answer_to_parts("a <<48/2=24>>24 b <<x=y=z>> c <<noeq>>d\n#### 72")
    assert parts == [
        {"type": "text", "text": "a "},
        {"type": "python", "text": "48/2"}, {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 b "},
        {"type": "python", "text": "x=y"}, {"type": "python_output", "text": "z"},  # split on the last '='
        {"type": "text", "text": " c "},
        {"type": "python", "text": "noeq"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": "d\n#### 72"},
    ]


def test_gsm8k_answer_extraction():
    assert extract_answer("so\n#### 1,234") == "1234"
    assert extract_answer("#### -5") == "-5"
    assert extract_answer("#### 2.50 dollars") == "2.50"
    assert extract_answer("the answer is 72") is None
    assert extract_answer("#### 7 then #### 8") == "7"


def test_gsm8k_loads_renders_and_grades(hf_dir, hf_cache, rows):
    GSM8K_TRAIN = rows["gsm8k_train"]
    task = local(GSM8K, "main", "train", hf_dir=hf_dir, hf_cache=hf_cache)
    assert task.eval_type == "generative" and len(task) == len(GSM8K_TRAIN)
    questions = {r["question"]: r for r in GSM8K_TRAIN}
    for conv in task:
        check_conversation(conv)
        row = questions[conv["messages"][0]["content"]]
        parts = conv["messages"][1]["content"]
        assert parts == answer_to_parts(row["answer"])
        ref = extract_answer(row["answer"])
        assert task.evaluate(conv, f"blah blah\n#### {ref}") == 1
        assert task.evaluate(conv, "#### 999999") == 0
        assert task.evaluate(conv, "no marker") == 0
        assert task.reward(conv, f"#### {ref}") == 1.0 and isinstance(task.reward(conv, "x"), float)
    natalia = next(c for c in task if "Natalia" in c["messages"][0]["content"])
    assert [p["type"] for p in natalia["messages"][1]["content"]] == [
        "text", "python", "python_output", "text", "python", "python_output", "text"]
    assert natalia["messages"][1]["content"][1:3] == [{"type": "python", "text": "48/2"},
                                                      {"type": "python_output", "text": "24"}]
    # comma in the reference: graded after comma stripping; 72.0 != 72 (string equality, as nanochat)
    pens = next(c for c in task if "pens" in c["messages"][0]["content"])
    assert task.evaluate(pens, "#### 1234") == 1 and task.evaluate(pens, "#### 1,234") == 1
    assert task.evaluate(natalia, "#### 72.0") == 0


def test_gsm8k_order_is_the_hub_shuffle_and_slicing_matches(hf_dir, hf_cache, rows):
    GSM8K_TEST = rows["gsm8k_test"]
    task = local(GSM8K, "main", "test", hf_dir=hf_dir, hf_cache=hf_cache)
    expected = datasets.Dataset.from_list(GSM8K_TEST).shuffle(seed=42)
    assert [c["messages"][0]["content"] for c in task] == expected["question"]
    sliced = local(GSM8K, "main", "test", hf_dir=hf_dir, hf_cache=hf_cache, start=1, stop=2)
    assert len(sliced) == 1 and sliced[0] == task[1]


def test_gsm8k_argument_checks():
    with pytest.raises(ValueError, match="subset"):
        GSM8K("other", "train")
    with pytest.raises(ValueError, match="split"):
        GSM8K("main", "validation")


# ----------------------------------------------------------------------------- MMLU

def test_mmlu_test_split_letters_and_grading(hf_dir, hf_cache, rows):
    MMLU_TEST = rows["mmlu_test"]
    task = local(MMLU, "all", "test", hf_dir=hf_dir, hf_cache=hf_cache)
    assert task.eval_type == "categorical" and len(task) == len(MMLU_TEST)
    by_q = {r["question"]: r for r in MMLU_TEST}
    for conv in task:
        check_conversation(conv)
        user = conv["messages"][0]["content"]
        row = next(r for q, r in by_q.items() if f"question: {q}\n" in user)
        assert user.endswith("Respond only with the letter of the correct answer.")
        assert f"- {row['choices'][row['answer']]}={'ABCD'[row['answer']]}\n" in user
        assert conv["letters"] == ("A", "B", "C", "D") and conv["subject"] == row["subject"]
        right = "ABCD"[row["answer"]]
        wrong = "ABCD"[(row["answer"] + 1) % 4]
        assert conv["messages"][1]["content"] == right
        assert task.evaluate(conv, right) is True and task.evaluate(conv, wrong) is False
    with pytest.raises(ValueError, match="one of"):
        task.evaluate(task[0], "E")


def test_mmlu_auxiliary_train_rows_are_unwrapped(hf_dir, hf_cache, rows):
    MMLU_AUX = rows["mmlu_aux"]
    task = local(MMLU, "auxiliary_train", "train", hf_dir=hf_dir, hf_cache=hf_cache)
    assert len(task) == len(MMLU_AUX)
    answers = {r["question"]: "ABCD"[r["answer"]] for r in MMLU_AUX}
    for conv in task:
        check_conversation(conv)
        q = conv["messages"][0]["content"].split("\n")[0].removeprefix("Multiple Choice question: ")
        assert conv["messages"][1]["content"] == answers[q]
    sliced = local(MMLU, "auxiliary_train", "train", hf_dir=hf_dir, hf_cache=hf_cache, start=1, stop=3)
    assert len(sliced) == 2 and sliced[0] == task[1]  # nanochat's common.py smoke test
    with pytest.raises(ValueError, match="auxiliary_train"):
        MMLU("auxiliary_train", "test")


# ----------------------------------------------------------------------------- ARC

def test_arc_uses_dataset_letters_and_grades(hf_dir, hf_cache, rows):
    ARC_TEST = rows["arc_test"]
    task = local(ARC, "ARC-Easy", "test", hf_dir=hf_dir, hf_cache=hf_cache)
    assert task.eval_type == "categorical" and len(task) == len(ARC_TEST)
    by_key = {r["question"]: r for r in ARC_TEST}
    seen_labels = set()
    for conv in task:
        check_conversation(conv)
        row = next(r for q, r in by_key.items() if q in conv["messages"][0]["content"])
        assert conv["letters"] == row["choices"]["label"]
        seen_labels.add(tuple(conv["letters"]))
        assert conv["messages"][1]["content"] == row["answerKey"]
        wrong = next(letter for letter in conv["letters"] if letter != row["answerKey"])
        assert task.evaluate(conv, row["answerKey"]) is True and task.evaluate(conv, wrong) is False
        with pytest.raises(ValueError, match="one of"):
            task.evaluate(conv, "Z")
    assert ("1", "2", "3", "4") in seen_labels and ("A", "B", "C", "D", "E") in seen_labels
    with pytest.raises(ValueError, match="subset"):
        ARC("ARC-Hard", "test")


# ----------------------------------------------------------------------------- SmolTalk

def test_smoltalk_keeps_system_message_and_validates(hf_dir, hf_cache):
    task = local(SmolTalk, "train", hf_dir=hf_dir, hf_cache=hf_cache)
    assert len(task) == 3
    convs = list(task)
    for conv in convs:
        check_conversation(conv, allow_system=True)
    assert sum(c["messages"][0]["role"] == "system" for c in convs) == 1
    with pytest.raises(NotImplementedError):
        task.eval_type
    bad = local(SmolTalk, "test", hf_dir=hf_dir, hf_cache=hf_cache)
    with pytest.raises(ValueError, match="role 'user', expected 'assistant'"):
        bad[0]


# ----------------------------------------------------------------------------- local layouts, offline errors

def test_other_local_layouts_jsonl_and_save_to_disk(tmp_path, hf_cache, rows):
    GSM8K_TEST = rows["gsm8k_test"]
    jsonl_root = tmp_path / "j"
    (jsonl_root / "openai/gsm8k/main").mkdir(parents=True)
    (jsonl_root / "openai/gsm8k/main/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_TEST))
    disk_root = tmp_path / "d"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(GSM8K_TEST)}).save_to_disk(str(disk_root / "openai/gsm8k/main"))
    a = GSM8K("main", "test", dataset_dir=str(jsonl_root), cache_dir=hf_cache)
    b = GSM8K("main", "test", dataset_dir=str(disk_root), cache_dir=hf_cache)
    assert list(a) == list(b) and len(a) == 2


def test_missing_local_copy_names_the_path(tmp_path, rows):
    (tmp_path / "openai/gsm8k/main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows["gsm8k_train"]), tmp_path / "openai/gsm8k/main/train-00000-of-00001.parquet")
    with pytest.raises(DatasetUnavailableError) as e:
        GSM8K("main", "test", dataset_dir=str(tmp_path))
    msg = str(e.value)
    assert "openai/gsm8k" in msg and str(tmp_path / "openai/gsm8k") in msg and "hf download" in msg


def test_offline_hub_error_names_dataset_and_cache(tmp_path, monkeypatch):
    # the hub boundary: put huggingface_hub/datasets in offline mode, with an empty cache
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = str(tmp_path / "empty_cache")
    with pytest.raises(DatasetUnavailableError) as e:
        load_hf_dataset("openai/gsm8k", "main", "test", cache_dir=cache)
    msg = str(e.value)
    assert "openai/gsm8k" in msg and "'main'" in msg and "'test'" in msg
    assert cache in msg and "HF_DATASETS_CACHE" in msg and "HF_HOME" in msg and "dataset_dir" in msg
    with pytest.raises(DatasetUnavailableError, match="cais/mmlu"):
        MMLU("all", "test", cache_dir=cache)
