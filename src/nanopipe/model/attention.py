"""Attention kernels behind one interface, in nanochat's flash-attention layout (B, T, H, D).

Backends, best first:
- FA3 from the HF `kernels` hub (`varunneal/flash-attention-3`), Hopper (SM90) only;
- FA2 from the `flash_attn` package, Ampere to Hopper (SM80-SM90; beyond, only when forced);
- PyTorch SDPA, everywhere (CPU, MPS, any GPU, fp32).
The flash kernels only take bf16/fp16 CUDA tensors; any other call uses SDPA. Which one a call
uses is `choose_backend` (pure: the test drives it with made-up hardware).

Sliding-window layers on SDPA need an explicit mask, which rules out SDPA's flash kernel: on a GPU
that is a large, silent slowdown (nanochat scripts/base_train.py @1ec0a34 warns "Your GPU
utilization will be terrible"). `sdpa_window_problem` says when a CUDA run would take that path; the
pretrain stage then stops unless `model.allow_sdpa_window` is true. On CPU and MPS SDPA is the only
path and nothing is said.

Public API (what the model and the Engine call):
    flash_attn.flash_attn_func(q, k, v, causal=False, window_size=(-1, -1))
    flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None,
                                       cache_seqlens=None, causal=False, window_size=(-1, -1), rows=None)
`window_size = (left, right)`: query i sees key j when i - left <= j <= i + right; -1 = unlimited.
The model always passes causal=True and (w, 0). `flash_attn_with_kvcache` writes k/v into the
cache at `cache_seqlens` in place and does NOT advance it (the model does, after its last layer).

Tests and users can force a backend with `set_impl('fa3'|'fa2'|'sdpa'|None)`, consulted on every
call, or at import with the environment variable NANOPIPE_ATTN_IMPL (which also skips loading
the kernels that are not wanted, e.g. to avoid a hub download).
"""
from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_VALID_IMPLS = (None, "fa3", "fa2", "sdpa")
_override_impl = os.environ.get("NANOPIPE_ATTN_IMPL") or None
if _override_impl not in _VALID_IMPLS:
    raise ValueError(f"NANOPIPE_ATTN_IMPL={_override_impl!r}: expected one of fa3, fa2, sdpa (or unset)")


def _load_flash_attention_3():
    """FA3 interface from the kernels hub, or (None, reason). Hopper only."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        major, _ = torch.cuda.get_device_capability()
        if major != 9:
            return None, f"FA3 needs Hopper (SM90), this GPU is SM{major}x"
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from kernels import get_kernel
        return get_kernel("varunneal/flash-attention-3").flash_attn_interface, None
    except Exception as e:  # missing package, no network, ABI mismatch: all mean "not available"
        return None, f"{type(e).__name__}: {e}"


def fa2_problem(capability: tuple[int, int], forced: bool) -> str | None:
    """Why FA2 is not used on a GPU of this compute capability, or None. flash_attn needs SM80+;
    above SM90 (Blackwell: SM100, SM120) its wheels may carry no kernels for the GPU, and nanochat
    itself runs SDPA there ("Blackwell (sm100) needs SDPA fallback", nanochat
    nanochat/flash_attention.py @1ec0a34), so FA2 is taken only when forced (NANOPIPE_ATTN_IMPL=fa2)."""
    major, minor = capability
    if major < 8:
        return f"FA2 needs SM80+, this GPU is SM{major}{minor}"
    if major > 9 and not forced:
        return (f"FA2 is used on SM80-SM90 only and this GPU is SM{major}{minor}, for which flash_attn wheels may "
                f"have no kernels; force it with NANOPIPE_ATTN_IMPL=fa2")
    return None


def _load_flash_attention_2(forced: bool = False):
    """FA2 functions from the `flash_attn` package, or (None, reason). SM80-SM90 unless forced."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        why = fa2_problem(torch.cuda.get_device_capability(), forced)
        if why is not None:
            return None, why
        from flash_attn import flash_attn_func as f2
        from flash_attn import flash_attn_with_kvcache as f2kv
        return SimpleNamespace(flash_attn_func=f2, flash_attn_with_kvcache=f2kv), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


_fa3, _fa2 = None, None
_reasons: list[str] = []
if torch.cuda.is_available():
    if _override_impl in (None, "fa3"):
        _fa3, _why = _load_flash_attention_3()
        if _fa3 is None:
            _reasons.append(f"FA3 unavailable ({_why})")
    if _fa3 is None and _override_impl in (None, "fa2"):
        _fa2, _why = _load_flash_attention_2(forced=_override_impl == "fa2")
        if _fa2 is None:
            _reasons.append(f"FA2 unavailable ({_why})")
    if _fa3 is None and _fa2 is None:
        logger.warning("Attention: " + "; ".join(_reasons or ["forced"]) + " -> using PyTorch SDPA "
                       "(correct, but sliding windows are slow; consider window_pattern='L')")
