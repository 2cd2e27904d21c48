"""Synthetic spelling tasks: count a letter in a word (SpellingBee) and spell a word (SimpleSpelling).

Small models see tokens, not letters; these teach them to spell a word out, count by hand,
and double-check with the calculator tool. nanochat downloads dwyl's words_alpha.txt; we use
the word lists shipped in the `english-words` package (web2 + gcide, lowercase a-z only,
sorted), so the tasks work offline. Pass `words_path` to use a words_alpha.txt-style file.
"""
import functools
import random
import re

from nanopipe.tasks.common import SyntheticTask
from nanopipe.tasks.gsm8k import extract_answer, grade_final_answer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")  # same as GSM8K's; extract_answer is shared

# the order matters: rng.choice over this list must reproduce nanochat's examples
USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
]


@functools.lru_cache(maxsize=4)
def load_words(words_path=None):
    """The word list as a tuple: lowercase a-z words, from `words_path` (one per line) or `english-words`."""
    if words_path is not None:
        with open(words_path, "r", encoding="utf-8") as f:
            words = [line.strip() for line in f]
        words = [w for w in words if w]
        if not words:
            raise ValueError(f"{words_path}: the word list is empty")
        return tuple(words)
    try:
        from english_words import get_english_words_set
    except ImportError as e:
        raise ImportError("SpellingBee needs the `english-words` package (pip install english-words) "
                          "or a words_path to a one-word-per-line file") from e
    words = get_english_words_set(["web2", "gcide"], alpha=True, lower=True)
    # alpha=True keeps digits ("10th"); keep letters only, and sort: a set has no stable order
    return tuple(sorted(w for w in words if re.fullmatch(r"[a-z]+", w)))


class SpellingBee(SyntheticTask):
    """'How many r are in strawberry?' answered by spelling, counting, a Python check and `#### n`."""

    def __init__(self, size=1000, split="train", words_path=None, **kwargs):
        super().__init__(size, split, **kwargs)
        self.words = load_words(words_path)  # file order, not shuffled (nanochat)

    def get_example(self, index):
        rng = self.example_rng(index)
        # the order of the rng calls below is part of the data definition: do not reorder
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        quote_options = ["", "'", '"']
        letter_quote = rng.choice(quote_options)
        word_quote = rng.choice(quote_options)
        user_msg = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            user_msg += "?"  # even after a template's own '?' (nanochat)

        manual_text = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n"
                       f"First spell the word out:\n{word}:{','.join(word)}\nThen count the occurrences of '{letter}':\n")
        running_count = 0
        for i, char in enumerate(word, 1):
            if char == letter:
                running_count += 1
                manual_text += f"{i}:{char} hit! count={running_count}\n"
            else:
                manual_text += f"{i}:{char}\n"
        manual_text += f"\nThis gives us {running_count}."
        assistant_parts = [
            {"type": "text", "text": manual_text},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        messages = [{"role": "user", "content": user_msg}, {"role": "assistant", "content": assistant_parts}]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        return grade_final_answer(conversation, assistant_response)

    def reward(self, conversation, assistant_response):
        return float(self.evaluate(conversation, assistant_response))


class SimpleSpelling(SyntheticTask):
    """'Spell the word: apple' -> 'apple:a,p,p,l,e'. Training only (no evaluate)."""

    def __init__(self, size=1000, split="train", words_path=None, **kwargs):
        super().__init__(size, split, **kwargs)
        words = list(load_words(words_path))
        random.Random(42).shuffle(words)
        self.words = words

    def get_example(self, index):
        rng = self.example_rng(index)
        word = rng.choice(self.words)
        messages = [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]
        return {"messages": messages}


if __name__ == "__main__":
    task = SpellingBee()
    for i in range(10):
        ex = task.get_example(i)
        print("=" * 100)
        print(ex["messages"][0]["content"])
        print("-" * 100)
        for part in ex["messages"][1]["content"]:
            if part["type"] == "text":
                print(part["text"], end="")
            elif part["type"] == "python":
                print(f"<<{part['text']}=", end="")
            elif part["type"] == "python_output":
                print(f"{part['text']}>>", end="")
        print()
    print("=" * 100)
    print(f"{len(task.words)} words; extract_answer('#### 3') = {extract_answer('#### 3')}")
