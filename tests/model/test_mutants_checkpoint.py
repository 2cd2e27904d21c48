"""nanopipe.model.checkpoint's verification and step lookup pinned down: the hashing writer, the exact
refusal messages of read_meta/_verify_file, step directories and checkpoint_at (the cases mutation
testing found unpinned, docs/testing.md). Hand-made files and meta.json: no model is built."""
import errno
import hashlib
import io
import json

import pytest
import torch

from nanopipe.artifacts import DiskFull
from nanopipe.config import ConfigError
from nanopipe.model import checkpoint as C
from nanopipe.model.checkpoint import CheckpointError, UnknownStep

HELLO_SHA = hashlib.sha256(b"hello").hexdigest()


def error(fn, *args, exc=CheckpointError, **kw):
    with pytest.raises(exc) as e:
        fn(*args, **kw)
    return str(e.value)


def write_meta(d, meta):
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.json").write_text(json.dumps(meta))
    return d


class Sink(io.BytesIO):
    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def test_hashing_writer_counts_hashes_and_passes_through():
    sink = Sink()
    w = C._HashingWriter(sink)
    assert w.f is sink and w.nbytes == 0 and w.sha.hexdigest() == hashlib.sha256().hexdigest()
    assert w.write(b"hel") == 3 and w.write(b"lo") == 2
    assert w.nbytes == 5 and w.sha.hexdigest() == HELLO_SHA and sink.getvalue() == b"hello"
    w.flush()
    assert sink.flushes == 1


def test_save_file_records_size_and_sha_of_what_it_wrote(tmp_path):
    info = C._save_file({"w": torch.arange(3)}, tmp_path / "tmp.pt", tmp_path / "final.pt")
    data = (tmp_path / "tmp.pt").read_bytes()
    assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert torch.equal(torch.load(tmp_path / "tmp.pt", weights_only=True)["w"], torch.arange(3))
    assert not (tmp_path / "final.pt").exists()


def test_save_file_names_the_final_path_on_a_full_disk(tmp_path, monkeypatch):
    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(C.torch, "save", full)
    msg = error(C._save_file, {}, tmp_path / "tmp.pt", tmp_path / "final.pt", exc=DiskFull)
    assert msg.startswith(f"{tmp_path / 'final.pt'}: cannot write it: the disk is full")


def test_read_meta_messages(tmp_path):
    d = tmp_path / "ckpt"
    assert error(C.read_meta, d) == f"{d}: checkpoint directory not found"
    (tmp_path / "file").write_text("x")
    assert error(C.read_meta, tmp_path / "file") == f"{tmp_path / 'file'}: checkpoint directory not found"
    d.mkdir()
    p = d / "meta.json"
    assert error(C.read_meta, d) == f"{p}: missing; {d} is not a complete nanopipe checkpoint"
    p.write_text("{ not json")
    try:
        json.loads("{ not json")
    except ValueError as e:
        jerr = e
    assert error(C.read_meta, str(d)) == f"{p}: corrupt ({p}: not valid JSON ({jerr}))"
    wrong = f"{p}: not a nanopipe checkpoint meta (format 1 with a 'files' table expected)"
    for meta in ([1], {"files": {}}, {"format": 2, "files": {}}, {"format": 1}, "x"):
        p.write_text(json.dumps(meta))
        assert error(C.read_meta, d) == wrong, meta
    p.write_text(json.dumps({"format": 1, "files": {}, "step": 3}))
    assert C.read_meta(str(d)) == {"format": 1, "files": {}, "step": 3}


def test_verify_file_messages(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"hello")
    meta = {"files": {"x.pt": {"bytes": 5, "sha256": HELLO_SHA}, "gone.pt": {"bytes": 1, "sha256": "0" * 64}}}
    assert C._verify_file(tmp_path, meta, "x.pt", True) == tmp_path / "x.pt"
    assert error(C._verify_file, tmp_path, meta, "y.pt", True) == \
        f"{tmp_path / 'y.pt'}: this checkpoint has no y.pt (meta.json lists ['gone.pt', 'x.pt'])"
    assert error(C._verify_file, tmp_path, meta, "gone.pt", False) == \
        f"{tmp_path / 'gone.pt'}: missing although meta.json lists it; the checkpoint is incomplete"
    meta["files"]["x.pt"]["bytes"] = 6
    assert error(C._verify_file, tmp_path, meta, "x.pt", False) == \
        f"{tmp_path / 'x.pt'}: truncated or altered: 5 bytes on disk, 6 expected; " \
        "delete the checkpoint and re-run the stage that wrote it"
    meta["files"]["x.pt"] = {"bytes": 5, "sha256": "ab" * 32}
    assert error(C._verify_file, tmp_path, meta, "x.pt", True) == \
        f"{tmp_path / 'x.pt'}: corrupt: sha256 {HELLO_SHA[:16]}... does not match abababababababab... recorded at save time"
    assert C._verify_file(tmp_path, meta, "x.pt", False) == tmp_path / "x.pt"  # size only


def test_step_dir_and_history_steps_in(tmp_path):
    assert C.step_dir(tmp_path, 5) == tmp_path / "step_000005"
    assert C.step_dir(str(tmp_path), 1234567) == tmp_path / "step_1234567"
    assert C.history_steps_in(tmp_path / "none") == [] and C.find_last_step(tmp_path / "none") is None
    assert C.history_steps_in(tmp_path) == [] and C.find_last_step(tmp_path) is None
    for name in ("step_000012", "step_000003", "step_7", "step_000099x", "xstep_000098", "other"):
        write_meta(tmp_path / name, {})
    (tmp_path / "step_000200").mkdir()  # incomplete: no meta.json
    (tmp_path / "step_000300").write_text("a file")
    assert C.history_steps_in(str(tmp_path)) == [3, 7, 12]
    assert C.find_last_step(str(tmp_path)) == 12
    assert C.history_steps(tmp_path) == []  # looks in <dir>/steps
    write_meta(tmp_path / "steps" / "step_000001", {})
    assert C.history_steps(tmp_path) == [1]


def test_checkpoint_at(tmp_path):
    d = tmp_path / "sft"
    assert C.checkpoint_at(d) == d and C.checkpoint_at(str(d), -1) == d  # -1: the directory itself, unread
    write_meta(d, {"format": 1, "files": {}, "step": 10})
    for s in (2, 6):
        write_meta(d / "steps" / f"step_{s:06d}", {})
    assert C.checkpoint_at(d, 10) == d
    assert C.checkpoint_at(d, 6) == d / "steps" / "step_000006"
    assert C.checkpoint_at(d, 2, key="export.step") == d / "steps" / "step_000002"
    tail = " (a training stage keeps one every save_every steps, as many as its keep_checkpoints says)"
    assert error(C.checkpoint_at, d, 4, exc=UnknownStep) == \
        f"`step` = 4: {d} has no checkpoint at that step; it has steps [2, 6, 10]" + tail
    assert error(C.checkpoint_at, d, 0, key="serve.step", exc=UnknownStep) == \
        f"`serve.step` = 0: {d} has no checkpoint at that step; it has steps [2, 6, 10]" + tail
    assert issubclass(UnknownStep, ConfigError) and issubclass(UnknownStep, CheckpointError)
