"""The SDPA fallback against a naive attention written here: causal, windowed, KV cache, GQA."""
import math

import pytest
import torch

from nanopipe.model import attention
from nanopipe.model.attention import flash_attn
from nanopipe.model.kv_cache import KVCache


def naive_attention(q, k, v, window):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D); queries aligned with the end of the keys; query i sees
    key j when j <= i and (window < 0 or i - j <= window)."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    for t in range(Tq):
        i = Tk - Tq + t
        for j in range(Tk):
            if j > i or (window >= 0 and i - j > window):
                scores[:, :, t, j] = float("-inf")
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


def qkv(B, T, H, Hkv, D, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [-1, 12, 100, 0, 1, 5])
def test_func_matches_naive(H, Hkv, window):
    q, k, v = qkv(2, 12, H, Hkv, 8)
    y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    torch.testing.assert_close(y, naive_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [-1, 3])
def test_func_backward_matches_naive(window):
    q, k, v = qkv(2, 10, 4, 2, 8, grad=True)
    flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(window, 0)).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    naive_attention(q, k, v, window).square().sum().backward()
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [-1, 2, 6])
def test_kvcache_prefill_chunk_and_decode_match_naive(H, Hkv, window):
    B, D, T_max = 2, 8, 24
    q, k, v = qkv(B, 14, H, Hkv, D, seed=3)
    cache = KVCache(batch_size=B, num_heads=Hkv, seq_len=T_max, head_dim=D, num_layers=1, device="cpu",
                    dtype=torch.float32)
    k_cache, v_cache = cache.get_layer_cache(0)
    # prefill 7 tokens, then a chunk of 3 (Tq > 1 with Tk > Tq: the explicit mask path), then 4 single tokens
    for start, end in [(0, 7), (7, 10), (10, 11), (11, 12), (12, 13), (13, 14)]:
        y = flash_attn.flash_attn_with_kvcache(q[:, start:end], k_cache, v_cache, k=k[:, start:end],
                                               v=v[:, start:end], cache_seqlens=cache.cache_seqlens,
                                               causal=True, window_size=(window, 0))
        assert cache.get_pos() == start, "the attention call must not advance the cache"
        ref = naive_attention(q[:, start:end], k[:, :end], v[:, :end], window)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        cache.advance(end - start)
    assert cache.get_pos() == 14
    torch.testing.assert_close(k_cache[:, :14], k)  # written in place
    torch.testing.assert_close(v_cache[:, :14], v)


def test_kvcache_overflow_is_a_clear_error():
    cache = KVCache(1, 1, 4, 8, 1, "cpu", torch.float32)
    q, k, v = qkv(1, 5, 1, 1, 8)
    kc, vc = cache.get_layer_cache(0)
    with pytest.raises(ValueError, match="KV cache overflow"):
        flash_attn.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=cache.cache_seqlens, causal=True)


def test_kvcache_object_contract():
    cache = KVCache(batch_size=2, num_heads=4, seq_len=64, head_dim=32, num_layers=3, device="cpu", dtype=torch.float32)
    assert cache.cache_seqlens.dtype == torch.int32 and cache.n_layers == 3
    assert cache.get_layer_cache(1)[0].shape == (2, 64, 4, 32)
    cache.advance(16)
    assert cache.get_pos() == 16
    one = KVCache(1, 4, 32, 32, 3, "cpu", torch.float32)
    one.k_cache.normal_()
    one.advance(5)
    cache.reset()
    cache.prefill(one)
    assert cache.get_pos() == 5
    torch.testing.assert_close(cache.k_cache[:, 1, :5], one.k_cache[:, 0, :5])


