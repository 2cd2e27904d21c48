"""The best-fit loader's pieces pinned to hand-computed values (issue 19's mutation tests).

- `_document_batches`: which (shard, row group, row) references and which next-document cursor each
  slice carries, across row groups, shards, epochs and rank strides; the no-documents error.
- `_pick_state`: which saved state is exact for a rank, and the approximate cursor otherwise.
- The loader: rows and their yielded state dicts for a tiny hand-packed corpus (which documents land in
  which row at which offset, BOS at each document start, the cropped shortest), resume from a state
  written here by hand, argument handling and error messages.
Documents are short byte strings under the byte tokenizer of tests/data/conftest.py (BOS = 256).
"""
import pytest
import torch

from nanopipe.data.loader import (
    _document_batches,
    _pick_state,
)
from nanopipe.data.loader import (
    tokenizing_distributed_data_loader_with_state_bos_bestfit as loader,
)

BOS = 256


def take_batches(gen, n):
    return [next(gen) for _ in range(n)]


# ------------------------------------------------------------------------------------- _document_batches

@pytest.fixture
def corpus(tmp_path, make_shard):
    """shard 0: row groups [a0 a1 a2] [b0] [c0 c1]; shard 1: [d0 d1] [e0]."""
    s0 = make_shard(tmp_path / "shard_00000.parquet", [["a0", "a1", "a2"], ["b0"], ["c0", "c1"]])
    s1 = make_shard(tmp_path / "shard_00001.parquet", [["d0", "d1"], ["e0"]])
    return [str(s0), str(s1)]


def test_document_batches_rank0_of_1(corpus):
    gen = _document_batches(corpus, 0, 1, 2, (1, 0, 0, 0))
    got = [next(gen) for _ in range(8)]
    assert got == [
        ([(0, 0, 0), (0, 0, 1)], ["a0", "a1"], (1, 0, 0, 2)),  # a slice of 2, the group continues at row 2
        ([(0, 0, 2)], ["a2"], (1, 0, 1, 0)),                   # group done: next row group
        ([(0, 1, 0)], ["b0"], (1, 0, 2, 0)),
        ([(0, 2, 0), (0, 2, 1)], ["c0", "c1"], (1, 1, 0, 0)),  # shard done: next shard, this rank's first group
        ([(1, 0, 0), (1, 0, 1)], ["d0", "d1"], (1, 1, 1, 0)),
        ([(1, 1, 0)], ["e0"], (2, 0, 0, 0)),                   # last shard done: next epoch
        ([(0, 0, 0), (0, 0, 1)], ["a0", "a1"], (2, 0, 0, 2)),  # epoch 2 starts over
        ([(0, 0, 2)], ["a2"], (2, 0, 1, 0)),
    ]


def test_document_batches_rank1_of_2_from_a_cursor(corpus):
    # rank 1 of 2 reads row groups 1, 3, ... of each shard: [b0] of shard 0, [e0] of shard 1
    gen = _document_batches(corpus, 1, 2, 3, (1, 0, 1, 0))
    assert [next(gen) for _ in range(3)] == [
        ([(0, 1, 0)], ["b0"], (1, 1, 1, 0)),
        ([(1, 1, 0)], ["e0"], (2, 0, 1, 0)),
        ([(0, 1, 0)], ["b0"], (2, 1, 1, 0)),
    ]
    # rank 0 of 2 from mid row group (doc 1 of group 0 of shard 0), slices of 1
    gen = _document_batches(corpus, 0, 2, 1, (3, 0, 0, 1))
    assert [next(gen) for _ in range(5)] == [
        ([(0, 0, 1)], ["a1"], (3, 0, 0, 2)),
        ([(0, 0, 2)], ["a2"], (3, 0, 2, 0)),
        ([(0, 2, 0)], ["c0"], (3, 0, 2, 1)),
        ([(0, 2, 1)], ["c1"], (3, 1, 0, 0)),
        ([(1, 0, 0)], ["d0"], (3, 1, 0, 1)),
    ]


def test_document_batches_no_documents_for_a_rank(tmp_path, make_shard):
    one = str(make_shard(tmp_path / "shard_00000.parquet", [["x"]]))
    with pytest.raises(ValueError) as e:
        next(_document_batches([one], 1, 2, 4, (1, 0, 1, 0)))
    assert str(e.value) == (f"rank 1 of 2 found no documents in {[one]}: rank r reads row groups r, r+2, ... of each "
                            "shard, and these shards have too few row groups (or no rows)")
    # a pass that started mid-way (a resume cursor past the rank's documents) is not a full pass:
    # it wraps to the next epoch (6) and finds the documents there; after them comes epoch 7
    gen = _document_batches([one], 0, 1, 4, (5, 0, 1, 0))
    assert next(gen) == ([(0, 0, 0)], ["x"], (7, 0, 0, 0))
    # a full pass that found documents, however few, goes on to the next epoch
    gen = _document_batches([one], 0, 1, 4, (1, 0, 0, 0))
    assert [next(gen) for _ in range(3)] == [([(0, 0, 0)], ["x"], (e, 0, 0, 0)) for e in (2, 3, 4)]


