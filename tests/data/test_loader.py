"""The BOS-aligned best-fit pretraining loader: packing rule, rank striding, exact resume."""
import itertools
import json
import random
import re

import pytest
import torch

from nanopipe.data.loader import (
    tokenizing_distributed_data_loader_bos_bestfit,
)
from nanopipe.data.loader import (
    tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_with_state,
)

BOS = 256
TAG = re.compile(r"<s(\d+)g(\d+)d(\d+)>")


def tagged_shards(tmp_path, make_shard, n_shards=2, n_groups=5, docs_per_group=7, seed=0, prefix="shard"):
    """Shards whose documents start with a tag <s{shard}g{row group}d{row}> and have random lengths."""
    rng = random.Random(seed)
    paths = []
    for s in range(n_shards):
        groups = [[f"<s{s}g{g}d{d}>" + "x" * rng.choice([0, 1, 3, 5, 9, 20, 40]) for d in range(docs_per_group)]
                  for g in range(n_groups)]
        paths.append(make_shard(tmp_path / f"{prefix}_{s:05d}.parquet", groups))
    return paths


def take(gen, n):
    """n batches from a loader, cloned (the loader reuses its output buffers)."""
    out = []
    for inputs, targets, state in itertools.islice(gen, n):
        out.append((inputs.clone(), targets.clone(), json.loads(json.dumps(state))))
    return out


def reference_batches(tokenizer, B, T, paths, rank, world, batch_size, buffer_size, n):
    """A plain transcription of the best-fit packing rule (linear scans over a list), for comparison."""
    import pyarrow.parquet as pq

    def stream():
        while True:
            for p in paths:
                pf = pq.ParquetFile(p)
                for g in range(rank, pf.num_row_groups, world):
                    texts = pf.read_row_group(g).column("text").to_pylist()
                    for i in range(0, len(texts), batch_size):
                        yield tokenizer.encode(texts[i:i + batch_size], prepend=tokenizer.get_bos_token_id())

    docs, buffer, out = stream(), [], []
    for _ in range(n):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer.extend(next(docs))
                remaining = T + 1 - len(row)
                best, best_len = -1, 0
                for i, d in enumerate(buffer):
                    if best_len < len(d) <= remaining:
                        best, best_len = i, len(d)
                if best >= 0:
                    row += buffer.pop(best)
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row += buffer.pop(shortest)[:remaining]
            rows.append(row)
        out.append(torch.tensor(rows))
    return out


def test_hand_packed_rows(tmp_path, make_shard, byte_tokenizer):
    # lengths with BOS: aaaa=5 bb=3 c=2 dddddd=7 eee=4; rows hold T+1 = 8 tokens
    path = make_shard(tmp_path / "shard_00000.parquet", [["aaaa", "bb", "c", "dddddd", "eee"]])
    gen = loader_with_state(byte_tokenizer, 3, 7, [path], device="cpu", buffer_size=1, rank=0, world_size=1)
    inputs, targets, _ = next(gen)
    rows = torch.cat([inputs, targets[:, -1:]], dim=1).tolist()
    B, a, b, d, e = BOS, ord("a"), ord("b"), ord("d"), ord("e")
    assert rows == [
        [B, d, d, d, d, d, d, B],  # longest fit (7), then nothing fits 1 slot: crop the shortest ("c")
        [B, a, a, a, a, B, b, b],  # 5 then 3
        [B, e, e, e, B, e, e, e],  # "eee", buffer empties, refill (epoch 2), "eee" again fits exactly
    ]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_matches_reference_and_rows_start_with_bos(tmp_path, make_shard, byte_tokenizer, prefetch):
    paths = tagged_shards(tmp_path, make_shard)
    B, T, n = 3, 16, 12
    got = take(loader_with_state(byte_tokenizer, B, T, paths, device="cpu", tokenizer_batch_size=4,
                                 buffer_size=9, prefetch=prefetch, rank=0, world_size=1), n)
    ref = reference_batches(byte_tokenizer, B, T, paths, 0, 1, 4, 9, n)
    for (inputs, targets, _), rows in zip(got, ref):
        assert torch.equal(inputs, rows[:, :-1]) and torch.equal(targets, rows[:, 1:])
        assert (inputs[:, 0] == BOS).all()
        assert (targets >= 0).all()  # no padding, no ignored targets


