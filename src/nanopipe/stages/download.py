"""The `download` stage: pretraining shards + manifest under data/shards/ (nanochat's dataset.py).

Train shards are indices 0..num_train_shards-1 (skipping the val index); the validation shard is
`data.val_shard`, fixed by config. The embedded source builds its shards from text that ships with
Python; remote ones are fetched by `nanopipe.data.download` (parallel, verified, retried).
Remote shards are kept verified in data/.downloads (outside the output, which DVC deletes before a rerun
and can restore from its run-cache: docs/decisions.md, D20), so a rerun after an interruption fetches only
what is missing; temp files live in data/.partial (outside the output, wiped on every start), so a killed
run leaves no junk for dvc.lock to track.
"""
from __future__ import annotations

import time

from nanopipe import artifacts, paths
from nanopipe.data.download import build_embedded, clean_partials, download_remote, plan, write_json
from nanopipe.data.shards import shard_name, verify_shard
from nanopipe.stage import Stage

PARAMS = ["data"]


def run(st: Stage) -> None:
    cfg = st.cfg
    wanted = plan(cfg)
    paths.SHARDS.mkdir(parents=True, exist_ok=True)
    clean_partials()
    keep = {shard_name(i) for i, _ in wanted}
    for stale in paths.SHARDS.glob("*.parquet"):  # shards of an earlier config would confuse readers
        if stale.name not in keep:
            stale.unlink()
    t0 = time.time()
    if cfg.data.source == "embedded":
        sources, skipped = build_embedded(cfg, wanted), 0
    else:
        sources, skipped = download_remote(cfg, wanted)
    seconds = time.time() - t0

    entries = []
    for index, split in wanted:
        p = paths.SHARDS / shard_name(index)
        info = verify_shard(p)
        entries.append({"name": p.name, "index": index, "split": split, "source": sources[p.name],
                        "bytes": p.stat().st_size, "sha256": artifacts.sha256_file(p), **info})
    manifest = {
        "source": cfg.data.source,
        "url_template": cfg.data.url_template,
        "val_shard": shard_name(cfg.data.val_shard),
        "row_group_size": cfg.data.row_group_size,
        "shards": entries,
    }
    write_json(paths.MANIFEST, manifest)

    train = [e for e in entries if e["split"] == "train"]
    metrics = {
        "num_train_shards": len(train),
        "train_rows": sum(e["rows"] for e in train),
        "val_rows": next(e["rows"] for e in entries if e["split"] == "val"),
        "total_bytes": sum(e["bytes"] for e in entries),
        "fetched": len(entries) - skipped,
        "skipped": skipped,
        "build_seconds": round(seconds, 3),
    }
    rows = "\n".join(f"| {e['name']} | {e['split']} | {e['rows']:,} | {e['bytes']:,} | `{e['sha256'][:12]}` |" for e in entries)
    report = (f"Source: `{cfg.data.source}`" + (f" (`{cfg.data.url_template}`)" if cfg.data.url_template else "") + "\n\n"
              "| shard | split | rows | bytes | sha256 |\n|---|---|---:|---:|---|\n" + rows)
    st.finish(metrics, report)
