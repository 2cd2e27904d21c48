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


def write_shard(path: Path, texts: Sequence[str], row_group_size: int) -> None:
    """Write one shard atomically in nanochat's layout."""
    table = pa.Table.from_pydict({"text": list(texts)})
    with artifacts.atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, use_dictionary=False,
                       compression="zstd", compression_level=3, write_statistics=False)


class ShardError(ValueError):
    pass


def verify_shard(path: Path) -> dict:
    """Open the parquet footer and check the schema; return rows and row groups.

    A truncated or corrupt file fails here (the footer lives at the end of the file).
    """
    try:
        meta = pq.ParquetFile(path).metadata
        names = meta.schema.names
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ShardError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if "text" not in names:
        raise ShardError(f"{path}: has no `text` column (columns: {names})")
    if meta.num_rows == 0:
        raise ShardError(f"{path}: has no rows")
    return {"rows": meta.num_rows, "row_groups": meta.num_row_groups}


def read_manifest(manifest: Path = paths.MANIFEST) -> dict:
    return artifacts.read_json(manifest, produced_by="download")


def split_paths(manifest: dict, root: Path = paths.SHARDS) -> tuple[list[Path], Path]:
    """(train shard paths in index order, the val shard path)."""
    train = [root / s["name"] for s in manifest["shards"] if s["split"] == "train"]
    val = root / manifest["val_shard"]
    for p in [*train, val]:
        if not p.exists():
            raise FileNotFoundError(f"{p}: listed in {paths.MANIFEST} but missing; rerun `dvc repro download`")
    return train, val


def iter_texts(shard_paths: Sequence[Path], start: int = 0, step: int = 1):
    """Yield lists of documents, one list per row group, striding row groups by (start, step)."""
    for path in shard_paths:
        pf = pq.ParquetFile(path)
        for rg in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


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