def docs_seen(batches):
    """(shard, row group) of every document whose tag survived in the rows."""
    seen = set()
    for inputs, targets, _ in batches:
        rows = torch.cat([inputs, targets[:, -1:]], dim=1)
        for row in rows.tolist():
            text = bytes(t if t < 256 else ord("|") for t in row).decode()
            seen |= {(int(s), int(g)) for s, g, _ in TAG.findall(text)}
    return seen


def test_ranks_read_disjoint_row_groups(tmp_path, make_shard, byte_tokenizer):
    paths = tagged_shards(tmp_path, make_shard, n_groups=5)
    seen = []
    for rank in range(2):
        gen = loader_with_state(byte_tokenizer, 2, 24, paths, device="cpu", tokenizer_batch_size=4,
                                buffer_size=6, rank=rank, world_size=2)
        seen.append(docs_seen(take(gen, 15)))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert {g % 2 for _, g in seen[0]} == {0} and {g % 2 for _, g in seen[1]} == {1}
    assert {s for s, _ in seen[0]} == {0, 1}  # both shards visited


def test_val_reads_only_the_val_shard(tmp_path, make_shard, byte_tokenizer):
    paths = tagged_shards(tmp_path, make_shard, n_shards=3)
    val = paths[-1]
    gen = tokenizing_distributed_data_loader_bos_bestfit(byte_tokenizer, 2, 24, [val], device="cpu",
                                                         tokenizer_batch_size=4, buffer_size=6, rank=0, world_size=1)
    seen = docs_seen([(x.clone(), y.clone(), None) for x, y in itertools.islice(gen, 10)])
    assert seen and {s for s, _ in seen} == {2}


@pytest.mark.parametrize("world", [1, 2])
def test_resume_is_exact(tmp_path, make_shard, byte_tokenizer, world):
    # Small data, long docs and a big buffer: resumes land mid row group, across shards and epochs,
    # with cropped-but-lingering long documents in the buffer.
    paths = tagged_shards(tmp_path, make_shard, n_shards=2, n_groups=4, docs_per_group=6, seed=1)
    kw = dict(device="cpu", tokenizer_batch_size=4, buffer_size=7, prefetch=2, world_size=world)
    B, T, n = 2, 12, 30
    for rank in range(world):
        full = take(loader_with_state(byte_tokenizer, B, T, paths, rank=rank, **kw), n)
        epochs = {s["epoch"] for _, _, s in full}
        assert len(epochs) >= 2, "fixture too large to exercise an epoch boundary"
        assert any(s["doc_idx"] > 0 for _, _, s in full), "fixture never resumes mid row group"
        for k in (0, 4, 11, 17, 25):
            resumed = take(loader_with_state(byte_tokenizer, B, T, paths, rank=rank,
                                             resume_state_dict=full[k][2], **kw), n - k - 1)
            for (x, y, s), (rx, ry, rs) in zip(full[k + 1:], resumed):
                assert torch.equal(x, rx) and torch.equal(y, ry)
                assert s == rs


def test_resume_from_gathered_list_picks_own_rank(tmp_path, make_shard, byte_tokenizer):
    paths = tagged_shards(tmp_path, make_shard, n_groups=4)
    kw = dict(device="cpu", tokenizer_batch_size=4, buffer_size=5, world_size=2)
    runs = [take(loader_with_state(byte_tokenizer, 2, 12, paths, rank=r, **kw), 6) for r in range(2)]
    saved = [runs[0][2][2], runs[1][2][2]]  # what gather_state_dicts returns at step 2
    for r in range(2):
        resumed = take(loader_with_state(byte_tokenizer, 2, 12, paths, rank=r, resume_state_dict=saved, **kw), 3)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(runs[r][3:], resumed))