def test_document_batches_empty_row_groups_only(tmp_path, make_shard):
    empty = str(make_shard(tmp_path / "shard_00000.parquet", [[], []]))
    with pytest.raises(ValueError, match="rank 0 of 1 found no documents"):
        next(_document_batches([empty], 0, 1, 4, (1, 0, 0, 0)))


# ------------------------------------------------------------------------------------------- _pick_state

def exact_state(rank, world, **kw):
    return {"version": 1, "rank": rank, "world_size": world, "epoch": 2, "pq_idx": 0, "rg_idx": rank,
            "doc_idx": 0, "shards": {}, "buffer": [], **kw}


def test_pick_state_exact_for_own_rank():
    states = [exact_state(0, 2, pq_idx=1), exact_state(1, 2, pq_idx=3)]
    assert _pick_state(states, 1, 2) == (states[1], None)
    assert _pick_state(tuple(states), 0, 2) == (states[0], None)
    assert _pick_state(states[0], 0, 2) == (states[0], None)  # a single dict, not a list


@pytest.mark.parametrize("change", [{"version": 2}, {"rank": 1}, {"world_size": 4}])
def test_pick_state_needs_version_rank_and_world_size(change, capsys):
    s = {**exact_state(0, 2), **change}  # epoch 2, shard 0, row group 0 not started
    assert _pick_state([s], 0, 2) == (None, (2, 0, 0, 0))


def test_pick_state_approximate_cursor(caplog):
    caplog.set_level("INFO", logger="nanopipe")  # print0 logs (stderr, the one log format)
    # furthest saved cursor by (epoch, pq_idx, rg_idx); a row group partly read (doc_idx > 0) is skipped,
    # one not started yet (doc_idx == 0) is not; then the first row group of this rank's stride from there
    states = [exact_state(0, 2, epoch=3, pq_idx=1, rg_idx=4, doc_idx=0),
              exact_state(1, 2, epoch=3, pq_idx=1, rg_idx=5, doc_idx=2),
              exact_state(0, 2, epoch=2, pq_idx=7, rg_idx=9, doc_idx=0)]
    assert _pick_state(states, 0, 3) == (None, (3, 1, 6, 0))   # first = 6: 6 is rank 0's
    assert _pick_state(states, 1, 3) == (None, (3, 1, 7, 0))
    assert _pick_state(states, 2, 3) == (None, (3, 1, 8, 0))
    out = caplog.text
    assert ("[loader] WARNING: resume state (rank 0/2, rank 1/2, rank 0/2) does not match rank 2 of 3: approximate "
            "resume from shard 1, row group 8 (buffered documents are dropped). Save gather_state_dicts(...) from "
            "the same world size for an exact resume.") in out
    # not started yet: that row group itself, if it is this rank's
    assert _pick_state([exact_state(0, 4, epoch=1, pq_idx=0, rg_idx=4, doc_idx=0)], 0, 2) == (None, (1, 0, 4, 0))
    assert _pick_state([exact_state(0, 4, epoch=1, pq_idx=0, rg_idx=4, doc_idx=0)], 1, 2) == (None, (1, 0, 5, 0))
    assert _pick_state([exact_state(0, 4, epoch=1, pq_idx=0, rg_idx=4, doc_idx=1)], 1, 2) == (None, (1, 0, 5, 0))
    assert _pick_state([exact_state(0, 4, epoch=1, pq_idx=0, rg_idx=4, doc_idx=1)], 0, 2) == (None, (1, 0, 6, 0))


def test_pick_state_nanochat_state(caplog):
    caplog.set_level("INFO", logger="nanopipe")
    # nanochat's {pq_idx, rg_idx[, epoch]}: rg_idx is the last row group read; no epoch means epoch 1
    assert _pick_state({"pq_idx": 2, "rg_idx": 3}, 0, 1) == (None, (1, 2, 4, 0))
    assert _pick_state({"pq_idx": 2, "rg_idx": 3, "epoch": 5}, 1, 2) == (None, (5, 2, 5, 0))
    assert _pick_state([{"pq_idx": 0, "rg_idx": 9, "epoch": 1}, {"pq_idx": 1, "rg_idx": 0}], 0, 1) == (None, (1, 1, 1, 0))
    assert "resume state (rank ?/?) does not match rank 0 of 1" in caplog.text


