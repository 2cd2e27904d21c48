"""GPT: dimensions from depth, parameter counts, FLOPs, init, forward, KV-cache path, generate,
optimizer groups."""
import math

import pytest
import torch
from model_helpers import batch, tiny_config, tiny_model

from nanopipe.model.gpt import GPT, GPTConfig, config_from_depth, create_model, has_ve, maybe_compile
from nanopipe.model.kv_cache import KVCache
from nanopipe.model.optim import MuonAdamW


def meta_model(cfg):
    with torch.device("meta"):  # counts only: no memory, even at depth 26
        return GPT(cfg)


def expected_counts(depth, V, aspect=64, head_dim=128):
    """nanochat's sizing and parameter-count formulas (nanochat nanochat/gpt.py @1ec0a34), written out
    independently of the model code."""
    C = math.ceil(depth * aspect / head_dim) * head_dim
    H = C // head_dim
    Hkv, D = H, head_dim
    Vp = math.ceil(V / 64) * 64
    n_ve = math.ceil(depth / 2)
    per_layer = C * H * D + 2 * C * Hkv * D + C * C + 2 * (4 * C * C)  # q, k, v, proj, fc, mlp proj
    matrices = depth * per_layer + n_ve * 32 * Hkv                       # + ve_gate on VE layers
    counts = dict(wte=Vp * C, value_embeds=n_ve * Vp * Hkv * D, lm_head=Vp * C,
                  transformer_matrices=matrices, scalars=2 * depth)
    counts["total"] = sum(counts.values())
    return counts


@pytest.mark.parametrize("depth", [4, 12, 20, 26])
def test_param_counts_match_spec_formulas(depth):
    V = 4096 if depth == 4 else 32768
    model = meta_model(config_from_depth(depth, vocab_size=V, sequence_len=2048))
    assert model.num_scaling_params() == expected_counts(depth, V)


def test_param_counts_match_table():
    # derived from those formulas, V=32768: total and scaling params (matrices + lm_head), in millions
    table = {12: (286.26, 110.10), 20: (896.54, 435.16), 26: (1681.79, 918.43)}
    for depth, (total, scaling) in table.items():
        c = meta_model(config_from_depth(depth, 32768, 2048)).num_scaling_params()
        assert round(c["total"] / 1e6, 2) == total
        assert round((c["transformer_matrices"] + c["lm_head"]) / 1e6, 2) == scaling


def test_depth4_counts_and_flops_by_hand():
    # depth 4, aspect 64 -> C = 256, head_dim 128 -> H = Hkv = 2; V = Vp = 4096; seq 256, "SSSL"
    model = meta_model(config_from_depth(4, vocab_size=4096, sequence_len=256))
    c = model.num_scaling_params()
    assert c["wte"] == c["lm_head"] == 4096 * 256 == 1_048_576
    assert c["value_embeds"] == 2 * 4096 * 256 == 2_097_152                # VE on layers 1 and 3
    assert c["transformer_matrices"] == 4 * (4 * 256 * 256 + 2 * 256 * 1024) + 2 * 32 * 2 == 3_145_856
    assert c["scalars"] == 8 and c["total"] == 7_340_168
    # 6 x (lm_head + matrices) + 12*H*D*window per layer; windows S,S,S,L = 128,128,128,256
    assert model.estimate_flops() == 6 * (1_048_576 + 3_145_856) + 12 * 2 * 128 * (128 * 3 + 256) == 27_132_672


@pytest.mark.parametrize("depth,expected", [(12, 8.022e8), (20, 3.004e9), (26, 6.185e9)])
def test_flops_match_spec_table(depth, expected):
    flops = meta_model(config_from_depth(depth, 32768, 2048)).estimate_flops()
    assert abs(flops - expected) / expected < 1e-3


def test_config_from_depth():
    assert (lambda c: (c.n_embd, c.n_head, c.n_kv_head))(config_from_depth(6, 32768, 512, head_dim=64)) == (384, 6, 6)
    assert config_from_depth(12, 32768, 2048).n_embd == 768
    d20 = config_from_depth(20, 32768, 2048)
    assert (d20.n_embd, d20.n_head, d20.n_layer, d20.window_pattern) == (1280, 10, 20, "SSSL")
    d26 = config_from_depth(26, 32768, 2048)
    assert (d26.n_embd, d26.n_head) == (1664, 13)
    assert config_from_depth(3, 100, 64, aspect_ratio=10, head_dim=16).n_embd == 32  # 30 rounded up
    assert config_from_depth(4, 256, 64, n_kv_head=1).n_kv_head == 1
    with pytest.raises(ValueError, match="n_kv_head"):
        config_from_depth(4, 256, 64, n_kv_head=3)


def test_window_sizes_and_value_embedding_layers():
    m = meta_model(GPTConfig(sequence_len=100, n_layer=26, window_pattern="sssl"))
    assert m.window_sizes[:4] == [(50, 0), (50, 0), (50, 0), (100, 0)]
    assert m.window_sizes[24] == (50, 0) and m.window_sizes[25] == (100, 0)  # last layer forced long
    assert all(w == (100, 0) for w in meta_model(GPTConfig(sequence_len=100, n_layer=3, window_pattern="L")).window_sizes)
    with pytest.raises(ValueError, match="window_pattern"):
        meta_model(GPTConfig(window_pattern="SXL"))
    assert [i for i in range(5) if has_ve(i, 5)] == [0, 2, 4]
    assert sorted(m.value_embeds.keys(), key=int) == [str(i) for i in range(1, 26, 2)]


