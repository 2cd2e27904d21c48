"""Atomic writes, checksums and small JSON helpers.

Every output a rerun might trust is written to a temporary name next to its final
path and renamed into place only once complete, so an interrupted stage never leaves
a half-written file or directory behind. A write that fails because the disk (or the
quota) is full raises `DiskFull`, one line naming the final path, whatever layer
(torch's zip writer, a buffered flush, fsync) hit the ENOSPC.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


class StageFailed(Exception):
    """A stage stopped for a reason it states in one line (a full disk, a diverged loss) and wrote no
    output; `nanopipe <stage>` prints the line without a traceback."""


class DiskFull(StageFailed, OSError):
    """A write failed because the filesystem (or the quota) is full."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _is_disk_full(e: BaseException, path: Path) -> bool:
    seen: BaseException | None = e
    while seen is not None:  # torch wraps the OSError of a failed write in a RuntimeError ("unexpected pos ...")
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(e, (OSError, RuntimeError)) and _free_bytes(path) == 0


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, however deep in the writer it surfaced, into `DiskFull` naming `path`."""
    path = Path(path)
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if not _is_disk_full(e, path):
            raise
        free = _free_bytes(path)
        raise DiskFull(f"{path}: cannot write it: the disk is full (no space left on device"
                                     f"{'' if free is None else f'; {free:,} bytes free there'}); free some space "
                                     "and rerun the stage") from e


def _tmp_sibling(path: Path, is_dir: bool = False) -> Path:
    with writing(path):
        return _make_tmp_sibling(path, is_dir)


def _make_tmp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
        return tmp
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path; on clean exit fsync it and rename it onto `path`."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with writing(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (renameat2 RENAME_EXCHANGE); False where that is not
    available (not Linux, an old kernel or libc, a file system without it)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; on clean exit replace `path` with it in one rename.

    A previous directory at `path` is swapped with the new one in one system call (Linux's
    renameat2 RENAME_EXCHANGE) and deleted after, so at every instant `path` is either the old or
    the new tree. Where the kernel or file system cannot swap, the old tree is moved aside and the
    new one renamed into place: `path` is then missing between the two renames.
    """
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=True)
    try:
        with writing(path):
            yield tmp
        if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
            return  # tmp now holds the old tree: the finally deletes it
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _jsonable(obj: Any) -> Any:
    # JSON has no inf/nan: write them as null so every consumer (DVC, MLflow, jq) can read the file.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


class MissingInput(FileNotFoundError):
    """An input a stage reads is not there; the message names the stage that produces it."""


def read_json(path: str | os.PathLike, produced_by: str | None = None) -> Any:
    """Read a JSON file, failing with a message that names the file and its producer."""
    path = Path(path)
    hint = f" (it is written by the `{produced_by}` stage: run `dvc repro {produced_by}`)" if produced_by else ""
    if not path.exists():
        raise MissingInput(f"{path}: not found{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}){hint}") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require(path: str | os.PathLike, produced_by: str) -> Path:
    """Return `path` if it exists, else raise naming the stage that produces it."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: not found; it is produced by the `{produced_by}` stage (run `dvc repro {produced_by}`)")
    return path


def fingerprint(path: str | os.PathLike) -> str | None:
    """A content fingerprint of an artifact (None when it does not exist), cheap for the big ones:
    - a checkpoint directory (meta.json lists the size and sha256 of every file): sha256 of meta.json;
    - data/shards (manifest.json lists the sha256 of every shard): sha256 of manifest.json;
    - a JSON file (another stage's metrics): sha256 of its canonical form (sorted keys, no whitespace), which
      a reader of `dvc exp show --json` can recompute from the parsed data;
    - any other file or directory: sha256 over the sorted (relative path, sha256) of every file."""
    p = Path(path)
    if p.is_dir():
        if _lists_hashes(p / "meta.json", "files") or _lists_hashes(p / "manifest.json", "shards"):
            return "sha256:" + sha256_file(p / ("meta.json" if (p / "meta.json").is_file() else "manifest.json"))
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
        return "sha256:" + h.hexdigest()
    if p.is_file():
        return json_fingerprint(read_json(p)) if p.suffix == ".json" else "sha256:" + sha256_file(p)
    return None


def _lists_hashes(index: Path, key: str) -> bool:
    """Does `index` (a checkpoint's meta.json, the shards' manifest.json) record a sha256 for every file under
    `key`? Only then does its own hash stand for the whole directory."""
    if not index.is_file():
        return False
    try:
        entries = json.loads(index.read_text()).get(key)
    except (ValueError, AttributeError):
        return False
    entries = entries.values() if isinstance(entries, dict) else entries
    return bool(entries) and all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in entries)


def json_fingerprint(obj: Any) -> str:
    """The fingerprint of parsed JSON (what `fingerprint` records for a .json file)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