HAS_FA3 = _fa3 is not None
HAS_FA2 = _fa2 is not None
UNAVAILABLE = "; ".join(_reasons) or "no CUDA device"  # why neither flash backend loaded (for messages)


def set_impl(impl: str | None) -> None:
    """Force a backend for subsequent calls: 'fa3', 'fa2', 'sdpa', or None for automatic."""
    global _override_impl
    if impl not in _VALID_IMPLS:
        raise ValueError(f"attention impl must be one of fa3, fa2, sdpa or None, got {impl!r}")
    _override_impl = impl


def _use_fa3() -> bool:
    """nanochat's selector, kept for its tests: would a bf16 CUDA call go to FA3?"""
    if _override_impl == "fa3":
        assert HAS_FA3, "Cannot override to FA3: not available on this hardware"
        return True
    if _override_impl in ("sdpa", "fa2"):
        return False
    return HAS_FA3


def choose_backend(device_type: str, dtype: torch.dtype, has_fa3: bool, has_fa2: bool, override: str | None) -> str:
    """'fa3', 'fa2' or 'sdpa' for a call with q on `device_type` in `dtype` (pure: no hardware query)."""
    if override == "fa3":
        assert has_fa3, "Cannot override to FA3: not available on this hardware"
        return "fa3"
    if override == "fa2":
        assert has_fa2, "Cannot override to FA2: the flash_attn package is not usable here"
        return "fa2"
    if override == "sdpa":
        return "sdpa"
    if not (device_type == "cuda" and dtype in (torch.bfloat16, torch.float16)):
        return "sdpa"  # flash kernels take half precision CUDA tensors only
    return "fa3" if has_fa3 else "fa2" if has_fa2 else "sdpa"


def sdpa_window_problem(device_type: str, dtype: torch.dtype, window_sizes, seq_len: int, has_fa3: bool,
                        has_fa2: bool, override: str | None, unavailable: str = "") -> str | None:
    """Why a model with these per-layer `window_sizes` ((left, 0) each), run at `seq_len` on
    `device_type` with q in `dtype`, would put sliding-window layers on the slow masked SDPA path of
    a GPU; None when it would not (no window shorter than the sequence, a flash backend, or not CUDA:
    on CPU and MPS SDPA is the only path). Pure, so the decision is tested without a GPU."""
    if device_type != "cuda":
        return None
    windowed = sorted({w for w, _ in window_sizes if 0 <= w < seq_len})
    if not windowed:
        return None
    if choose_backend(device_type, dtype, has_fa3, has_fa2, override) != "sdpa":
        return None
    if override == "sdpa":
        cause = "SDPA is forced (NANOPIPE_ATTN_IMPL=sdpa)"
    elif dtype not in (torch.bfloat16, torch.float16):
        cause = f"the flash kernels take bf16/fp16 and this run computes in {dtype} (runtime.dtype)"
    else:
        cause = f"neither FA3 nor FA2 is available ({unavailable or 'not installed'})"
    n = sum(1 for w, _ in window_sizes if 0 <= w < seq_len)
    return (f"{n} of {len(window_sizes)} layers attend through a sliding window ({', '.join(map(str, windowed))} of "
            f"{seq_len} tokens, model.window_pattern) and on this CUDA device they would run on PyTorch SDPA with an "
            f"explicit mask, far slower than a flash kernel: {cause}")


def windowed_sdpa_problem(window_sizes, seq_len: int, device, dtype: torch.dtype) -> str | None:
    """`sdpa_window_problem` for this process's backends (dtype: what q reaches attention in, i.e. the
    autocast dtype, or fp32 without autocast)."""
    return sdpa_window_problem(torch.device(device).type, dtype, window_sizes, seq_len, HAS_FA3, HAS_FA2,
                               _override_impl, UNAVAILABLE)


def _flash_backend(q: torch.Tensor):
    """The flash module to use for this call, or None for SDPA."""
    name = choose_backend(q.device.type, q.dtype, HAS_FA3, HAS_FA2, _override_impl)
    return _fa3 if name == "fa3" else _fa2 if name == "fa2" else None


def backend_name(device=None, dtype: torch.dtype = torch.bfloat16) -> str:
    """Which backend a call with tensors on `device` in `dtype` would use (for status prints)."""
    probe = torch.empty(0, device=device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=dtype)
    mod = _flash_backend(probe)
    return "fa3" if mod is not None and mod is _fa3 else "fa2" if mod is not None else "sdpa"


def _first(y):
    # Some FA builds return (out, softmax_lse); we only want the output.
    return y[0] if isinstance(y, tuple) else y


# -----------------------------------------------------------------------------
# SDPA fallback (layout (B, H, T, D) inside)


