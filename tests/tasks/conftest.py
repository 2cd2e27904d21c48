"""Small local copies of the remote datasets, in the hub's file layout and column schema.

The remote tasks load them through the same code path as real local copies
(`dataset_dir=<root>`, files at <root>/<org>/<name>/<config>/<split>-00000-of-00001.parquet).
"""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

GSM8K_TRAIN = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
               "in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
    {"question": "A shop sells 1234 pens a day. How many pens does it sell in a day?",
     "answer": "It sells 1,234 pens.\n#### 1,234"},
    {"question": "Tom owes 5 dollars and pays 8. What is his balance?",
     "answer": "His balance is 8-5 = <<8-5=3>>3 dollars.\n#### 3"},
]
GSM8K_TEST = [
    {"question": "Janet has 3 apples and buys 4 more. How many apples does she have?",
     "answer": "Janet has 3+4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?",
     "answer": "There are 6*5 = <<6*5=30>>30 eggs.\n#### 30"},
]

MMLU_TEST = [
    {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1},
    {"question": "Which planet is known as the Red Planet?", "subject": "astronomy",
     "choices": ["Venus", "Jupiter", "Mars", "Saturn"], "answer": 2},
    {"question": "H2O is the formula of", "subject": "high_school_chemistry",
     "choices": ["water", "salt", "sugar", "oxygen"], "answer": 0},
    {"question": "The derivative of x^2 is", "subject": "college_mathematics",
     "choices": ["x", "2", "x^2", "2x"], "answer": 3},
    {"question": "Who wrote Hamlet?", "subject": "high_school_european_history",
     "choices": ["Shakespeare", "Dickens", "Austen", "Homer"], "answer": 0},
]
MMLU_AUX = [
    {"question": "A cat is a", "subject": "", "choices": ["plant", "mammal", "rock", "fish"], "answer": 1},
    {"question": "Ice is frozen", "subject": "", "choices": ["air", "fire", "water", "sand"], "answer": 2},
    {"question": "The sun rises in the", "subject": "", "choices": ["east", "west", "north", "south"], "answer": 0},
]

ARC_TEST = [
    {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a meteorite "
     "impact. Which is the most likely effect of this increase in rotation?",
     "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                          "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"id": "NYSEDREGENTS_2015_4_8", "question": "Which object is the best conductor of electricity?",
     "choices": {"text": ["a wax crayon", "a plastic spoon", "a rubber eraser", "an iron nail"],
                 "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
    {"id": "Mercury_SC_400987", "question": "Which of these is a renewable resource?",
     "choices": {"text": ["coal", "oil", "natural gas", "wood", "uranium"], "label": ["A", "B", "C", "D", "E"]},
     "answerKey": "D"},
]

SMOLTALK_TRAIN = [
    {"messages": [{"content": "Hi, can you help me?", "role": "user"},
                  {"content": "Of course! What do you need?", "role": "assistant"}], "source": "everyday-conversations"},
    {"messages": [{"content": "You are a helpful assistant.", "role": "system"},
                  {"content": "Name a color.", "role": "user"},
                  {"content": "Blue.", "role": "assistant"},
                  {"content": "Another?", "role": "user"},
                  {"content": "Green.", "role": "assistant"}], "source": "smol-magpie-ultra"},
    {"messages": [{"content": "Summarize: cats sleep a lot.", "role": "user"},
                  {"content": "Cats spend much of the day asleep.", "role": "assistant"}], "source": "smol-summarize"},
]
SMOLTALK_BAD = [
    {"messages": [{"content": "hello", "role": "user"}, {"content": "hello again", "role": "user"}], "source": "x"},
]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A dataset_dir holding hub-layout local copies of GSM8K, MMLU, ARC and SmolTalk."""
    root = tmp_path_factory.mktemp("hf_datasets")
    shard = "-00000-of-00001.parquet"
    write_parquet(root / "openai/gsm8k/main" / f"train{shard}", GSM8K_TRAIN)
    write_parquet(root / "openai/gsm8k/main" / f"test{shard}", GSM8K_TEST)
    write_parquet(root / "cais/mmlu/all" / f"test{shard}", MMLU_TEST)
    # auxiliary_train nests each row under a `train` column (as on the hub)
    write_parquet(root / "cais/mmlu/auxiliary_train" / f"train{shard}", [{"train": r} for r in MMLU_AUX])
    write_parquet(root / "allenai/ai2_arc/ARC-Easy" / f"test{shard}", ARC_TEST)
    write_parquet(root / "HuggingFaceTB/smol-smoltalk/data" / f"train{shard}", SMOLTALK_TRAIN)
    write_parquet(root / "HuggingFaceTB/smol-smoltalk/data" / f"test{shard}", SMOLTALK_BAD)
    return root


@pytest.fixture(scope="session")
def rows():
    """The rows written into hf_dir, by dataset (tests compare task output against them)."""
    return {"gsm8k_train": GSM8K_TRAIN, "gsm8k_test": GSM8K_TEST, "mmlu_test": MMLU_TEST, "mmlu_aux": MMLU_AUX,
            "arc_test": ARC_TEST, "smoltalk_train": SMOLTALK_TRAIN}


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    """A private datasets cache, so tests never touch ~/.cache/huggingface."""
    return str(tmp_path_factory.mktemp("hf_cache"))
