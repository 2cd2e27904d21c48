"""Work functions of the tokenizer and tok_eval stages."""
import threading

import pytest

import nanopipe.tokenizer.evaluate as ev
from nanopipe.tokenizer import Tokenizer
from nanopipe.tokenizer.evaluate import SAMPLE_TEXTS, evaluate_tokenizer, load_baseline
from nanopipe.tokenizer.fit import capped_documents, fit_tokenizer


def test_capped_documents_follows_tok_train():
    docs = ["a" * 10, "b" * 3, "c" * 10, "d" * 5]
    counts = {"docs": 0, "chars": 0, "truncated": 0}
    # cap 4 per doc; stop once the total exceeds 7 (checked after yielding: doc 2 included)
    assert list(capped_documents(iter(docs), max_chars=7, doc_cap=4, counts=counts)) == ["aaaa", "bbb", "cccc"]
    assert counts == {"docs": 3, "chars": 11, "truncated": 2}
    counts = {"docs": 0, "chars": 0, "truncated": 0}
    batches = [["x" * 2, "y" * 2], ["z" * 2]]  # row-group batches are flattened
    assert list(capped_documents(iter(batches), 100, 10, counts)) == ["xx", "yy", "zz"]


def test_fit_tokenizer_returns_stats(corpus):
    consumed = []

    def docs():
        for d in corpus:
            consumed.append(d)
            yield d

    tok, stats = fit_tokenizer(docs(), vocab_size=512, max_chars=20_000, doc_cap=8_000)
    assert tok.get_vocab_size() == 512
    assert stats["train_chars"] > 20_000 and stats["train_docs"] == len(consumed) < len(corpus)
    assert stats["trainer"] == "rustbpe" and stats["num_special_tokens"] == 9
    assert stats["truncated_docs"] >= 1 and stats["train_time"] >= 0
    assert 1 == stats["token_bytes_min"] <= stats["token_bytes_mean"] <= stats["token_bytes_max"]


def test_fit_tokenizer_errors():
    with pytest.raises(ValueError, match="no training text"):
        fit_tokenizer(iter([]), 512, 1000, 100)
    with pytest.raises(ValueError, match="tokenizer.doc_cap must be a positive int"):
        fit_tokenizer(iter(["x"]), 512, 1000, 0)
    with pytest.raises(ValueError, match="training text must be str"):
        fit_tokenizer(iter([b"bytes"]), 512, 1000, 100)


def test_sample_texts_reproduced_from_seed():
    assert [label for label, _ in SAMPLE_TEXTS] == ["news", "korean", "code", "math", "science"]
    texts = dict(SAMPLE_TEXTS)
    assert texts["news"].startswith("(Washington, D.C., July 9, 2025)")
    assert "헤럴드코리아타임즈" in texts["korean"] and "class BasicTokenizer" in texts["code"]
    assert texts["math"].startswith("\\documentclass") and "NADP⁺" in texts["science"]
    assert all(t == t.strip() and t for t in texts.values())


def test_evaluate_offline_reports_baselines_unavailable(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache
    metrics, md = evaluate_tokenizer(tok, val_text="def f():\n    return 1\n", allow_download=False)
    assert metrics["texts"] == ["news", "korean", "code", "math", "science", "val"]
    for key in ("gpt2", "gpt4"):
        st = metrics["baselines"][key]
        assert st["available"] is False and str(tmp_path) in st["reason"]
    assert "GPT-2 baseline unavailable" in md and "GPT-4 baseline unavailable" in md
    assert "| val |" in md and "### Our tokenizer" in md
    r = metrics["results"]["ours"]["news"]
    assert r["bytes"] == 1817 and r["ratio"] == pytest.approx(r["bytes"] / r["tokens"])
    assert metrics["summary"]["ours_ratio_val"] > 1 and metrics["summary"]["ours_vocab_size"] == 512


def test_evaluate_with_baselines_builds_comparison_tables(tok, corpus):
    other = Tokenizer.train_from_iterator(iter(corpus), 300)
    metrics, md = evaluate_tokenizer(tok, val_text="val text 123", train_text="train text",
                                     baselines={"GPT-2": other, "GPT-4": tok})
    assert metrics["vocab_sizes"] == {"ours": 512, "gpt2": 300, "gpt4": 512}
    assert "### Comparison with GPT-2" in md and "| GPT-2 Tokens | GPT-2 Ratio |" in md
    assert "| train |" in md and "| val |" in md and "Our tokenizer" not in md
    gpt4_rows = md.split("### Comparison with GPT-4")[1]
    assert gpt4_rows.count("+0.0%") == len(metrics["texts"])  # identical tokenizer: no difference
    g, o = metrics["results"]["gpt2"]["code"], metrics["results"]["ours"]["code"]
    assert f"{(g['tokens'] - o['tokens']) / g['tokens'] * 100:+.1f}%" in md.split("### Comparison with GPT-4")[0]
    console = ev.console_report(metrics)
    assert "Vocab sizes:" in console and "GPT-2: 300" in console and "Better" in console


def test_baseline_load_never_hangs(monkeypatch, tmp_path):
    # the network is the external boundary: simulate a download that never returns
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    never = threading.Event()
    monkeypatch.setattr(ev.Tokenizer, "from_pretrained", classmethod(lambda cls, name: never.wait(30)))
    tok, reason = load_baseline("gpt2", timeout_s=0.2)
    assert tok is None and "did not finish within 0.2s" in reason and "TIKTOKEN_CACHE_DIR" in reason
    never.set()

    def boom(cls, name):
        raise ConnectionError("Failed to resolve host")
    monkeypatch.setattr(ev.Tokenizer, "from_pretrained", classmethod(boom))
    tok, reason = load_baseline("cl100k_base", timeout_s=5)
    # one clean line for the report: the error's type and the fix, not the network library's text
    assert tok is None and "could not be downloaded (ConnectionError)" in reason and "TIKTOKEN_CACHE_DIR" in reason
    assert "Failed to resolve host" not in reason