def _sdpa_attention(q, k, v, window_size, enable_gqa):
    """Causal attention with an optional left window. Queries are aligned with the END of the
    keys (a cache or chunked prefill has Tk > Tq)."""
    Tq, Tk = q.size(2), k.size(2)
    window = window_size[0]
    # Fast path: plain causal attention over the whole sequence (training L-layers).
    if (window < 0 or window >= Tq) and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    # Single-token decode: causality is free; the window is a slice of the tail.
    if Tq == 1:
        if 0 <= window < Tk:
            start = max(0, Tk - (window + 1))
            k, v = k[:, :, start:], v[:, :, start:]
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=enable_gqa)
    # General case: explicit boolean mask (True = attend). Slow: no flash SDPA kernel with a mask.
    row = (Tk - Tq) + torch.arange(Tq, device=q.device).unsqueeze(1)
    col = torch.arange(Tk, device=q.device).unsqueeze(0)
    mask = col <= row
    if 0 <= window < Tk:
        mask = mask & ((row - col) <= window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """Attention over a full sequence. q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D)."""
    mod = _flash_backend(q)
    if mod is not None:
        return _first(mod.flash_attn_func(q, k, v, causal=causal, window_size=window_size))
    assert causal, "the SDPA fallback implements causal attention only (the model never asks otherwise)"
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = _sdpa_attention(q, k, v, window_size, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


class RowPositions:
    """Where the new tokens of each row of a per-row KV cache sit (row b's token t at
    cache_seqlens[b] + t), computed once per forward and shared by every layer: `qpos` (B, T),
    and for the SDPA fallback the key range `end` (one host sync, on first use) and one mask
    per window size (True = attend: causal, and within the left window)."""

    def __init__(self, cache_seqlens, T):
        self.qpos = cache_seqlens.long().unsqueeze(1) + torch.arange(T, device=cache_seqlens.device)
        self._end = None
        self._masks = {}

    @property
    def end(self):
        if self._end is None:
            self._end = int(self.qpos[:, -1].max().item()) + 1
        return self._end

    def mask(self, window):
        m = self._masks.get(window)
        if m is None:
            behind = self.qpos.unsqueeze(2) - torch.arange(self.end, device=self.qpos.device)  # (B, T, end)
            m = behind >= 0
            if 0 <= window < self.end:
                m = m & (behind <= window)
            m = self._masks[window] = m.unsqueeze(1)  # (B, 1, T, end): broadcast over heads
        return m


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                            causal=False, window_size=(-1, -1), rows=None):
    """Attention for inference against a KV cache (B, T_max, Hkv, D) per layer.

    Writes the new k/v at each row's position cache_seqlens[b] in place, attends over the
    prefix plus the new tokens, and leaves cache_seqlens unchanged. The flash kernels take
    per-row lengths natively. The SDPA fallback assumes every row sits at cache_seqlens[0]
    (the model's shared rotary offset does too) unless given `rows` (a RowPositions: the rows
    of a per-row KVCache, D14): then it writes row by row and masks each row's causal window.
    """
    mod = _flash_backend(q)
    if mod is not None:
        return _first(mod.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                                  causal=causal, window_size=window_size))
    assert causal, "the SDPA fallback implements causal attention only (the model never asks otherwise)"
    if rows is not None:
        return _sdpa_kvcache_rows(q, k_cache, v_cache, k, v, rows, window_size)
    T_new = q.size(1)
    pos = int(cache_seqlens[0].item())
    if pos + T_new > k_cache.size(1):
        raise ValueError(f"KV cache overflow: position {pos} + {T_new} new tokens > cache length {k_cache.size(1)}")
    if k is not None and v is not None:
        k_cache[:, pos:pos + T_new] = k
        v_cache[:, pos:pos + T_new] = v
    end = pos + T_new
    q_, k_, v_ = q.transpose(1, 2), k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2)
    y = _sdpa_attention(q_, k_, v_, window_size, enable_gqa=q_.size(1) != k_.size(1))
    return y.transpose(1, 2)


def _sdpa_kvcache_rows(q, k_cache, v_cache, k, v, rows, window_size):
    """SDPA against a cache whose rows sit at different positions: row b's new token t is at
    rows.qpos[b, t], sees keys at positions <= its own and, with a left window w, >= its own - w.
    Keys run to the longest row's end; shorter rows mask the rest off."""
    B, T_new = q.size(0), q.size(1)
    end = rows.end
    if end > k_cache.size(1):
        raise ValueError(f"KV cache overflow: a row reaches position {end} > cache length {k_cache.size(1)}")
    if k is not None and v is not None:
        batch = torch.arange(B, device=q.device).unsqueeze(1).expand(B, T_new)
        k_cache[batch, rows.qpos] = k
        v_cache[batch, rows.qpos] = v
    q_, k_, v_ = q.transpose(1, 2), k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2)
    y = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=rows.mask(window_size[0]),
                                       enable_gqa=q_.size(1) != k_.size(1))
    return y.transpose(1, 2)


flash_attn = SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache)
