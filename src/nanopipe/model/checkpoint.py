"""Checkpoints: one directory per checkpoint, written atomically, verified on load.

    <ckpt_dir>/
      model.pt    state_dict of the uncompiled model (no `_orig_mod.` prefix, no rotary buffers)
      optim.pt    optimizer state in its world-size independent (full, unsharded) form; optional
      rng.pt      RNG states of every rank (python, numpy, torch CPU, CUDA); optional
      meta.json   caller's meta + model_config, world_size, format, and size/sha256 of every file
      steps/step_XXXXXX/   a training stage's earlier checkpoints (weights + meta), kept at save_every

Differences from nanochat on purpose:
- one directory, renamed into place only when complete (nanopipe.artifacts.atomic_dir), so a
  crash never leaves a half checkpoint that a resume would trust;
- the optimizer state is gathered to a full form on save and re-sliced on load, so a run saved
  with N ranks resumes with M (docs/decisions.md, D7);
- files are checked against the sizes/hashes in meta.json and loaded with weights_only=True, so
  a truncated or corrupted file is refused with an error naming it.
Non-finite floats in meta (e.g. min_val_bpb = inf before any eval) are written as JSON null.

API used by the stages:
    save_checkpoint(ckpt_dir, model, optimizer=None, meta=None, save_rng=True) -> Path
        collective under torch.distributed (every rank calls it; rank 0 writes)
    load_checkpoint(ckpt_dir, model, optimizer=None, restore_rng=True, verify=True) -> meta
        resume: loads into an existing (possibly compiled) model and optimizer
    load_model(ckpt_dir, device, phase, tokenizer=None, verify=True) -> (model, meta)
        eval/finetune: builds the GPT from meta['model_config']
    checkpoint_at(ckpt_dir, step) -> the final checkpoint (step -1) or the one kept at `step`
    read_meta(ckpt_dir) / step_dir(root, step) / find_last_step(root)
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist

from nanopipe.artifacts import atomic_dir, read_json, write_json, writing
from nanopipe.config import ConfigError
from nanopipe.model.gpt import GPT, GPTConfig
from nanopipe.model.optim import DistMuonAdamW
from nanopipe.runtime import log0

logger = logging.getLogger(__name__)

MODEL_FILE, OPTIM_FILE, RNG_FILE, META_FILE = "model.pt", "optim.pt", "rng.pt", "meta.json"
HISTORY_DIR = "steps"  # <ckpt_dir>/steps/step_XXXXXX: the checkpoints a training run kept on its way
CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt, or does not fit the model."""


class UnknownStep(CheckpointError, ConfigError):
    """A configured step (base_eval.step, ...) that the run did not keep: a config error, reported in one line."""


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the real module


def _strip_prefix(sd: dict) -> dict:
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


# -----------------------------------------------------------------------------
# RNG state (so a resume continues the same random streams)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: never touch the other GPUs
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy as np
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# -----------------------------------------------------------------------------
# Save