def test_resume_with_other_world_size_is_approximate(tmp_path, make_shard, byte_tokenizer, caplog):
    caplog.set_level("INFO", logger="nanopipe")
    paths = tagged_shards(tmp_path, make_shard, n_groups=6, docs_per_group=4)
    kw = dict(device="cpu", tokenizer_batch_size=4, buffer_size=3)
    _, _, state = take(loader_with_state(byte_tokenizer, 1, 12, paths, rank=0, world_size=2, **kw), 3)[-1]
    for rank in range(3):
        gen = loader_with_state(byte_tokenizer, 1, 12, paths, rank=rank, world_size=3, resume_state_dict=state, **kw)
        batch = take(gen, 1)
        # first documents come from this rank's stride, at or after the saved cursor
        first = docs_seen(batch)
        assert first and all(g % 3 == rank for _, g in first)
    assert "approximate resume" in caplog.text
    # nanochat's {pq_idx, rg_idx, epoch}: continue after that row group
    gen = loader_with_state(byte_tokenizer, 1, 40, paths, rank=0, world_size=1,
                            resume_state_dict={"pq_idx": 1, "rg_idx": 2, "epoch": 1}, **kw)
    assert docs_seen(take(gen, 1)) <= {(1, 3), (1, 4), (1, 5)}


def test_resume_rejects_a_different_shard_list(tmp_path, make_shard, byte_tokenizer):
    paths = tagged_shards(tmp_path, make_shard)
    _, _, state = take(loader_with_state(byte_tokenizer, 2, 12, paths, device="cpu", buffer_size=4,
                                         rank=0, world_size=1), 2)[-1]
    other = tagged_shards(tmp_path, make_shard, prefix="other")
    with pytest.raises(ValueError, match="shard list"):
        next(loader_with_state(byte_tokenizer, 2, 12, other, device="cpu", buffer_size=4, rank=0,
                               world_size=1, resume_state_dict=state))


def test_rank_without_row_groups_fails_clearly(tmp_path, make_shard, byte_tokenizer):
    path = make_shard(tmp_path / "shard_00000.parquet", [["only one row group"]])
    gen = loader_with_state(byte_tokenizer, 1, 8, [path], device="cpu", buffer_size=2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank 1 of 2 found no documents"):
        next(gen)


def test_missing_shard_and_missing_text_column(tmp_path, make_shard, byte_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    with pytest.raises(FileNotFoundError, match="download"):
        next(loader_with_state(byte_tokenizer, 1, 8, [tmp_path / "nope.parquet"], device="cpu"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["hello"]}), bad)
    with pytest.raises(ValueError, match="no 'text' column"):
        next(loader_with_state(byte_tokenizer, 1, 8, [bad], device="cpu", rank=0, world_size=1))


def test_real_tokenizer_matches_reference_and_resumes(tmp_path, make_shard, real_tokenizer):
    rng = random.Random(3)
    words = "the quick brown fox jumps over lazy dog hello world parquet rows tokens".split()
    groups = [[" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(9)] for _ in range(4)]
    path = make_shard(tmp_path / "shard_00000.parquet", groups)
    bos = real_tokenizer.get_bos_token_id()
    kw = dict(device="cpu", tokenizer_threads=2, tokenizer_batch_size=5, buffer_size=8, rank=0, world_size=1)
    full = take(loader_with_state(real_tokenizer, 2, 32, [path], **kw), 10)
    ref = reference_batches(real_tokenizer, 2, 32, [path], 0, 1, 5, 8, 10)
    for (x, y, _), rows in zip(full, ref):
        assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:]) and (x[:, 0] == bos).all()
    resumed = take(loader_with_state(real_tokenizer, 2, 32, [path], resume_state_dict=full[3][2], **kw), 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], resumed))