# ------------------------------------------------------------------------------------------- the loader

@pytest.fixture
def packing_corpus(tmp_path, make_shard):
    """Lengths with BOS: aaaa 5, b 2, cc 3 | ddddddd 8 (shard 0, two row groups); eee 4, ff 3 (shard 1)."""
    s0 = make_shard(tmp_path / "shard_00000.parquet", [["aaaa", "b", "cc"], ["ddddddd"]])
    s1 = make_shard(tmp_path / "shard_00001.parquet", [["eee", "ff"]])
    return [s0, s1]


def rows_of(inputs, targets):
    return torch.cat([inputs, targets[:, -1:]], dim=1).tolist()


def text(row):
    return "".join("|" if t == BOS else chr(t) for t in row)


SHARDS = {"0": "shard_00000.parquet", "1": "shard_00001.parquet"}


def test_hand_packed_rows_and_states(packing_corpus, byte_tokenizer):
    # B=2 rows of T+1 = 8 tokens, slices of 2 documents, refill while fewer than 3 are buffered.
    gen = loader(byte_tokenizer, 2, 7, packing_corpus, device="cpu", tokenizer_batch_size=2, buffer_size=3,
                 prefetch=0, rank=0, world_size=1)
    x, y, state = next(gen)
    assert x.shape == y.shape == (2, 7) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # row 0: buffer {aaaa, b, cc}: the longest that fits 8 is aaaa (5); after a refill (ddddddd) the
    #        longest that fits the remaining 3 is cc. row 1: ddddddd fills all 8.
    assert [text(r) for r in rows_of(x, y)] == ["|aaaa|cc", "|ddddddd"]
    # left in the buffer: b (shard 0, group 0, row 1), eee and ff (shard 1, group 0); the stream is at
    # the start of epoch 2
    assert state == {"version": 1, "rank": 0, "world_size": 1, "epoch": 2, "pq_idx": 0, "rg_idx": 0, "doc_idx": 0,
                     "shards": SHARDS, "buffer": [[0, 0, [1]], [1, 0, [0, 1]]]}
    x, y, state = next(gen)
    # row 0: eee (4), refill (epoch 2: aaaa, b), ff (3), then 1 slot that nothing fits: the shortest,
    #        the older b, cropped to its BOS. row 1: aaaa, refill (cc), refill (ddddddd), cc.
    assert [text(r) for r in rows_of(x, y)] == ["|eee|ff|", "|aaaa|cc"]
    assert state == {"version": 1, "rank": 0, "world_size": 1, "epoch": 2, "pq_idx": 1, "rg_idx": 0, "doc_idx": 0,
                     "shards": SHARDS, "buffer": [[0, 0, [1]], [0, 1, [0]]]}
    gen.close()


def test_resume_from_a_hand_written_state(packing_corpus, byte_tokenizer):
    # the second state above, written by hand: the buffer (b, ddddddd) is re-read, the stream continues
    # at shard 1; the next rows are what an uninterrupted loader gives after its second batch
    state = {"version": 1, "rank": 0, "world_size": 1, "epoch": 2, "pq_idx": 1, "rg_idx": 0, "doc_idx": 0,
             "shards": SHARDS, "buffer": [[0, 0, [1]], [0, 1, [0]]]}
    kw = dict(device="cpu", tokenizer_batch_size=2, buffer_size=3, prefetch=0, rank=0, world_size=1)
    resumed = loader(byte_tokenizer, 2, 7, packing_corpus, resume_state_dict=state, **kw)
    full = loader(byte_tokenizer, 2, 7, packing_corpus, **kw)
    for _ in range(2):
        next(full)
    for _ in range(3):
        (x, y, s), (fx, fy, fs) = next(resumed), next(full)
        assert rows_of(x, y) == rows_of(fx, fy) and s == fs
    # the first resumed batch by hand: row 0: refill (eee, ff), ddddddd; row 1: eee, refill (epoch 3:
    # aaaa, b), ff, and the 1 slot left takes the older b, cropped to its BOS. The stream stops after
    # the first 2 documents of epoch 3's first row group.
    x, y, s = next(loader(byte_tokenizer, 2, 7, packing_corpus, resume_state_dict=state, **kw))
    assert [text(r) for r in rows_of(x, y)] == ["|ddddddd", "|eee|ff|"]
    assert (s["epoch"], s["pq_idx"], s["rg_idx"], s["doc_idx"]) == (3, 0, 0, 2)
    assert s["buffer"] == [[0, 0, [0, 1]]]  # aaaa and b of epoch 3


