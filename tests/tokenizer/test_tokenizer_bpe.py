"""Byte-level BPE: round trips, specials, encode options, persistence, token_bytes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import nanopipe
from nanopipe.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, load_token_bytes, load_tokenizer
from nanopipe.tokenizer.bpe import TOKEN_BYTES_FILE, TOKENIZER_FILE

VOCAB = 512  # the session tokenizer's size (conftest.py)

ADVERSARIAL = [
    "",
    "a",
    "Hello world! This is a test.\nNumbers: 123, 4567, 89\nContractions: I'm, you're, it's",
    "你好世界 🌍",  # CJK + emoji: multi-byte UTF-8 split across byte-level merges
    "정직한 사실 위에, 공정한 시선을 더하다",
    "👨‍👩‍👧‍👦🏳️‍🌈👍🏽",  # ZWJ sequences, variation selectors, skin tone modifiers
    "e\u0301 a\u0308 \ufeffBOM \u200b zero-width \U0001d518\U0001d52b",  # combining marks, astral plane
    "\x00\x01\x02\x07\x1b[31m\x7f\t\r\n\x0b\x0c",  # control characters
    "\ue000\uffff\U0010ffff",  # private use, noncharacters
    "a" * 20000,  # very long run of one char
    " " * 5000 + "\n" * 3000,
    "🌍" * 3000,
    "1234567890" * 200,
    "<|bos|><|user_start|>not special<|assistant_end|>",
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_roundtrip_batch_matches_single(tok):
    rows = tok.encode(ADVERSARIAL, num_threads=2)
    assert rows == [tok.encode(t) for t in ADVERSARIAL]
    assert [tok.decode(r) for r in rows] == ADVERSARIAL
    assert tok.encode([]) == []


@pytest.mark.parametrize("text", ["\ud800", "ab\udfffcd", "ok 🌍 \udc80"])
def test_lone_surrogates_rejected(tok, text):
    with pytest.raises(ValueError, match="surrogate") as e:
        tok.encode(text)
    assert f"index {text.index(next(c for c in text if 0xD800 <= ord(c) <= 0xDFFF))}" in str(e.value)
    with pytest.raises(ValueError, match=r"list item 1.*surrogate"):
        tok.encode(["fine", text], num_threads=2)


def test_specials_are_last_ids_in_order(tok):
    assert tok.get_vocab_size() == VOCAB
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - 9, VOCAB))
    assert tok.get_bos_token_id() == ids[0]
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tok.id_to_token(ids[3]) == "<|assistant_start|>"
    with pytest.raises(ValueError, match="unknown special token 'a'.*<\\|bos\\|>"):
        tok.encode_special("a")  # a plain token is not a special one


def test_special_text_never_parsed_as_special(tok):
    text = "".join(SPECIAL_TOKENS) + " <|bos|> text"
    ids = tok.encode(text)
    assert not set(ids) & set(range(VOCAB - 9, VOCAB))
    assert tok.decode(ids) == text
    for row in tok.encode([text, "<|output_end|>"]):
        assert max(row) < VOCAB - 9


def test_prepend_append(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    plain = tok.encode("hi there")
    assert tok.encode("hi there", prepend="<|bos|>", append="<|assistant_end|>") == [bos, *plain, end]
    assert tok.encode("hi there", prepend=bos, append=end) == [bos, *plain, end]
    assert tok("hi there", prepend=bos) == [bos, *plain]
    assert tok.encode(["a", "b"], prepend=bos) == [[bos, *tok.encode("a")], [bos, *tok.encode("b")]]
    assert tok.encode("", prepend=bos, append=end) == [bos, end]
    with pytest.raises(ValueError, match="prepend"):
        tok.encode("x", prepend=VOCAB)
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("x", append="<|eos|>")


@pytest.mark.parametrize("bad", [b"bytes", 3, None, ("a", "b")])
def test_encode_rejects_other_types(tok, bad):
    with pytest.raises(ValueError, match="expected str or list"):
        tok.encode(bad)
    with pytest.raises(ValueError, match="list item 1 is"):
        tok.encode(["ok", 5])


def test_split_pattern_digits_in_pairs(tok):
    # 1-2 digit groups: "4567" can never become one token
    pieces = [tok.decode([i]) for i in tok.encode("4567")]
    assert all(len(p) <= 2 for p in pieces)
    assert "\\p{N}{1,2}" in SPLIT_PATTERN


def test_vocab_too_small_and_too_little_text():
    with pytest.raises(ValueError, match="vocab_size must be at least 265"):
        Tokenizer.train_from_iterator(iter(["abc"]), 264)
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train_from_iterator(iter(["ab ab ab"]), 512)
    with pytest.raises(ValueError, match="trainer must be one of"):
        Tokenizer.train_from_iterator(iter(["ab"]), 512, trainer="sentencepiece")


def test_tokenizers_trainer_equivalent(corpus):
    # the HF `tokenizers` backend yields the same kind of tokenizer (specials on top, lossless)
    hf = Tokenizer.train_from_iterator(iter(corpus), VOCAB, trainer="tokenizers")
    assert hf.get_vocab_size() == VOCAB
    assert hf.encode_special("<|output_end|>") == VOCAB - 1
    for text in ADVERSARIAL:
        assert hf.decode(hf.encode(text)) == text


def test_token_bytes_are_raw_byte_lengths(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    assert tb[-9:].tolist() == [0] * 9
    for i in range(VOCAB - 9):
        assert tb[i] == len(tok.id_to_bytes(i)) > 0
    assert tb[:256].tolist() == [1] * 256
    # tokens holding part of a UTF-8 character count their real bytes, not the 3 bytes of
    # the U+FFFD that a lossy decode would give (docs/decisions.md, D5)
    partial = []
    for i in range(256, VOCAB - 9):
        try:
            tok.id_to_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(i)
    assert partial, "the multilingual training text should produce partial UTF-8 merges"
    assert any(tb[i] != len(tok.id_to_token(i).encode("utf-8")) for i in partial)


def test_save_writes_documented_format_atomically(tok, tmp_path):
    out = tmp_path / "tokenizer"
    out.mkdir()
    (out / "stale.pkl").write_bytes(b"old")
    tok.save(out)
    assert sorted(os.listdir(out)) == sorted([TOKENIZER_FILE, TOKEN_BYTES_FILE])  # replaced as a whole
    assert not [p for p in os.listdir(tmp_path) if p != "tokenizer"]  # no temp dirs left over
    spec = json.loads((out / TOKENIZER_FILE).read_text())
    assert spec["format"] == "nanopipe-bpe" and spec["version"] == 1
    assert spec["pattern"] == SPLIT_PATTERN and spec["vocab_size"] == VOCAB
    assert spec["special_tokens"] == {s: VOCAB - 9 + i for i, s in enumerate(SPECIAL_TOKENS)}
    assert len(spec["mergeable_ranks"]) == VOCAB - 9
    assert torch.equal(load_token_bytes(out), tok.token_bytes())


def test_load_in_fresh_process_gives_identical_ids(tok, tmp_path):
    tok.save(tmp_path / "tok")
    texts = ADVERSARIAL[:9] + ["<|bos|> plain", "def f(x):\n    return x ** 2  # 你好"]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = (
        "import json, sys\n"
        "from nanopipe.tokenizer import load_tokenizer, load_token_bytes\n"
        "t = load_tokenizer(sys.argv[1])\n"
        "texts = json.load(open(sys.argv[2]))\n"
        "print(json.dumps({'ids': t.encode(texts, prepend='<|bos|>'), 'vocab': t.get_vocab_size(),\n"
        "  'bos': t.get_bos_token_id(), 'tb': load_token_bytes(sys.argv[1]).tolist()}))\n"
    )
    src = os.path.dirname(os.path.dirname(nanopipe.__file__))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tok"), str(tmp_path / "texts.json")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ids"] == tok.encode(texts, prepend="<|bos|>")
    assert got["vocab"] == VOCAB and got["bos"] == tok.get_bos_token_id()
    assert got["tb"] == tok.token_bytes().tolist()
    # and in this process too
    assert load_tokenizer(tmp_path / "tok").encode(texts) == tok.encode(texts)


def test_missing_tokenizer_names_path_and_stage(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(tmp_path / "nope")
    assert str(tmp_path / "nope" / TOKENIZER_FILE) in str(e.value) and "`tokenizer` stage" in str(e.value)
    with pytest.raises(FileNotFoundError, match="token_bytes.pt.*`tokenizer` stage"):
        load_token_bytes(tmp_path / "nope")


@pytest.mark.parametrize("corrupt,match", [
    ("{not json", "not a valid tokenizer file"),
    (json.dumps({"format": "other"}), "not a nanopipe-bpe tokenizer file"),
    (json.dumps({"format": "nanopipe-bpe", "version": 99}), "version 99 is not supported"),
    (json.dumps({"format": "nanopipe-bpe", "version": 1, "pattern": "x"}), "corrupt tokenizer file"),
])
def test_corrupt_tokenizer_file(tmp_path, corrupt, match):
    (tmp_path / TOKENIZER_FILE).write_text(corrupt)
    with pytest.raises(ValueError, match=match) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / TOKENIZER_FILE) in str(e.value)


def test_corrupt_token_bytes(tmp_path):
    torch.save(torch.zeros(4, dtype=torch.float32), tmp_path / TOKEN_BYTES_FILE)
    with pytest.raises(ValueError, match="int32"):
        load_token_bytes(tmp_path)
    (tmp_path / TOKEN_BYTES_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read token_bytes"):
        load_token_bytes(tmp_path)
