"""The on-disk shard format (nanochat's) and the manifest that names train and val.

A shard is a parquet file with one string column `text`, one document per row, row
groups of `row_group_size` documents, zstd level 3, no dictionary, no statistics.
`data/shards/manifest.json` lists every shard with its size, rows and sha256, and
names the validation shard, which is fixed by config rather than "last on disk".
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from nanopipe import artifacts, paths


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def write_shard_file(path: Path, texts: Sequence[str], row_group_size: int) -> None:
    """Write one shard in nanochat's layout straight to `path` (the caller makes it atomic)."""
    table = pa.Table.from_pydict({"text": list(texts)})
    pq.write_table(table, path, row_group_size=row_group_size, use_dictionary=False,
                   compression="zstd", compression_level=3, write_statistics=False)


def write_shard(path: Path, texts: Sequence[str], row_group_size: int) -> None:
    """Write one shard atomically in nanochat's layout."""
    with artifacts.atomic_path(path) as tmp:
        write_shard_file(tmp, texts, row_group_size)


class ShardError(ValueError):
    pass


class CorruptShard(ShardError, artifacts.MissingInput):
    """A shard a stage reads is damaged: the stage contract reports it in one line (a bad input)."""


REGENERATE = "it is produced by the `download` stage: regenerate it with `dvc repro -f download`"


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def verify_shard(path: Path, full: bool = False) -> dict:
    """Check the parquet footer and schema (and with `full`, every row group); return rows and row groups.

    The footer check catches a truncated file (the footer lives at the end). Only `full` catches a
    body damaged in the middle: it decodes the `text` column of every row group (zstd frames, page
    headers, UTF-8) and checks the rows add up to the footer's count.
    """
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
        names = meta.schema.names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise ShardError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
    if "text" not in names:
        raise ShardError(f"{path}: has no `text` column (columns: {names})")
    if meta.num_rows == 0:
        raise ShardError(f"{path}: has no rows")
    if full:
        rows = 0
        for rg in range(meta.num_row_groups):
            try:
                col = pf.read_row_group(rg, columns=["text"]).column("text")
                col.validate(full=True)
            except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError, ... for a damaged page
                raise ShardError(f"{path}: row group {rg} is corrupt ({_first_line(e)})") from None
            rows += len(col)
        if rows != meta.num_rows:
            raise ShardError(f"{path}: {rows} rows decoded, the footer says {meta.num_rows}")
    return {"rows": meta.num_rows, "row_groups": meta.num_row_groups}


def read_manifest(manifest: Path = paths.MANIFEST) -> dict:
    return artifacts.read_json(manifest, produced_by="download")


def split_paths(manifest: dict, root: Path = paths.SHARDS) -> tuple[list[Path], Path]:
    """(train shard paths in index order, the val shard path)."""
    train = [root / s["name"] for s in manifest["shards"] if s["split"] == "train"]
    val = root / manifest["val_shard"]
    for p in [*train, val]:
        if not p.exists():
            raise artifacts.MissingInput(f"{p}: listed in {paths.MANIFEST} but missing; rerun `dvc repro download`")
    return train, val


def iter_texts(shard_paths: Sequence[Path], start: int = 0, step: int = 1):
    """Yield lists of documents, one list per row group, striding row groups by (start, step).

    A damaged shard fails as `CorruptShard`, naming the file and the stage that produces it.
    """
    for path in shard_paths:
        try:
            pf = pq.ParquetFile(path)
            groups = range(start, pf.num_row_groups, step)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise CorruptShard(f"{path}: corrupt shard ({_first_line(e)}); {REGENERATE}") from None
        for rg in groups:
            try:
                docs = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            except Exception as e:  # noqa: BLE001
                raise CorruptShard(f"{path}: corrupt shard, row group {rg} ({_first_line(e)}); {REGENERATE}") from None
            yield docs


def sample_text(shard_paths, max_chars: int) -> str:
    """The first documents of the given shards, joined, up to max_chars."""
    out, n = [], 0
    for docs in iter_texts(shard_paths):
        for d in docs:
            if n >= max_chars:
                return "\n".join(out)
            out.append(d[: max_chars - n])
            n += len(out[-1])
    return "\n".join(out)
