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


def test_pick_state_approximate_cursor(capsys):
    # furthest saved cursor by (epoch, pq_idx, rg_idx); a row group partly read (doc_idx > 0) is skipped,
    # one not started yet (doc_idx == 0) is not; then the first row group of this rank's stride from there
    states = [exact_state(0, 2, epoch=3, pq_idx=1, rg_idx=4, doc_idx=0),
              exact_state(1, 2, epoch=3, pq_idx=1, rg_idx=5, doc_idx=2),
              exact_state(0, 2, epoch=2, pq_idx=7, rg_idx=9, doc_idx=0)]
    assert _pick_state(states, 0, 3) == (None, (3, 1, 6, 0))   # first = 6: 6 is rank 0's
    assert _pick_state(states, 1, 3) == (None, (3, 1, 7, 0))
    assert _pick_state(states, 2, 3) == (None, (3, 1, 8, 0))
    out = capsys.readouterr().out
    assert ("[loader] WARNING: resume state (rank 0/2, rank 1/2, rank 0/2) does not match rank 2 of 3: approximate "
            "resume from shard 1, row group 8 (buffered documents are dropped). Save gather_state_dicts(...) from "
            "the same world size for an exact resume.") in out
    # not started yet: that row group itself, if it is this rank's
    assert _pick_state([exact_state(0, 4, epoch=1, pq_idx=0, rg_idx=4, doc_idx=0)], 0, 2) == (None, (1, 0, 4, 0))
    assert _pick_state([exact_state(0, 4, epoch=1, pq_idx=0, rg_idx=4, doc_idx=0)], 1, 2) == (None, (1, 0, 5, 0))
    assert _pick_state([exact_state(0, 4, epoch=1, pq_idx=0, rg_idx=4, doc_idx=1)], 1, 2) == (None, (1, 0, 5, 0))
    assert _pick_state([exact_state(0, 4, epoch=1, pq_idx=0, rg_idx=4, doc_idx=1)], 0, 2) == (None, (1, 0, 6, 0))


def test_pick_state_nanochat_state(capsys):
    # nanochat's {pq_idx, rg_idx[, epoch]}: rg_idx is the last row group read; no epoch means epoch 1
    assert _pick_state({"pq_idx": 2, "rg_idx": 3}, 0, 1) == (None, (1, 2, 4, 0))
    assert _pick_state({"pq_idx": 2, "rg_idx": 3, "epoch": 5}, 1, 2) == (None, (5, 2, 5, 0))
    assert _pick_state([{"pq_idx": 0, "rg_idx": 9, "epoch": 1}, {"pq_idx": 1, "rg_idx": 0}], 0, 1) == (None, (1, 1, 1, 0))
    assert "resume state (rank ?/?) does not match rank 0 of 1" in capsys.readouterr().out