class _HashingWriter:
    """File wrapper that hashes bytes as torch.save streams them (no second read of big files)."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.nbytes += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _save_file(obj, path: Path, final: Path) -> dict:
    """torch.save `obj` to `path` (in the temp dir); `final` is where it will live, for the error of a full disk
    (torch reports one as "unexpected pos ..."; nanopipe.artifacts.writing names the file and says why)."""
    with writing(final), open(path, "wb") as f:
        w = _HashingWriter(f)
        torch.save(obj, w)
    return {"bytes": w.nbytes, "sha256": w.sha.hexdigest()}


def save_checkpoint(ckpt_dir, model, optimizer=None, meta: dict | None = None, save_rng: bool = True,
                    history=None) -> Path:
    """Write model (+ optimizer, + RNG states) and meta to `ckpt_dir`, replacing it atomically.

    history: a directory of step_XXXXXX checkpoints (Resume's kept snapshots) moved in as
    `<ckpt_dir>/steps/`, inside the same atomic rename: the final checkpoint and the run's earlier
    ones appear together; meta.json lists their steps as `history_steps`.

    model: the GPT (compiled or not). optimizer: MuonAdamW / DistMuonAdamW or None.
    meta: JSON-able dict; by convention {step, val_bpb, user_config, device_batch_size,
    max_seq_len, dataloader_state_dict, loop_state}. `model_config`, `world_size` and `format`
    are added here. Under torch.distributed EVERY rank must call this (the optimizer state and
    the RNG states are gathered); only rank 0 writes, and all ranks return after it is on disk.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, world = _dist()
    raw = _unwrap(model)
    optim_sd = None
    if optimizer is not None:
        optim_sd = optimizer.state_dict(rank0_only=True) if isinstance(optimizer, DistMuonAdamW) else optimizer.state_dict()
    rngs = None
    if save_rng:
        mine = rng_state()
        if world > 1:
            rngs = [None] * world if rank == 0 else None
            dist.gather_object(mine, rngs, dst=0)
        else:
            rngs = [mine]
    if rank == 0:
        with atomic_dir(ckpt_dir) as tmp:
            files = {MODEL_FILE: _save_file(_strip_prefix(raw.state_dict()), tmp / MODEL_FILE, ckpt_dir / MODEL_FILE)}
            if optim_sd is not None:
                files[OPTIM_FILE] = _save_file(optim_sd, tmp / OPTIM_FILE, ckpt_dir / OPTIM_FILE)
            if rngs is not None:
                files[RNG_FILE] = _save_file({"world_size": world, "states": rngs}, tmp / RNG_FILE, ckpt_dir / RNG_FILE)
            full_meta = dict(meta or {})
            if history is not None and Path(history).is_dir():
                shutil.move(str(history), str(tmp / HISTORY_DIR))
                full_meta["history_steps"] = history_steps(tmp)
            full_meta.update(model_config=asdict(raw.config), world_size=world, format=CHECKPOINT_FORMAT, files=files)
            write_json(tmp / META_FILE, full_meta)
        log0(f"Saved checkpoint to {ckpt_dir} ({', '.join(files)})")
    if world > 1:
        dist.barrier()  # nobody reads or moves on before the directory is in place
    return ckpt_dir


# -----------------------------------------------------------------------------
# Load


def read_meta(ckpt_dir) -> dict:
    """meta.json of a checkpoint, with a clear error when the directory is not a checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META_FILE
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    if not path.exists():
        raise CheckpointError(f"{path}: missing; {ckpt_dir} is not a complete nanopipe checkpoint")
    try:
        meta = read_json(path)
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or "files" not in meta:
        raise CheckpointError(f"{path}: not a nanopipe checkpoint meta (format {CHECKPOINT_FORMAT} with a 'files' table expected)")
    return meta


def _verify_file(ckpt_dir: Path, meta: dict, name: str, verify: bool) -> Path:
    path = ckpt_dir / name
    info = meta["files"].get(name)
    if info is None:
        raise CheckpointError(f"{path}: this checkpoint has no {name} (meta.json lists {sorted(meta['files'])})")
    if not path.exists():
        raise CheckpointError(f"{path}: missing although meta.json lists it; the checkpoint is incomplete")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise CheckpointError(f"{path}: truncated or altered: {size} bytes on disk, {info['bytes']} expected; "
                              "delete the checkpoint and re-run the stage that wrote it")
    if verify:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                sha.update(block)
        if sha.hexdigest() != info["sha256"]:
            raise CheckpointError(f"{path}: corrupt: sha256 {sha.hexdigest()[:16]}... does not match "
                                  f"{info['sha256'][:16]}... recorded at save time")
    return path


def _torch_load(path: Path, map_location, mmap: bool = False):
    # mmap only where the tensors are copied out afterwards (resume); never for tensors we keep.
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e}); the file is corrupt, "
                              "truncated, or not a nanopipe checkpoint file") from e


def load_checkpoint(ckpt_dir, model, optimizer=None, restore_rng: bool = True, verify: bool = True) -> dict:
    """Resume: load weights into `model` (compiled or not; dtypes/devices are converted to the
    model's), optimizer state into `optimizer` (re-sharded for the current world size), and this
    rank's RNG state when the world size is unchanged. Returns the meta dict.

    Call after building the model (and optimizer) exactly as the saving run did.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    rank, world = _dist()
    raw = _unwrap(model)
    saved_cfg, cfg = meta.get("model_config", {}), asdict(raw.config)
    diff = {k: (saved_cfg.get(k), v) for k, v in cfg.items() if saved_cfg.get(k) != v}
    if diff:
        raise CheckpointError(f"{ckpt_dir / META_FILE}: model_config differs from the model being resumed "
                              f"(key: (checkpoint, current)): {diff}")
    sd = _torch_load(_verify_file(ckpt_dir, meta, MODEL_FILE, verify), "cpu", mmap=True)
    raw.load_state_dict(_strip_prefix(sd), strict=True)
    del sd
    if optimizer is not None:
        osd = _torch_load(_verify_file(ckpt_dir, meta, OPTIM_FILE, verify), "cpu", mmap=True)
        saved_world = meta.get("world_size", 1)
        try:
            optimizer.load_state_dict(osd)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt_dir / OPTIM_FILE}: cannot resume optimizer saved with world size "
                                  f"{saved_world} on world size {world}: {e}") from e
        del osd
    if restore_rng and RNG_FILE in meta["files"]:
        rng = _torch_load(_verify_file(ckpt_dir, meta, RNG_FILE, verify), "cpu")
        if rng["world_size"] == world:
            set_rng_state(rng["states"][rank])
        else:
            log0(f"{ckpt_dir / RNG_FILE}: RNG states saved with world size {rng['world_size']}, resuming with "
                 f"{world}: not restored (weights, optimizer and data position are; only random streams differ)",
                 logging.WARNING)
    log0(f"Resumed from {ckpt_dir} (step {meta.get('step')}, saved with world size {meta.get('world_size')}, now {world})")
    return meta


