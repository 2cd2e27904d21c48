"""Getting pretraining shards into data/shards/ (the library of the `download` stage).

Train shards are indices 0..num_train_shards-1 (skipping the val index); the
validation shard is `data.val_shard`, fixed by config. Remote shards are fetched in
parallel through fsspec and verified end to end before they are renamed into place:
the body's hash against the one the source publishes (a sha256 ETag / X-Linked-Etag
as the Hugging Face hub sends, a `Digest: sha-256=`, a Content-MD5, or fsspec's
`info()["lfs"]["sha256"]`), and always a full read of every row group with a row
count. Failures are retried with exponential backoff, honouring `Retry-After`
(seconds or an HTTP date, capped at RETRY_AFTER_CAP); permanent HTTP errors (4xx)
fail at once with the URL and status.

Verified remote shards are kept in a download store, data/.downloads/ (outside the DVC
output, with `sources.json`: shard name -> the URL and sha256 it was verified as), and
hard-linked (copied across filesystems) into data/shards. DVC deletes data/shards before
it reruns the stage (it is not a `persist` output, so DVC's run-cache can restore it:
docs/decisions.md, D20), but not the store: a rerun after an interruption, or for a
config that wants more shards, fetches only what the store does not hold verified.
Temp files live in data/.partial/, outside both, and are wiped on every start: a killed
run leaves nothing inside data/shards for dvc.lock to track.
"""
from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from nanopipe import artifacts, paths
from nanopipe.config import bad_value
from nanopipe.data.shards import ShardError, shard_name, verify_shard, write_shard_file
from nanopipe.data.sources import embedded_documents, shard_url, template_problem

log = logging.getLogger("nanopipe.download")
STORE = paths.DATA / ".downloads"  # verified remote shards, kept across DVC's reruns (outside the output)
STORE_STATE = STORE / "sources.json"  # shard name -> {url, sha256} it was verified as
STATE = paths.SHARDS / ".sources.json"  # the same, for the shards of this run: part of the output
PARTIAL = paths.DATA / ".partial"  # temp files: outside the DVC output data/shards
RETRY_AFTER_CAP = 300.0  # seconds: the longest Retry-After we honour
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(RuntimeError):
    pass


class HTTPStatusError(OSError):
    """A HEAD request answered with an error status (`status` and `headers` as aiohttp's error has them)."""

    def __init__(self, url: str, status: int, headers):
        super().__init__(f"{url}: HTTP {status}")
        self.status, self.headers = status, headers


# ----------------------------------------------------------------------------- temp files outside the output


def clean_partials() -> None:
    """Wipe data/.partial and any temp file an earlier version left inside data/shards."""
    shutil.rmtree(PARTIAL, ignore_errors=True)
    PARTIAL.mkdir(parents=True, exist_ok=True)
    if paths.SHARDS.is_dir():
        for junk in paths.SHARDS.glob(".*.tmp-*"):
            shutil.rmtree(junk) if junk.is_dir() else junk.unlink()