def test_backend_selection_on_cpu():
    assert attention.backend_name("cpu") == "sdpa"
    assert attention._use_fa3() is attention.HAS_FA3
    attention.set_impl("sdpa")
    assert attention._use_fa3() is False
    with pytest.raises(ValueError, match="attention impl"):
        attention.set_impl("flash9")
    if not attention.HAS_FA3:
        attention.set_impl("fa3")
        with pytest.raises(AssertionError, match="FA3"):
            attention._use_fa3()
    if not attention.HAS_FA2:
        attention.set_impl("fa2")
        q, k, v = qkv(1, 4, 2, 2, 8)
        with pytest.raises(AssertionError, match="FA2"):
            flash_attn.flash_attn_func(q, k, v, causal=True)


# -- backend decisions, with the hardware as parameters (no GPU needed) ------------------------------

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("cap,forced,ok", [
    ((7, 5), False, False), ((7, 5), True, False),   # Turing: no FA2 at all
    ((8, 0), False, True), ((8, 6), False, True), ((8, 9), False, True), ((9, 0), False, True),
    ((10, 0), False, False), ((12, 0), False, False),  # Blackwell: wheels may lack kernels -> SDPA ...
    ((10, 0), True, True), ((12, 0), True, True),      # ... unless NANOPIPE_ATTN_IMPL=fa2 forces it
])
def test_fa2_is_used_on_sm80_to_sm90_unless_forced(cap, forced, ok):
    why = attention.fa2_problem(cap, forced)
    assert (why is None) == ok, why
    if cap[0] > 9 and not forced:
        assert f"SM{cap[0]}{cap[1]}" in why and "NANOPIPE_ATTN_IMPL=fa2" in why


@pytest.mark.parametrize("device,dtype,fa3,fa2,override,expected", [
    ("cuda", BF16, True, True, None, "fa3"), ("cuda", BF16, False, True, None, "fa2"),
    ("cuda", FP16, False, True, None, "fa2"), ("cuda", BF16, False, False, None, "sdpa"),
    ("cuda", FP32, True, True, None, "sdpa"),  # flash kernels take bf16/fp16 only
    ("cpu", BF16, True, True, None, "sdpa"), ("mps", BF16, False, False, None, "sdpa"),
    ("cuda", BF16, True, True, "sdpa", "sdpa"), ("cuda", BF16, True, True, "fa2", "fa2"),
])
def test_choose_backend(device, dtype, fa3, fa2, override, expected):
    assert attention.choose_backend(device, dtype, fa3, fa2, override) == expected


SSSL_2048 = [(1024, 0), (1024, 0), (1024, 0), (2048, 0)]  # GPT._compute_window_sizes for SSSL at T=2048
ALL_L = [(2048, 0)] * 4


def test_sdpa_window_problem_only_for_windowed_layers_on_a_gpu_without_flash():
    def problem(device="cuda", dtype=BF16, windows=SSSL_2048, fa3=False, fa2=False, override=None):
        return attention.sdpa_window_problem(device, dtype, windows, 2048, fa3, fa2, override, "FA3 unavailable (x)")

    why = problem()
    assert "3 of 4 layers" in why and "1024 of 2048" in why and "model.window_pattern" in why
    assert "neither FA3 nor FA2" in why and "FA3 unavailable (x)" in why
    assert problem(windows=ALL_L) is None  # full-context layers: SDPA's causal fast path
    assert problem(fa3=True) is None and problem(fa2=True) is None
    assert problem(device="cpu") is None and problem(device="mps") is None  # SDPA is the only path there
    assert "runtime.dtype" in problem(dtype=FP32, fa3=True)  # FA3 there, but fp32 q never reaches it
    assert "NANOPIPE_ATTN_IMPL=sdpa" in problem(fa3=True, override="sdpa")


def test_window_sizes_of_the_real_model_feed_the_check():
    from nanopipe.model.gpt import GPT, config_from_depth

    with torch.device("meta"):
        sssl = GPT(config_from_depth(4, 512, 2048, 64, 64, "SSSL"))
        full = GPT(config_from_depth(4, 512, 2048, 64, 64, "L"))
    assert attention.sdpa_window_problem("cuda", BF16, sssl.window_sizes, 2048, False, False, None) is not None
    assert attention.sdpa_window_problem("cuda", BF16, full.window_sizes, 2048, False, False, None) is None