def _patch_missing_config_keys(cfg: dict) -> None:
    if "window_pattern" not in cfg:
        cfg["window_pattern"] = "L"  # checkpoints from before sliding windows used full attention
        log0("Patching missing window_pattern in model config to 'L'")


def _patch_missing_keys(sd: dict, config: GPTConfig) -> None:
    if "resid_lambdas" not in sd:
        sd["resid_lambdas"] = torch.ones(config.n_layer)
        log0("Patching missing resid_lambdas in model data to 1.0")
    if "x0_lambdas" not in sd:
        sd["x0_lambdas"] = torch.zeros(config.n_layer)
        log0("Patching missing x0_lambdas in model data to 0.0")


def load_model(ckpt_dir, device, phase: str, tokenizer=None, verify: bool = True):
    """Build the GPT saved in `ckpt_dir` on `device` for phase 'train' or 'eval'.

    bf16 tensors are upcast to fp32 on CPU/MPS. When a tokenizer is passed its vocab size must
    match the model's. Returns (model, meta).
    """
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    ckpt_dir = Path(ckpt_dir)
    device = torch.device(device)
    meta = read_meta(ckpt_dir)
    cfg = dict(meta.get("model_config") or {})
    _patch_missing_config_keys(cfg)
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise CheckpointError(f"{ckpt_dir / META_FILE}: model_config has keys this nanopipe does not know: {unknown}")
    config = GPTConfig(**cfg)
    sd = _torch_load(_verify_file(ckpt_dir, meta, MODEL_FILE, verify), device)
    if device.type in ("cpu", "mps"):
        sd = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in sd.items()}
    sd = _strip_prefix(sd)
    _patch_missing_keys(sd, config)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rotary buffers (not saved)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_dir / MODEL_FILE}: does not match model_config in meta.json: {e}") from e
    model.train() if phase == "train" else model.eval()
    if tokenizer is not None and tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointError(f"{ckpt_dir}: tokenizer vocab size {tokenizer.get_vocab_size()} does not match the "
                              f"model's vocab_size {config.vocab_size} (was the tokenizer retrained?)")
    log0(f"Loaded model from {ckpt_dir} (step {meta.get('step')}, config {cfg})")
    return model, meta


# -----------------------------------------------------------------------------
# Step directories for periodic/resume checkpoints


def step_dir(root, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def history_steps(ckpt_dir) -> list[int]:
    """Steps of the complete checkpoints under <ckpt_dir>/steps/, ascending."""
    return history_steps_in(Path(ckpt_dir) / HISTORY_DIR)


def history_steps_in(root) -> list[int]:
    """Steps of the complete step_XXXXXX checkpoints directly under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / META_FILE).exists())


def checkpoint_at(ckpt_dir, step: int = -1, key: str = "step") -> Path:
    """The checkpoint directory of `ckpt_dir` at `step` (nanochat's --step): -1, or the final step, is
    `ckpt_dir` itself; an earlier step is <ckpt_dir>/steps/step_XXXXXX, when the training run kept it.
    `key` names the config key in the error for a step the run did not keep."""
    ckpt_dir = Path(ckpt_dir)
    if step == -1:
        return ckpt_dir
    meta = read_meta(ckpt_dir)
    if meta.get("step") == step:
        return ckpt_dir
    kept = history_steps(ckpt_dir)
    if step in kept:
        return step_dir(ckpt_dir / HISTORY_DIR, step)
    raise UnknownStep(f"`{key}` = {step}: {ckpt_dir} has no checkpoint at that step; it has steps "
                      f"{kept + [meta.get('step')]} (a training stage keeps one every save_every steps, as many as "
                      f"its keep_checkpoints says)")


def find_last_step(root) -> int | None:
    """Largest step with a complete checkpoint (meta.json present) under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [int(m.group(1)) for p in root.iterdir()
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / META_FILE).exists()]
    return max(steps) if steps else None
