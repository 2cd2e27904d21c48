"""nanopipe.artifacts pinned down to the byte: atomic writers, the full-disk translation, the JSON
helpers and the producer-naming errors (the cases mutation testing found unpinned, docs/testing.md)."""
import errno
import hashlib
import json
import os
from collections import namedtuple

import pytest
import torch

from nanopipe import artifacts as A

Usage = namedtuple("Usage", "total used free")
UMASK = A._UMASK


def test_write_json_exact_bytes_nonfinite_as_null_and_order_kept(tmp_path):
    p = tmp_path / "m.json"
    A.write_json(p, {"b": float("inf"), 1: [torch.tensor(2.5), (float("nan"), -float("inf"))], "a": {"x": 1.0}})
    assert p.read_text() == ('{\n  "b": null,\n  "1": [\n    2.5,\n    [\n      null,\n      null\n    ]\n  ],\n'
                             '  "a": {\n    "x": 1.0\n  }\n}\n')
    assert A.read_json(p) == {"b": None, "1": [2.5, [None, None]], "a": {"x": 1.0}}


def test_writers_leave_only_the_file_with_umask_permissions(tmp_path):
    p = tmp_path / "new" / "deep" / "f.txt"  # missing parents are made
    A.write_text(p, "héllo")
    assert p.read_bytes() == "héllo".encode("utf-8")
    assert os.listdir(p.parent) == ["f.txt"]
    assert p.stat().st_mode & 0o777 == 0o666 & ~UMASK
    A.write_bytes(p, b"\x00\x01")  # replaces
    assert p.read_bytes() == b"\x00\x01" and os.listdir(p.parent) == ["f.txt"]


def test_atomic_path_tmp_is_a_hidden_sibling_and_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    with pytest.raises(KeyError):
        with A.atomic_path(p) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.tmp-") and tmp.exists()
            tmp.write_bytes(b"half")
            raise KeyError("stop")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_atomic_dir_replaces_the_tree_and_removes_the_old_one(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "old.txt").write_text("old")
    with A.atomic_dir(d) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-") and tmp.is_dir()
        assert tmp.stat().st_mode & 0o777 == 0o777 & ~UMASK
        (tmp / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(d) == ["new.txt"]
    with pytest.raises(KeyError):
        with A.atomic_dir(d) as tmp:
            (tmp / "half.txt").write_text("x")
            raise KeyError("stop")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(d) == ["new.txt"]
    fresh = tmp_path / "fresh"
    with A.atomic_dir(fresh) as tmp:
        (tmp / "a").write_text("a")
    assert os.listdir(fresh) == ["a"] and sorted(os.listdir(tmp_path)) == ["fresh", "model"]


def _recorded_moves(monkeypatch) -> list:
    moves, real = [], os.replace
    monkeypatch.setattr(A.os, "replace", lambda a, b: (moves.append((os.path.basename(a), os.path.basename(b))), real(a, b))[1])
    return moves


def test_old_tree_is_swapped_out_in_one_call_where_the_kernel_can(tmp_path, monkeypatch):
    d = tmp_path / "m"
    d.mkdir()
    (d / "old").write_text("o")
    moves = _recorded_moves(monkeypatch)
    with A.atomic_dir(d) as tmp:
        (tmp / "new").write_text("n")
    assert moves == [] and sorted(p.name for p in d.iterdir()) == ["new"]  # renameat2 exchange, no rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the old tree is gone


def test_without_the_exchange_the_old_tree_is_moved_aside_with_the_pid_in_its_name(tmp_path, monkeypatch):
    d = tmp_path / "m"
    d.mkdir()
    monkeypatch.setattr(A, "_exchange", lambda a, b: False)  # a kernel or file system that cannot swap
    moves = _recorded_moves(monkeypatch)
    with A.atomic_dir(d) as tmp:
        pass
    assert moves[0] == ("m", f".m.old-{os.getpid()}") and moves[1] == (tmp.name, "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_writing_turns_a_full_disk_into_one_line_naming_the_path(tmp_path, monkeypatch, code):
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: Usage(10, 10, 1234))
    target = tmp_path / "ckpt.pt"
    with pytest.raises(A.DiskFull) as e:
        with A.writing(target):
            raise OSError(code, "no space")
    assert str(e.value) == (f"{target}: cannot write it: the disk is full (no space left on device; 1,234 bytes free "
                            "there); free some space and rerun the stage")
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, A.StageFailed) and isinstance(e.value, OSError)