@contextlib.contextmanager
def staged(dest: Path) -> Iterator[Path]:
    """A temp path in data/.partial; on clean exit it is fsynced and renamed onto `dest`."""
    PARTIAL.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{dest.name}.", dir=PARTIAL)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON into data/shards through data/.partial (never a temp file inside the output)."""
    with staged(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def plan(cfg: DictConfig) -> list[tuple[int, str]]:
    """[(index, split)] for every shard this config needs."""
    d = cfg.data
    train = [i for i in range(d.total_shards) if i != d.val_shard][: d.num_train_shards]
    return [(i, "train") for i in train] + [(d.val_shard, "val")]


def build_embedded(cfg: DictConfig, wanted: list[tuple[int, str]]) -> dict[str, str]:
    """Write the embedded corpus as shards: document i goes to shard i % total_shards."""
    e, d = cfg.data.embedded, cfg.data
    docs = embedded_documents(e.max_chars, e.doc_chars, e.include_tests, d.seed)
    per_shard: list[list[str]] = [docs[i :: d.total_shards] for i in range(d.total_shards)]
    for index, _ in tqdm(wanted, desc="embedded shards", disable=None):
        if not per_shard[index]:
            raise bad_value("data.embedded.max_chars", e.max_chars, f"more: shard {index} got no documents")
        with staged(paths.SHARDS / shard_name(index)) as tmp:
            write_shard_file(tmp, per_shard[index], d.row_group_size)
    return {shard_name(i): "embedded" for i, _ in wanted}


def _http_status(e: BaseException) -> int | None:
    """The HTTP status behind an fsspec error (it wraps aiohttp's in FileNotFoundError)."""
    seen = e
    while seen is not None:
        status = getattr(seen, "status", None)
        if isinstance(status, int):
            return status
        seen = seen.__cause__ or seen.__context__
    return 404 if isinstance(e, FileNotFoundError) else None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent/garbage."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _retry_after(e: BaseException) -> float | None:
    seen = e
    while seen is not None:
        headers = getattr(seen, "headers", None)
        if headers is not None and hasattr(headers, "get"):
            wait = parse_retry_after(headers.get("Retry-After"))
            if wait is not None:
                return wait
        seen = seen.__cause__ or seen.__context__
    return None


# ----------------------------------------------------------------------------- the hash the source publishes


def _hash_in(headers) -> tuple[str, str] | None:
    """(algorithm, hex digest) from response headers or an fsspec info dict, case-insensitively."""
    low = {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}
    for key in ("x-linked-etag", "etag"):  # the hub's LFS sha256 (X-Linked-Etag on its redirect)
        tag = low.get(key, "").strip().removeprefix("W/").strip('"').lower()
        if _HEX64.match(tag):
            return "sha256", tag
    for part in low.get("digest", "").split(","):  # RFC 3230: Digest: sha-256=<base64>
        algo, _, value = part.strip().partition("=")
        if algo.lower() == "sha-256" and value:
            with contextlib.suppress(ValueError):
                return "sha256", base64.b64decode(value).hex()
    if low.get("content-md5"):
        with contextlib.suppress(ValueError):
            return "md5", base64.b64decode(low["content-md5"]).hex()
    return None


def _http_published(url: str, timeout: float, hops: int = 5) -> tuple[str, str] | None:
    """HEAD `url`, following redirects by hand so that every hop's headers are seen (the hub puts
    the LFS sha256 in X-Linked-Etag on its 302, not on the CDN's answer)."""
    for _ in range(hops):
        u = urllib.parse.urlsplit(url)
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(u.netloc, timeout=timeout)
        try:
            conn.request("HEAD", (u.path or "/") + (f"?{u.query}" if u.query else ""), headers={"Accept-Encoding": "identity"})
            r = conn.getresponse()
            r.read()
        finally:
            conn.close()
        found = _hash_in(r.headers)
        if found:
            return found
        if r.status in (301, 302, 303, 307, 308) and r.headers.get("Location"):
            url = urllib.parse.urljoin(url, r.headers["Location"])
            continue
        if r.status in (405, 501):  # no HEAD here: nothing published, the full read still verifies
            return None
        if r.status >= 400:
            raise HTTPStatusError(url, r.status, r.headers)
        return None
    return None


def published_hash(url: str, fs, path: str, timeout: float) -> tuple[str, str] | None:
    """(algorithm, hex digest) the source publishes for `url`, or None when it publishes none."""
    if fsspec_protocol(url) in ("http", "https"):
        return _http_published(url, timeout)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise
    except Exception:  # noqa: BLE001 - a filesystem without info(): verify by reading
        return None
    lfs = info.get("lfs") or {}
    sha = (lfs.get("sha256") if isinstance(lfs, dict) else None) or info.get("sha256")
    if isinstance(sha, str) and _HEX64.match(sha.lower()):
        return "sha256", sha.lower()
    return _hash_in(info)


def fsspec_protocol(url: str) -> str:
    import fsspec

    protocol = fsspec.utils.get_protocol(url)
    return protocol[0] if isinstance(protocol, (list, tuple)) else protocol


# ----------------------------------------------------------------------------- fetch


def fetch(url: str, dest: Path, retries: int, backoff: float, timeout: float) -> dict:
    """Fetch `url` to `dest` atomically, verified end to end; return {sha256, verified}."""
    import fsspec

    last = "no attempt"
    for attempt in range(1, retries + 1):
        try:
            protocol = fsspec_protocol(url)
            opts = {}
            if protocol in ("http", "https"):
                import aiohttp

                opts = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
            fs, path = fsspec.core.url_to_fs(url, **opts)
            published = published_hash(url, fs, path, timeout)
            open_kw = {"block_size": 0} if protocol in ("http", "https") else {}  # stream, no range requests
            with staged(dest) as tmp:
                sha256 = hashlib.sha256()
                other = hashlib.new(published[0]) if published and published[0] != "sha256" else None
                with fs.open(path, "rb", **open_kw) as src, open(tmp, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                        sha256.update(chunk)
                        if other:
                            other.update(chunk)
                if published:
                    got = (other or sha256).hexdigest()
                    if got != published[1]:
                        raise ShardError(f"body {published[0]} {got[:16]}... differs from the published {published[1][:16]}...")
                try:
                    verify_shard(tmp, full=True)  # every row group decoded, rows counted
                except ShardError as e:
                    raise ShardError(str(e).replace(str(tmp), "body")) from None
            return {"sha256": sha256.hexdigest(),
                    "verified": f"{published[0]} published by the source + full read" if published else "full read"}
        except Exception as e:  # noqa: BLE001 - classify below
            status = _http_status(e)
            last = f"HTTP {status}" if status else f"{type(e).__name__}: {e}"
            permanent = status is not None and 400 <= int(status) < 500 and int(status) not in (408, 429)
            if permanent or attempt == retries:
                raise DownloadError(f"{url}: {last} (after {attempt} attempt{'s' * (attempt > 1)})") from None
            wait = backoff * 2 ** (attempt - 1)
            asked = _retry_after(e)
            if asked is not None:
                wait = max(wait, min(asked, RETRY_AFTER_CAP))
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1f s", url, attempt, retries, last, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _verified_before(dest: Path, entry: dict) -> bool:
    """Is the shard on disk the one verified earlier? The recorded sha256, or else a full read."""
    try:
        if entry.get("sha256"):
            if artifacts.sha256_file(dest) == entry["sha256"]:
                return True
            log.warning("%s: sha256 differs from the one verified at download; fetching again", dest)
            return False
        verify_shard(dest, full=True)
        entry["sha256"] = artifacts.sha256_file(dest)
        return True
    except ShardError as e:
        log.warning("%s: failed verification (%s); fetching again", dest, e)
        return False


def _load_state() -> dict[str, dict]:
    raw = artifacts.read_json(STORE_STATE) if STORE_STATE.exists() else {}
    # an older .sources.json maps name -> url: no hash recorded, so those shards get a full read
    return {k: (v if isinstance(v, dict) else {"url": v}) for k, v in raw.items()}


def _place(kept: Path, dest: Path) -> None:
    """Put the store's verified shard at `dest`: a hard link (no second copy of the bytes; DVC's cache may
    link the same inode, which is safe because nothing here writes into an existing file, only renames new
    ones over it), or a copy where the store and data/shards are on different filesystems."""
    PARTIAL.mkdir(parents=True, exist_ok=True)
    tmp = PARTIAL / f"{dest.name}.link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(kept, tmp)
    except OSError as e:
        log.info("%s: cannot hard-link from %s (%s); copying", dest, kept, e)
        with staged(dest) as copy:
            shutil.copyfile(kept, copy)
        return
    os.replace(tmp, dest)


def download_remote(cfg: DictConfig, wanted: list[tuple[int, str]]) -> tuple[dict[str, str], int]:
    d = cfg.data
    template = d.url_template
    problem = template_problem(template)
    if problem:
        raise bad_value("data.url_template", template, f"an fsspec URL with an {{index}} field: it {problem}")
    urls = {shard_name(i): shard_url(template, i) for i, _ in wanted}
    if len(set(urls.values())) < len(urls):
        raise bad_value("data.url_template", template, "a template that names a different URL for every shard")
    state = _load_state()
    STORE.mkdir(parents=True, exist_ok=True)
    todo, skipped = [], 0
    for name, url in urls.items():
        kept = STORE / name
        entry = state.get(name)
        if kept.exists() and entry and entry.get("url") == url and _verified_before(kept, entry):
            skipped += 1
            continue
        state.pop(name, None)
        todo.append((name, url))
    log.info("download: %d shards to fetch, %d already verified in %s", len(todo), skipped, STORE)

    def save_store() -> None:  # every shard the store holds verified, including other configs' shards
        write_json(STORE_STATE, {n: state[n] for n in sorted(state)})

    with ThreadPoolExecutor(max_workers=max(1, d.workers)) as pool:
        futures = {pool.submit(fetch, url, STORE / name, d.retries, d.backoff, d.timeout): (name, url) for name, url in todo}
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), desc="shards", disable=None):
                name, url = futures[fut]
                state[name] = {"url": url, **fut.result()}
                save_store()  # progress survives an interruption
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    for name in urls:
        _place(STORE / name, paths.SHARDS / name)
    # sorted and pruned to this run's shards: a resumed run writes the same bytes as a clean run
    write_json(STATE, {n: state[n] for n in sorted(urls)})
    return dict(urls), skipped
