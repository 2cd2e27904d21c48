"""A tiny tokenizer (vocab 512) trained once per session on a few stdlib sources plus
multilingual text, so that some merges hold partial UTF-8 characters."""
import pathlib
import sysconfig

import pytest

from nanopipe.tokenizer import Tokenizer

VOCAB = 512

MULTILINGUAL = (
    "你好世界，今天天气很好。我们一起学习机器学习和自然语言处理。" * 20
    + "정직한 사실 위에, 공정한 시선을 더하다. 한국 사회 전반의 주요 이슈를 다루는 신문사입니다. " * 20
    + "Grüße aus München! Ça va très bien, merci. Добрый день, как дела? " * 20
    + "🌍🚀🎉 emoji 👨‍👩‍👧‍👦 family " * 30
)


def small_corpus() -> list[str]:
    std = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = ["textwrap.py", "json/decoder.py", "json/encoder.py", "bisect.py", "colorsys.py"]
    return [(std / f).read_text(encoding="utf-8") for f in files] + [MULTILINGUAL]


@pytest.fixture(scope="session")
def corpus():
    return small_corpus()


@pytest.fixture(scope="session")
def tok(corpus):
    return Tokenizer.train_from_iterator(iter(corpus), VOCAB)
