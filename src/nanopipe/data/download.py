"""Getting pretraining shards into data/shards/ (the library of the `download` stage).

Train shards are indices 0..num_train_shards-1 (skipping the val index); the
validation shard is `data.val_shard`, fixed by config. Remote shards are fetched in
parallel through fsspec, each to a temp name, and renamed into place only after its
parquet footer verifies; failures are retried with exponential backoff, and permanent
HTTP errors (4xx) fail at once with the URL and status. `data/shards` is a DVC
`persist` output, so a rerun after an interruption skips the shards already verified.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from nanopipe import artifacts, paths
from nanopipe.config import bad_value
from nanopipe.data.shards import ShardError, shard_name, verify_shard, write_shard
from nanopipe.data.sources import embedded_documents, shard_url

log = logging.getLogger("nanopipe.download")
STATE = paths.SHARDS / ".sources.json"  # shard name -> url it was verified from


class DownloadError(RuntimeError):
    pass


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
        write_shard(paths.SHARDS / shard_name(index), per_shard[index], d.row_group_size)
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


def fetch(url: str, dest: Path, retries: int, backoff: float, timeout: float) -> None:
    """Fetch `url` to `dest` atomically, verifying the parquet footer before the rename."""
    import fsspec

    last = "no attempt"
    for attempt in range(1, retries + 1):
        try:
            protocol = fsspec.utils.get_protocol(url)
            opts = {}
            if protocol in ("http", "https"):
                import aiohttp

                opts = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
            fs, path = fsspec.core.url_to_fs(url, **opts)
            open_kw = {"block_size": 0} if protocol in ("http", "https") else {}  # stream, no HEAD/range requests
            with artifacts.atomic_path(dest) as tmp:
                with fs.open(path, "rb", **open_kw) as src, open(tmp, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                verify_shard(tmp)  # raises on a truncated/corrupt body: the tmp file is discarded
            return
        except Exception as e:  # noqa: BLE001 - classify below
            status = _http_status(e)
            last = f"HTTP {status}" if status else f"{type(e).__name__}: {e}"
            permanent = status is not None and 400 <= int(status) < 500 and int(status) not in (408, 429)
            if permanent or attempt == retries:
                raise DownloadError(f"{url}: {last} (after {attempt} attempt{'s' * (attempt > 1)})") from None
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1f s", url, attempt, retries, last, wait)
            time.sleep(wait)


def download_remote(cfg: DictConfig, wanted: list[tuple[int, str]]) -> tuple[dict[str, str], int]:
    d = cfg.data
    template = d.url_template
    state: dict[str, str] = artifacts.read_json(STATE) if STATE.exists() else {}
    todo, skipped = [], 0
    for index, _ in wanted:
        name, url = shard_name(index), shard_url(template, index)
        dest = paths.SHARDS / name
        if dest.exists() and state.get(name) == url:
            try:
                verify_shard(dest)
                skipped += 1
                continue
            except ShardError:
                log.warning("%s: failed verification, fetching again", dest)
        todo.append((name, url))
    log.info("download: %d shards to fetch, %d already verified", len(todo), skipped)
    with ThreadPoolExecutor(max_workers=max(1, d.workers)) as pool:
        futures = {pool.submit(fetch, url, paths.SHARDS / name, d.retries, d.backoff, d.timeout): (name, url) for name, url in todo}
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), desc="shards", disable=None):
                name, url = futures[fut]
                fut.result()
                state[name] = url
                artifacts.write_json(STATE, state)  # progress survives an interruption
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return {shard_name(i): state[shard_name(i)] for i, _ in wanted}, skipped
