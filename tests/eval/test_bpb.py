"""Bits per byte against a hand computation."""
import itertools
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nanopipe.eval.bpb import evaluate_bpb


class FixedLossModel(torch.nn.Module):
    """Per-token loss = 0.5 * (target id + 1): known numbers, no training involved."""

    def get_device(self):
        return torch.device("cpu")

    def forward(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return (0.5 * (y.clamp(min=0) + 1)).float().view(-1)


# ids 0..3 are ordinary tokens of 1, 2, 3, 1 bytes; id 4 is a special (BOS-like) token: 0 bytes
TOKEN_BYTES = torch.tensor([1, 2, 3, 1, 0], dtype=torch.int32)


def test_bpb_matches_hand_computation():
    x = torch.zeros(2, 3, dtype=torch.long)
    batches = [(x, torch.tensor([[0, 1, 4], [2, 3, 0]])),
               (x, torch.tensor([[4, 2, -1], [1, 1, 3]]))]
    # scored targets (bytes > 0): 0,1,2,3,0 | 2,1,1,3 ; the specials (4) and the ignored -1 drop out
    nats = sum(0.5 * (t + 1) for t in [0, 1, 2, 3, 0, 2, 1, 1, 3])
    nbytes = sum(int(TOKEN_BYTES[t]) for t in [0, 1, 2, 3, 0, 2, 1, 1, 3])
    assert nbytes == 16
    expected = nats / (math.log(2) * nbytes)
    assert evaluate_bpb(FixedLossModel(), batches, 2, TOKEN_BYTES) == pytest.approx(expected, rel=1e-6)
    # only the first `steps` batches count
    nats1 = sum(0.5 * (t + 1) for t in [0, 1, 2, 3, 0])
    assert evaluate_bpb(FixedLossModel(), batches, 1, TOKEN_BYTES) == pytest.approx(nats1 / (math.log(2) * 8), rel=1e-6)


def test_bpb_ignores_nan_loss_at_unscored_positions_and_is_inf_without_bytes():
    class NanAtSpecials(FixedLossModel):
        def forward(self, x, y, loss_reduction="mean"):
            loss = super().forward(x, y, loss_reduction)
            return torch.where(y.view(-1) == 4, torch.tensor(float("nan")), loss)

    y = torch.tensor([[4, 0, 4]])
    assert evaluate_bpb(NanAtSpecials(), [(y, y)], 1, TOKEN_BYTES) == pytest.approx(0.5 / math.log(2))
    only_specials = torch.tensor([[4, 4, -1]])
    assert evaluate_bpb(FixedLossModel(), [(only_specials, only_specials)], 1, TOKEN_BYTES) == float("inf")


def test_bpb_accepts_loader_triples_and_reports_short_iterators():
    y = torch.tensor([[1, 2]])
    assert evaluate_bpb(FixedLossModel(), [(y, y, {"state": 1})], 1, TOKEN_BYTES) == pytest.approx(
        (1.0 + 1.5) / (math.log(2) * 5))
    with pytest.raises(ValueError, match="ran out after 1 of 2"):
        evaluate_bpb(FixedLossModel(), [(y, y)], 2, TOKEN_BYTES)


def _worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        y = torch.tensor([[0, 1]]) if rank == 0 else torch.tensor([[2, 4]])
        out[rank] = evaluate_bpb(FixedLossModel(), [(y, y)], 1, TOKEN_BYTES)
    finally:
        dist.destroy_process_group()


def test_bpb_all_reduces_across_ranks():
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    expected = (0.5 + 1.0 + 1.5) / (math.log(2) * (1 + 2 + 3))  # both ranks see the global sums
    assert out[0] == pytest.approx(expected) and out[1] == pytest.approx(expected)


def test_bpb_of_a_tiny_gpt_on_loader_batches(tmp_path):
    """The real pieces together: nanopipe tokenizer + loader + GPT; bpb equals the sum done by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch.nn.functional as F

    from nanopipe.data.loader import tokenizing_distributed_data_loader_bos_bestfit
    from nanopipe.model.gpt import GPT, GPTConfig
    from nanopipe.tokenizer import Tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "hello world", "bits per byte of a tiny model"] * 6
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=300)
    shard = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"text": texts}), shard, row_group_size=6)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                              window_pattern="L"))
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    token_bytes = tok.token_bytes()

    def batches():
        return tokenizing_distributed_data_loader_bos_bestfit(tok, 2, 16, [shard], device="cpu", buffer_size=4,
                                                              rank=0, world_size=1)
    bpb = evaluate_bpb(model, batches(), 3, token_bytes)
    nats, nbytes = 0.0, 0
    for x, y in itertools.islice(batches(), 3):
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none")
        nb = token_bytes[y.reshape(-1)]
        nats += loss[nb > 0].sum().item()
        nbytes += nb.sum().item()
    assert 0 < bpb < float("inf")
    assert bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-4)