def test_vocab_padding():
    m = meta_model(tiny_config(vocab_size=250))
    assert m.transformer.wte.weight.shape[0] == m.lm_head.weight.shape[0] == 256


def test_init_weights():
    m = tiny_model()
    assert torch.all(m.resid_lambdas == 1.0) and torch.allclose(m.x0_lambdas, torch.full((2,), 0.1))
    for block in m.transformer.h:
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        bound = 3**0.5 * 64**-0.5
        assert block.attn.c_q.weight.abs().max() <= bound
    assert torch.all(m.transformer.h[1].attn.ve_gate.weight == 0) and m.transformer.h[0].attn.ve_gate is None
    assert 0.9 < m.transformer.wte.weight.std() < 1.1
    assert m.lm_head.weight.std() < 0.002
    assert m.cos.dtype == torch.bfloat16 and m.cos.shape == (1, 160, 1, 16)
    assert m.transformer.wte.weight.dtype == torch.float32  # bf16 storage only on CUDA


def test_forward_logits_and_losses():
    m = tiny_model(vocab_size=250)
    x, y = batch()
    x, y = x % 250, y % 250
    logits = m(x)
    assert logits.shape == (4, 16, 250) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # softcap
    loss = m(x, y)
    per_token = m(x, y, loss_reduction="none")
    assert per_token.shape == (64,)
    torch.testing.assert_close(loss, per_token.mean())
    y_masked = y.clone()
    y_masked[:, :8] = -1
    torch.testing.assert_close(m(x, y_masked), per_token.view(4, 16)[:, 8:].mean())
    # fresh init: the zeroed output projections make the model nearly uniform
    assert abs(loss.item() - math.log(250)) < 0.1


def test_kv_cache_path_matches_full_forward():
    # seq 16 and "SL": layer 0 has a window of 8, so prefill and decode cross the window edge
    m = tiny_model(n_head=4, n_kv_head=2)
    m.eval()
    x, _ = batch(B=2, T=14)
    with torch.no_grad():
        full = m(x)
        cache = KVCache(2, 2, 16, 16, 2, "cpu", torch.float32)
        pieces = [m(x[:, :9], kv_cache=cache)]
        assert cache.get_pos() == 9
        for t in range(9, 14):
            pieces.append(m(x[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_generate_greedy_and_seeded():
    m = tiny_model()
    m.eval()
    prompt = [1, 2, 3]
    greedy = list(m.generate(prompt, 4, temperature=0))
    ids = torch.tensor([prompt])
    for tok in greedy:  # greedy = argmax of the full forward at every step
        assert tok == m(ids)[0, -1].argmax().item()
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    a = list(m.generate(prompt, 6, temperature=1.0, top_k=5, seed=7))
    assert a == list(m.generate(prompt, 6, temperature=1.0, top_k=5, seed=7))
    assert all(isinstance(t, int) and 0 <= t < 256 for t in a)


def test_setup_optimizer_groups():
    m = tiny_model()
    opt = m.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2,
                            adam_betas=(0.8, 0.95), scalar_lr=0.5)
    assert isinstance(opt, MuonAdamW)
    scale = (64 / 768) ** -0.5
    adam = [g for g in opt.param_groups if g["kind"] == "adamw"]
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert [g["params"][0] is p for g, p in zip(adam, [m.lm_head.weight, m.transformer.wte.weight])] == [True, True]
    assert adam[0]["lr"] == pytest.approx(0.004 * scale) and adam[1]["lr"] == pytest.approx(0.3 * scale)
    assert adam[2]["lr"] == pytest.approx(0.3 * scale) and len(adam[2]["params"]) == 1  # one VE layer
    assert adam[3]["lr"] == pytest.approx(0.005) and adam[3]["betas"] == (0.8, 0.95)
    assert adam[4]["lr"] == 0.5 and adam[4]["betas"] == (0.96, 0.95)
    assert all(g["eps"] == 1e-10 and g["weight_decay"] == 0.0 for g in adam)
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert shapes == sorted(shapes) == [(2, 32), (64, 64), (64, 256), (256, 64)]
    assert [len(g["params"]) for g in muon] == [1, 8, 2, 2]
    assert all(g["momentum"] == 0.95 and g["ns_steps"] == 5 and g["beta2"] == 0.95 and g["weight_decay"] == 0.2
               for g in muon)
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(m.parameters()))


def test_training_reduces_loss():
    m = tiny_model()
    opt = m.setup_optimizer()
    x, y = batch()
    losses = []
    for _ in range(8):
        loss = m(x, y)
        loss.backward()
        opt.step()
        m.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_create_model_and_maybe_compile():
    m = create_model(tiny_config(), "cpu")
    assert next(m.parameters()).device.type == "cpu"
    assert maybe_compile(m, False) is m
    compiled = maybe_compile(m, True)  # lazy: nothing compiles until the first call
    assert compiled is not m and compiled._orig_mod is m
