"""FP8 training via torchao float8 (nanochat base_train --fp8), behind an explicit flag.

- `convert_to_fp8(model, recipe, device)`: swap eligible nn.Linear layers (in and out features
  both divisible by 16, which includes lm_head) for torchao Float8Linear. Call BEFORE
  torch.compile and before building the optimizer is not required (the weights are shared).
  Only on CUDA (H100-class tensor cores); anything else is refused with a clear error.
- `disable_fp8(model)`: context manager that temporarily swaps Float8 layers back to plain
  nn.Linear layers sharing the same weights, for evaluation and sampling in bf16. The pretrain
  stage wraps val bpb, CORE and sampling in it, as nanochat scripts/base_train.py @1ec0a34 does:
  the reported numbers are then measured at the eval precision, not through fp8 casts.
- `unsupported_reason(device)`: why fp8 training cannot run on `device` (None when it can).

Importing this module never needs torchao; only convert_to_fp8 does (through `_torchao()`, the one
place the library is reached). nanochat pins torchao==0.15.0 (pyproject.toml @1ec0a34), the floor
in our `gpu` extra.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from nanopipe.runtime import print0

RECIPES = ("tensorwise", "rowwise")


def _fp8_filter(mod: nn.Module, fqn: str) -> bool:
    return isinstance(mod, nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0


def unsupported_reason(device) -> str | None:
    """Why fp8 training cannot run on `device`, or None. torchao's float8 matmuls need CUDA tensor
    cores with fp8 (H100-class); on anything else there is nothing to convert to."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"FP8 training needs a CUDA GPU (H100-class, torchao float8); this run is on {device.type!r}"
    return None


def _torchao():
    """torchao's (Float8LinearConfig, convert_to_float8_training): the library boundary."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError("FP8 training needs torchao (nanochat pins torchao==0.15.0): "
                          "pip install 'torchao>=0.15' (see docs/gpu.md)") from e
    return Float8LinearConfig, convert_to_float8_training


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", device=None) -> tuple[int, int]:
    """Convert in place; returns (converted, skipped) Linear layer counts."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe must be one of {RECIPES}, got {recipe!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    why = unsupported_reason(device)
    if why is not None:
        raise ValueError(f"{why}. Turn the fp8 flag off for {device.type} runs.")
    Float8LinearConfig, convert_to_float8_training = _torchao()
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=_fp8_filter)
    converted = sum(1 for m in model.modules() if "Float8" in type(m).__name__)
    skipped = sum(1 for m in model.modules() if isinstance(m, nn.Linear)) - converted
    print0(f"✓ FP8 training enabled ({recipe} scaling) - converted {converted} layers, "
           f"skipped {skipped} (dims not divisible by 16)")
    return converted, skipped


@contextlib.contextmanager
def disable_fp8(model: nn.Module):
    """Swap every Float8 layer for an nn.Linear sharing its weight (and bias) for the duration."""
    found = []
    for name, module in model.named_modules():
        if "Float8" in type(module).__name__:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            found.append((parent, attr, module))
    if not found:
        yield
        return
    for parent, attr, fp8_module in found:
        linear = nn.Linear(fp8_module.in_features, fp8_module.out_features, bias=fp8_module.bias is not None,
                           device="meta")  # no allocation: the parameters are replaced just below
        linear.weight = fp8_module.weight
        if fp8_module.bias is not None:
            linear.bias = fp8_module.bias
        setattr(parent, attr, linear)
    try:
        yield
    finally:
        for parent, attr, fp8_module in found:
            setattr(parent, attr, fp8_module)
