"""Checkpoints: atomic directory, bit-identical CPU resume, load_model, refusal of damaged files."""
import json
import random

import pytest
import torch
from model_helpers import tiny_model
from model_helpers import train_steps as helpers_train_steps

from nanopipe.artifacts import sha256_file
from nanopipe.model.checkpoint import (
    CheckpointError,
    find_last_step,
    load_checkpoint,
    load_model,
    read_meta,
    save_checkpoint,
    step_dir,
)


def random_batch():
    """Drawn from the global RNGs, so a resume is identical only if they are restored."""
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    y[0, random.randrange(16)] = -1
    return x, y


def train_steps(model, opt, steps, start=0):
    return helpers_train_steps(model, opt, steps, start, next_batch=random_batch)


def saved(tmp_path, steps=2):
    model = tiny_model()
    opt = model.setup_optimizer(weight_decay=0.1)
    torch.manual_seed(123)
    random.seed(123)
    train_steps(model, opt, steps)
    ckpt = save_checkpoint(step_dir(tmp_path / "ckpts", steps), model, opt,
                           meta={"step": steps, "val_bpb": None, "loop_state": {"min_val_bpb": float("inf")},
                                 "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 3, "epoch": 1}})
    return model, opt, ckpt


def test_save_layout_and_meta(tmp_path):
    model, _, ckpt = saved(tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.pt", "optim.pt", "rng.pt"]
    assert [p.name for p in ckpt.parent.iterdir()] == ["step_000002"]  # no temp leftovers
    meta = read_meta(ckpt)
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["format"] == 1
    assert meta["model_config"]["n_embd"] == 64 and meta["model_config"]["window_pattern"] == "SL"
    assert meta["loop_state"]["min_val_bpb"] is None  # inf is written as JSON null
    assert meta["dataloader_state_dict"] == {"pq_idx": 0, "rg_idx": 3, "epoch": 1}
    for name in ("model.pt", "optim.pt", "rng.pt"):
        assert meta["files"][name]["sha256"] == sha256_file(ckpt / name)
    sd = torch.load(ckpt / "model.pt", weights_only=True)
    assert "cos" not in sd and not any(k.startswith("_orig_mod.") for k in sd)
    assert find_last_step(tmp_path / "ckpts") == 2 and find_last_step(tmp_path / "nothing") is None


def test_resume_is_bit_identical_on_cpu(tmp_path):
    model, opt, ckpt = saved(tmp_path, steps=2)
    straight = train_steps(model, opt, 3, start=2)
    torch.manual_seed(999)  # scramble the RNGs: the checkpoint must restore them
    random.seed(999)
    resumed_model = tiny_model(seed=42)
    resumed_opt = resumed_model.setup_optimizer()
    meta = load_checkpoint(ckpt, resumed_model, resumed_opt)
    assert meta["step"] == 2
    assert train_steps(resumed_model, resumed_opt, 3, start=2) == straight
    for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_into_compiled_model_and_overwrite(tmp_path):
    model, opt, ckpt = saved(tmp_path)
    compiled = torch.compile(tiny_model(seed=3))  # never called: only the wrapper matters here
    load_checkpoint(ckpt, compiled, restore_rng=False)
    assert torch.equal(compiled._orig_mod.lm_head.weight, model.lm_head.weight)
    save_checkpoint(ckpt, compiled, None, meta={"step": 7})  # replaces the directory atomically
    assert read_meta(ckpt)["step"] == 7 and "optim.pt" not in read_meta(ckpt)["files"]
    with pytest.raises(CheckpointError, match="has no optim.pt"):
        load_checkpoint(ckpt, tiny_model(), tiny_model().setup_optimizer())


def test_load_model_for_eval(tmp_path):
    model, _, ckpt = saved(tmp_path)
    loaded, meta = load_model(ckpt, "cpu", "eval")
    assert not loaded.training and meta["step"] == 2
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="phase"):
        load_model(ckpt, "cpu", "serve")

    class Tok:
        def get_vocab_size(self):
            return 300
    with pytest.raises(CheckpointError, match="vocab size 300"):
        load_model(ckpt, "cpu", "train", tokenizer=Tok())


def test_load_model_upcasts_bf16_and_patches_old_checkpoints(tmp_path):
    model = tiny_model(window_pattern="L")
    ckpt = tmp_path / "old"
    save_checkpoint(ckpt, model, meta={"step": 1})
    # Rewrite it as an older nanochat-style checkpoint: bf16 embeddings, no lambdas, no window_pattern.
    sd = torch.load(ckpt / "model.pt", weights_only=True)
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"].bfloat16()
    del sd["resid_lambdas"], sd["x0_lambdas"]
    torch.save(sd, ckpt / "model.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["model_config"]["window_pattern"]
    meta["files"]["model.pt"] = {"bytes": (ckpt / "model.pt").stat().st_size, "sha256": sha256_file(ckpt / "model.pt")}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    loaded, _ = load_model(ckpt, "cpu", "eval")
    assert loaded.transformer.wte.weight.dtype == torch.float32
    assert loaded.config.window_pattern == "L"
    assert torch.all(loaded.resid_lambdas == 1) and torch.all(loaded.x0_lambdas == 0)


def test_truncated_file_is_refused(tmp_path):
    _, _, ckpt = saved(tmp_path)
    data = (ckpt / "optim.pt").read_bytes()
    (ckpt / "optim.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"optim\.pt: truncated"):
        load_checkpoint(ckpt, tiny_model(), tiny_model().setup_optimizer())


def test_corrupted_file_is_refused(tmp_path):
    _, _, ckpt = saved(tmp_path)
    data = bytearray((ckpt / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (ckpt / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt: corrupt: sha256"):
        load_model(ckpt, "cpu", "eval")


def test_unreadable_file_is_refused_even_without_hash_check(tmp_path):
    _, _, ckpt = saved(tmp_path)
    (ckpt / "model.pt").write_bytes(b"x" * read_meta(ckpt)["files"]["model.pt"]["bytes"])
    with pytest.raises(CheckpointError, match=r"model\.pt: cannot be loaded"):
        load_model(ckpt, "cpu", "eval", verify=False)


def test_missing_or_broken_meta_and_mismatched_model(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope", "cpu", "eval")
    _, _, ckpt = saved(tmp_path)
    with pytest.raises(CheckpointError, match="model_config differs"):
        load_checkpoint(ckpt, tiny_model(n_embd=128))
    (ckpt / "meta.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"meta\.json: corrupt"):
        load_model(ckpt, "cpu", "eval")
    (ckpt / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"meta\.json: missing"):
        load_model(ckpt, "cpu", "eval")
    assert find_last_step(tmp_path / "ckpts") is None  # an incomplete directory is not a resume point
