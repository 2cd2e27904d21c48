"""Where pretraining text comes from.

- `embedded`: text that ships with every Python install (the standard library's `.py`
  sources and the pydoc topics), split into documents, shuffled with a fixed seed.
  Offline, deterministic for a given Python version, ~10 M characters available.
- `fineweb_edu` / `url`: an fsspec URL template with `{index}` (https://, file://,
  s3://, ...), fetched with retries by the download stage.
"""
from __future__ import annotations

import random
import sysconfig
import tokenize
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3", "turtledemo"}
TEST_DIRS = {"test", "tests", "idle_test"}


def _split_document(text: str, doc_chars: int) -> list[str]:
    """Split at blank lines into pieces of about `doc_chars` characters."""
    if len(text) <= doc_chars:
        return [text]
    pieces, current, size = [], [], 0
    for block in text.split("\n\n"):
        if size and size + len(block) > doc_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(block)
        size += len(block) + 2
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


def stdlib_files(include_tests: bool) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        parts = set(p.relative_to(root).parts[:-1])
        if parts & SKIP_DIRS or (not include_tests and parts & TEST_DIRS):
            continue
        files.append(p)
    return files


def embedded_documents(max_chars: int, doc_chars: int, include_tests: bool, seed: int) -> list[str]:
    """The embedded corpus: documents in a seeded-shuffled order, at most `max_chars` in total."""
    docs: list[str] = []
    for path in stdlib_files(include_tests):
        try:
            with tokenize.open(path) as f:  # honours PEP 263 encoding cookies
                text = f.read()
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few stdlib test files are deliberately mis-encoded
        docs.extend(_split_document(text, doc_chars))
    try:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            docs.extend(_split_document(topics[name], doc_chars))
    except ImportError:  # some distributions strip pydoc_data
        pass
    random.Random(seed).shuffle(docs)
    out, total = [], 0
    for d in docs:
        if total + len(d) > max_chars:
            break
        out.append(d)
        total += len(d)
    return out


def template_problem(template: str) -> str | None:
    """Why `template` cannot name one shard per index, or None when it can.

    `"{index" in template` is not enough: `{{index}}` is a literal (every shard, val included, would be
    the same file) and another field (`{split}`) cannot be filled.
    """
    try:
        first, second = template.format(index=0), template.format(index=1)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        return f"does not render with only an {{index}} field ({type(e).__name__}: {e})"
    if first == second:
        return f"renders the same URL for every shard ({first!r}): it needs an {{index}} field"
    return None


def shard_url(template: str, index: int) -> str:
    problem = template_problem(template)
    if problem:
        raise ValueError(f"data.url_template {template!r}: {problem} (e.g. shard_{{index:05d}}.parquet)")
    return template.format(index=index)
