"""The atomic writers of nanopipe.artifacts keep their promise to a concurrent reader: a reader PROCESS
polling the path while the test replaces it again and again sees, at every poll, either the whole old
or the whole new content (never nothing, never a mix of the two).

A tree is N files that all hold the tree's version; a file is one version repeated to a fixed length.
The reader opens the directory once per poll and reads its files relative to that handle (dir_fd), so
one poll looks at one tree, the one at `path` when it was opened. An old tree is deleted after it has
left `path`; a poll that raced that deletion (its handle no longer the tree at `path`) is not counted.
"""
import json
import subprocess
import sys
import time

import pytest
from helpers import REPO

from nanopipe import artifacts

FILES = 24  # enough files that deleting a tree takes a while: a writer that leaves a gap is caught
FILE_BYTES = 64 * 1024
WRITE_S = 1.0  # how long the writer keeps replacing

READER = r"""
import errno, json, os, sys, time
path, kind, files, size, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
polls = missing = mixed = raced = 0
versions, problems = set(), []
print("ready", flush=True)
while not os.path.exists(stop):
    polls += 1
    if kind == "file":
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            missing += 1
            continue
        v = data[:8]
        if len(data) != size or data != v * (size // 8):
            mixed += 1
            problems.append(f"file of {len(data)} bytes starting {data[:16]!r}")
        else:
            versions.add(v.decode())
        continue
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        missing += 1
        continue
    try:
        seen, bad = set(), None
        try:
            names = os.listdir(fd)
            for name in names:
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
                try:
                    seen.add(os.read(f, 64))
                finally:
                    os.close(f)
            if len(names) != files or len(seen) != 1:
                bad = f"{len(names)} files, versions {sorted(seen)[:4]}"
        except FileNotFoundError as e:
            bad = f"a file vanished while reading: {e}"
        if bad is not None:
            try:  # still the tree at `path`? Otherwise it is an old tree being deleted after it left
                at_path = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                at_path = False
                missing += 1
            if at_path:
                mixed += 1
                problems.append(bad)
            else:
                raced += 1
        else:
            versions.add(seen.pop().decode())
    finally:
        os.close(fd)
print(json.dumps(dict(polls=polls, missing=missing, mixed=mixed, raced=raced, versions=len(versions),
                      problems=problems[:5])), flush=True)
"""


def _version(i: int) -> bytes:
    return f"{i:08d}".encode()


def _poll_while_replacing(tmp_path, kind, replace_once):
    path, stop = tmp_path / "target", tmp_path / "stop"
    replace_once(path, 0)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), kind, str(FILES), str(FILE_BYTES), str(stop)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert reader.stdout.readline().strip() == "ready"
        replaces, deadline = 0, time.monotonic() + WRITE_S
        while time.monotonic() < deadline:
            replaces += 1
            replace_once(path, replaces)
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
    seen = json.loads(out.strip().splitlines()[-1])
    return replaces, seen


def _write_tree(path, i):
    with artifacts.atomic_dir(path) as tmp:
        for n in range(FILES):
            (tmp / f"f{n:02d}").write_bytes(_version(i))


def _write_file(path, i):
    artifacts.write_bytes(path, _version(i) * (FILE_BYTES // 8))


@pytest.mark.parametrize("kind, writer", [("dir", _write_tree), ("file", _write_file)])
def test_a_reader_sees_the_old_or_the_new_content_at_every_instant(tmp_path, kind, writer):
    replaces, seen = _poll_while_replacing(tmp_path, kind, writer)
    # the reader really ran alongside the writer: it saw many versions come and go
    assert replaces >= 20 and seen["polls"] >= 100 and seen["versions"] >= 5, (replaces, seen)
    assert seen["missing"] == 0, f"the path was missing at {seen['missing']} of {seen['polls']} polls ({replaces} replaces)"
    assert seen["mixed"] == 0, f"{seen['mixed']} polls saw a partial or mixed tree: {seen['problems']}"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("target", "stop"))
    assert leftovers == [], leftovers  # no temp or old trees left behind