def test_resume_state_past_the_shard_list(packing_corpus, byte_tokenizer):
    with pytest.raises(ValueError) as e:
        next(loader(byte_tokenizer, 1, 7, packing_corpus, device="cpu", rank=0, world_size=1,
                    resume_state_dict={"pq_idx": 2, "rg_idx": 0, "epoch": 1}))
    assert str(e.value) == "loader resume state points at shard 2 but only 2 shards were given"
    # a row group index beyond the number of shards is fine (it indexes row groups, not shards)
    x, y, _ = next(loader(byte_tokenizer, 1, 7, packing_corpus[:1], device="cpu", rank=0, world_size=1, prefetch=0,
                          buffer_size=1, resume_state_dict={"pq_idx": 0, "rg_idx": 0, "epoch": 1}))
    assert text(rows_of(x, y)[0]) == "|ddddddd"  # nanochat's rg_idx 0 was read: continue with group 1 of 1 shard


def test_arguments(packing_corpus, byte_tokenizer, tmp_path):
    kw = dict(device="cpu", tokenizer_batch_size=2, buffer_size=3, prefetch=0)
    x, y, _ = next(loader(byte_tokenizer, 2, 7, packing_corpus, rank=0, world_size=1, **kw))
    # one path as a str (or PathLike) is a list of one shard
    xs, ys, s = next(loader(byte_tokenizer, 1, 7, str(packing_corpus[0]), rank=0, world_size=1, **kw))
    assert text(rows_of(xs, ys)[0]) == "|aaaa|cc" and s["shards"] == {"0": "shard_00000.parquet"}
    # rank/world_size default to the torchrun environment: rank 0 of 1 here; either one missing asks it
    for r, w in ((None, None), (None, 1), (0, None)):
        xd, yd, s = next(loader(byte_tokenizer, 2, 7, packing_corpus, rank=r, world_size=w, **kw))
        assert torch.equal(xd, x) and torch.equal(yd, y) and (s["rank"], s["world_size"]) == (0, 1)
    with pytest.raises(ValueError) as e:
        next(loader(byte_tokenizer, 1, 7, [], **kw))
    assert str(e.value) == ("data loader got no shard paths (expected the train shards, or [the val shard], "
                            "from the data manifest)")
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError) as e:
        next(loader(byte_tokenizer, 1, 7, [packing_corpus[0], missing], **kw))
    assert str(e.value) == f"{missing}: shard not found; it is produced by the `download` stage (run `dvc repro download`)"


@pytest.mark.parametrize("docs, cursor", [(130, (8, 0, 0, 128)), (125, (9, 0, 0, 0))])
def test_default_slice_and_buffer_sizes(tmp_path, make_shard, byte_tokenizer, docs, cursor):
    # nanochat's defaults: slices of tokenizer_batch_size=128 documents, buffer_size=1000 documents.
    # One row group of 130 "x": slices 128 + 2 per epoch; 7 epochs (910) + 128 of epoch 8 fill the
    # buffer. Of 125: one slice per epoch; 8 epochs make exactly 1000, enough. A row of T+1 = 2 tokens
    # takes one document, leaving 999 or more, so no refill before the state is taken.
    path = make_shard(tmp_path / "shard_00000.parquet", [["x"] * docs])
    _, _, s = next(loader(byte_tokenizer, 1, 1, [path], device="cpu", prefetch=0, rank=0, world_size=1))
    assert (s["epoch"], s["pq_idx"], s["rg_idx"], s["doc_idx"]) == cursor


def test_batches_land_on_the_requested_device(packing_corpus, byte_tokenizer):
    # The rows are packed on the CPU and copied to `device` (a GPU in training). The meta device stands
    # in for that GPU here: the yielded tensors must live there, as long ids of shape (B, T).
    x, y, _ = next(loader(byte_tokenizer, 2, 7, packing_corpus, device="meta", tokenizer_batch_size=2,
                          buffer_size=3, prefetch=0, rank=0, world_size=1))
    assert x.device.type == y.device.type == "meta"
    assert x.shape == y.shape == (2, 7) and x.dtype == y.dtype == torch.long


def test_shard_without_text_column_names_the_shard(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"content": ["hello"]}), bad)
    with pytest.raises(ValueError) as e:
        next(_document_batches([str(bad)], 0, 1, 4, (1, 0, 0, 0)))
    assert str(e.value) == f"{bad}: parquet shard has no 'text' column (columns: ['content'])"