def test_writing_finds_enospc_in_the_cause_or_context_chain(tmp_path, monkeypatch):
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: Usage(10, 0, 10))
    with pytest.raises(A.DiskFull):
        with A.writing(tmp_path / "x"):
            raise RuntimeError("unexpected pos") from OSError(errno.ENOSPC, "full")
    with pytest.raises(A.DiskFull):
        with A.writing(tmp_path / "x"):
            try:
                raise OSError(errno.ENOSPC, "full")
            except OSError:
                raise RuntimeError("wrapped")  # noqa: B904 (the implicit __context__ is the point)


def test_writing_passes_other_errors_through(tmp_path, monkeypatch):
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: Usage(10, 0, 10))
    err = OSError(errno.EACCES, "denied")
    with pytest.raises(OSError) as e:
        with A.writing(tmp_path / "x"):
            raise err
    assert e.value is err
    full = A.DiskFull("already translated")
    with pytest.raises(A.DiskFull) as e:
        with A.writing(tmp_path / "x"):
            raise full
    assert e.value is full
    with A.writing(tmp_path / "x"):
        pass  # no error, nothing raised


def test_zero_free_bytes_means_full_for_os_and_runtime_errors_only(tmp_path, monkeypatch):
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: Usage(10, 10, 0))
    with pytest.raises(A.DiskFull, match=r"device; 0 bytes free there\)"):
        with A.writing(tmp_path / "x"):
            raise RuntimeError("torch zip writer failed")
    with pytest.raises(ValueError, match="^bad$"):
        with A.writing(tmp_path / "x"):
            raise ValueError("bad")


def test_free_bytes_asks_the_nearest_existing_parent_and_tolerates_errors(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: (asked.append(p), Usage(1, 1, 7))[1])
    assert A._free_bytes(tmp_path / "a" / "b" / "c") == 7 and asked == [tmp_path]

    def fails(p):
        raise OSError(errno.EIO, "io")
    monkeypatch.setattr(A.shutil, "disk_usage", fails)
    assert A._free_bytes(tmp_path) is None
    with pytest.raises(A.DiskFull) as e:
        with A.writing(tmp_path / "x"):
            raise OSError(errno.ENOSPC, "full")
    assert "(no space left on device); free some space" in str(e.value)


def test_read_json_errors_name_the_file_and_its_producer(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(A.MissingInput) as e:
        A.read_json(missing, produced_by="tokenizer")
    assert str(e.value) == f"{missing}: not found (it is written by the `tokenizer` stage: run `dvc repro tokenizer`)"
    with pytest.raises(A.MissingInput) as e:
        A.read_json(missing)
    assert str(e.value) == f"{missing}: not found"
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError) as e:
        A.read_json(bad, produced_by="sft")
    assert str(e.value).startswith(f"{bad}: not valid JSON (Expecting property name")
    assert str(e.value).endswith(") (it is written by the `sft` stage: run `dvc repro sft`)")
    utf8 = tmp_path / "u.json"
    utf8.write_bytes(json.dumps({"k": "é"}, ensure_ascii=False).encode("utf-8"))
    assert A.read_json(utf8) == {"k": "é"}


def test_sha256_file_in_chunks(tmp_path):
    p = tmp_path / "blob"
    data = bytes(range(256)) * 5
    p.write_bytes(data)
    assert A.sha256_file(p) == A.sha256_file(p, chunk=7) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert A.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_require(tmp_path):
    (tmp_path / "here").write_text("x")
    assert A.require(str(tmp_path / "here"), "base") == tmp_path / "here"
    with pytest.raises(A.MissingInput) as e:
        A.require(tmp_path / "gone", "base")
    assert str(e.value) == f"{tmp_path / 'gone'}: not found; it is produced by the `base` stage (run `dvc repro base`)"
