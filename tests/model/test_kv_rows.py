"""GPT.forward over a per-row KV cache (D14): rows at their own positions give each row exactly
what it gets decoded alone. The reference is the shared-position path (a one-row cache), which is
what Engine.generate runs.

Tolerance: fp32, |difference| <= 1e-5 absolute + 1e-5 relative. The per-row path computes the
same arithmetic but attends through an explicit mask over the longest row's keys (masked keys add
exact zeros), so SDPA may pick another kernel and sum in another order: rounding-level
differences only. A wrong position, a missed window or a write into another row moves logits by
O(1) (the checks below would fail by orders of magnitude)."""
import pytest
import torch
from model_helpers import tiny_model

from nanopipe.model.kv_cache import KVCache

TOL = dict(atol=1e-5, rtol=1e-5)


def _model(**kw):
    # context 64: layer 0 is an S layer with a 32-token window, so rows past 32 exercise it
    model = tiny_model(seed=2, perturb=True, sequence_len=64, vocab_size=256, **kw)
    model.eval()
    return model


def _cache(model, rows, per_row):
    m = model.config
    return KVCache(batch_size=rows, num_heads=m.n_kv_head, seq_len=m.sequence_len, head_dim=m.n_embd // m.n_head,
                   num_layers=m.n_layer, device="cpu", dtype=torch.float32, per_row=per_row)


def _prompts(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kw", [dict(), dict(n_head=4, n_kv_head=2)], ids=["mha", "gqa"])
@torch.inference_mode()
def test_rows_at_their_own_positions_match_each_row_alone(kw):
    model = _model(**kw)
    lengths = (45, 4, 33, 31)  # past the window, short, just past it, just inside it
    prompts = _prompts(lengths)
    batched = _cache(model, len(prompts), per_row=True)
    alone = []
    for r, p in enumerate(prompts):  # prefill each row through its own view of the batched cache
        model.forward(torch.tensor([p]), kv_cache=batched.rows(r, r + 1))
        single = _cache(model, 1, per_row=False)
        model.forward(torch.tensor([p]), kv_cache=single)
        alone.append(single)
    assert batched.cache_seqlens.tolist() == list(lengths)
    g = torch.Generator().manual_seed(9)
    for _step in range(6):  # one token per row per step (the scheduler's decode step)
        ids = torch.randint(0, 256, (len(prompts), 1), generator=g)
        got = model.forward(ids, kv_cache=batched)
        for r in range(len(prompts)):
            want = model.forward(ids[r:r + 1], kv_cache=alone[r])
            torch.testing.assert_close(got[r:r + 1], want, **TOL)
    assert batched.cache_seqlens.tolist() == [n + 6 for n in lengths]


@torch.inference_mode()
def test_several_new_tokens_per_row_at_different_positions():
    """T > 1 (a chunk per row): causality inside the chunk and the window both per row."""
    model = _model()
    prompts = _prompts((10, 30, 1))
    batched, alone = _cache(model, 3, per_row=True), []
    for r, p in enumerate(prompts):
        model.forward(torch.tensor([p]), kv_cache=batched.rows(r, r + 1))
        single = _cache(model, 1, per_row=False)
        model.forward(torch.tensor([p]), kv_cache=single)
        alone.append(single)
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(3))
    got = model.forward(ids, kv_cache=batched)
    for r in range(3):
        torch.testing.assert_close(got[r:r + 1], model.forward(ids[r:r + 1], kv_cache=alone[r]), **TOL)
    # and the whole sequence without any cache agrees for the longest row (past the 32-token window)
    full = model.forward(torch.tensor([prompts[1] + ids[1].tolist()]))
    torch.testing.assert_close(got[1], full[0, -5:], **TOL)


@torch.inference_mode()
def test_a_one_row_view_is_exactly_the_shared_path():
    """A lone request decodes through the same arithmetic as Engine.generate: bit-identical."""
    model = _model()
    p = _prompts((20,))[0]
    big = _cache(model, 4, per_row=True)
    big.cache_seqlens[:] = torch.tensor([7, 0, 3, 9], dtype=torch.int32)  # other rows' state must not matter
    view = big.rows(1, 2)
    single = _cache(model, 1, per_row=False)
    assert torch.equal(model.forward(torch.tensor([p]), kv_cache=view),
                       model.forward(torch.tensor([p]), kv_cache=single))
    for t in (5, 77, 200):
        assert torch.equal(model.forward(torch.tensor([[t]]), kv_cache=view),
                           model.forward(torch.tensor([[t]]), kv_cache=single))
    assert big.cache_seqlens.tolist() == [7, 23, 3, 9]


def test_rows_view_and_move():
    model = _model()
    c = _cache(model, 3, per_row=True)
    c.k_cache[:, 2, :5] = 1.0
    c.cache_seqlens[2] = 5
    c.move(2, 0, 5)
    assert torch.equal(c.k_cache[:, 0, :5], c.k_cache[:, 2, :5]) and c.cache_seqlens.tolist() == [5, 0, 5]
    v = c.rows(1, 3)
    v.advance(2)
    assert c.cache_seqlens.tolist() == [5, 2, 7] and v.batch_size == 2
    with pytest.raises(ValueError, match="outside"):
        c.rows(2, 4)


@torch.inference_mode()
def test_per_row_overflow_is_an_error():
    model = _model()
    c = _cache(model, 2, per_row=True)
    c.cache_seqlens[:] = torch.tensor([63, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model.forward(torch.tensor([[1, 2], [3, 4]]), kv_cache=c)
