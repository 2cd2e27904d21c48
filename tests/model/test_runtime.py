"""Runtime helpers (device, dtype, dist info, peak FLOPs, printing) and the FP8 switch."""
import logging
import math

import pytest
import torch
import torch.nn as nn
from model_helpers import tiny_model

from nanopipe import runtime
from nanopipe.model import fp8


@pytest.mark.parametrize("name,flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 836e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA B200", 2.25e15), ("NVIDIA GB200", 2.5e15), ("AMD Instinct MI300X", 1.3074e15),
])
def test_peak_flops_table(name, flops):
    assert runtime.get_peak_flops(name) == flops


def test_peak_flops_unknown_is_inf_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert math.isinf(runtime.get_peak_flops("Mystery Accelerator 9000"))
    assert "MFU will show as 0%" in caplog.text


def test_device_and_dtype_on_cpu():
    assert runtime.autodetect_device_type() == ("cuda" if torch.cuda.is_available() else
                                                "mps" if torch.backends.mps.is_available() else "cpu")
    native = runtime.cpu_has_native_bf16()
    assert runtime.compute_dtype("cpu") == runtime.compute_dtype("cpu", "auto") == (torch.bfloat16 if native else torch.float32)
    assert runtime.compute_dtype("cpu", "bfloat16") == torch.bfloat16
    assert runtime.compute_dtype("cpu", "float32") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype override 'float8'"):
        runtime.compute_dtype("cpu", "float8")
    with runtime.autocast_ctx("cpu", torch.bfloat16):  # weights stay fp32, matmuls run in bf16
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    with runtime.autocast_ctx("cpu", torch.float32):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    assert runtime.get_max_memory("cpu") == 0


def test_native_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open
    for flags, expected in (("fpu sse avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda f, *a, p=cpuinfo, **k: real_open(p if f == "/proc/cpuinfo" else f, *a, **k))
        assert runtime.cpu_has_native_bf16() is expected
        assert runtime.compute_dtype("cpu") == (torch.bfloat16 if expected else torch.float32)


def test_dist_info_and_print0(monkeypatch, capsys, caplog):
    """print0 logs (stderr, the one format; stdout is for what a command answers) on rank 0 only."""
    caplog.set_level("INFO", logger="nanopipe")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert runtime.get_dist_info() == (False, 0, 0, 1)
    runtime.print0("hello")
    runtime.print0("part ", end="")  # a line printed in pieces is one record once it ends
    runtime.print0("two\nthree")
    assert [r.getMessage() for r in caplog.records] == ["hello", "part two", "three"]
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert runtime.get_dist_info() == (True, 1, 1, 4)
    runtime.print0("hidden")
    assert len(caplog.records) == 3


def test_compute_init_single_process(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ddp, rank, local_rank, world, device = runtime.compute_init("cpu")
    assert (ddp, rank, local_rank, world, device) == (False, 0, 0, 1, torch.device("cpu"))
    a = torch.rand(3)
    torch.manual_seed(42)
    assert torch.equal(a, torch.rand(3))  # seeded with 42
    runtime.compute_cleanup()  # no-op without a process group
    with pytest.raises(ValueError, match="device_type"):
        runtime.compute_init("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="use device_type='cpu'"):
            runtime.compute_init("cuda")


def test_seed_everything():
    runtime.seed_everything(7)
    a = torch.rand(2)
    runtime.seed_everything(7)
    assert torch.equal(a, torch.rand(2))


def test_fp8_is_refused_on_cpu_with_a_clear_message():
    model = tiny_model()
    with pytest.raises(ValueError, match="FP8 training needs a CUDA GPU.*'cpu'"):
        fp8.convert_to_fp8(model, "tensorwise")
    with pytest.raises(ValueError, match="recipe"):
        fp8.convert_to_fp8(model, "columnwise")


class Float8Linear(nn.Linear):
    """Stand-in for torchao's Float8Linear (only the class name and Linear attributes matter here)."""


def test_disable_fp8_swaps_in_plain_linears_sharing_weights():
    model = tiny_model()
    with fp8.disable_fp8(model):  # nothing to do without Float8 layers
        pass
    original = model.transformer.h[0].mlp.c_fc
    fake = Float8Linear(64, 256, bias=False)
    fake.weight = original.weight
    model.transformer.h[0].mlp.c_fc = fake
    with fp8.disable_fp8(model):
        swapped = model.transformer.h[0].mlp.c_fc
        assert type(swapped) is nn.Linear and swapped.weight is original.weight
    assert model.transformer.h[0].mlp.c_fc is fake
