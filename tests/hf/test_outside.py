"""base_eval on outside `transformers` models (nanochat's --hf-path): a tiny random GPT-2 the test saves
locally, and our own model evaluated both natively and through its export (the numbers must agree)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import make_cfg, require_module
from hf_fixtures import fuzz_text, tiny_model, tiny_tokenizer

from nanopipe.data.shards import write_shard
from nanopipe.stage import run_stage
from nanopipe.stages import base_eval

require_module("transformers")

DOCS = [f"Document {i}: the quick brown fox {i * 7} jumps over the lazy dog. Café, naïve, 東京. " * (1 + i % 4)
        for i in range(80)]


def write_data(root):
    """data/shards with a manifest (two train shards, one val shard) and a placed CORE bundle."""
    shards = root / "data/shards"
    shards.mkdir(parents=True)
    names = [f"shard_{i:05d}.parquet" for i in range(3)]
    for i, name in enumerate(names):
        write_shard(shards / name, DOCS[i::3], row_group_size=8)
    (shards / "manifest.json").write_text(json.dumps({
        "shards": [{"name": n, "split": "train" if i < 2 else "val"} for i, n in enumerate(names)],
        "val_shard": names[2]}))
    bundle = root / "bundle/eval_bundle"
    (bundle / "eval_data").mkdir(parents=True)
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n"
        "  - {label: toy_mc, icl_task_type: multiple_choice, dataset_uri: mc.jsonl, num_fewshot: [0]}\n"
        "  - {label: toy_lm, icl_task_type: language_modeling, dataset_uri: lm.jsonl, num_fewshot: [1]}\n")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ntoy_mc,25\ntoy_lm,0\n")
    mc = [{"query": f"Question: what is {a} + {b}?\nAnswer:", "choices": [str(a + b), str(a - b), "fox", "dog"],
           "gold": 0} for a, b in [(1, 2), (5, 3), (9, 9), (4, 7)]]
    lm = [{"context": f"The quick brown fox {i}", "continuation": "jumps"} for i in range(4)]
    (bundle / "eval_data/mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
    (bundle / "eval_data/lm.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lm))


def cfg(root):
    return make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu", "runtime.dtype=float32",
                    f"base_eval.bundle_cache={root / 'bundle'}", "base_eval.bundle_url=file:///nonexistent.zip",
                    "base_eval.sample_tokens=6")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A randomly initialised GPT-2 with its own byte-level BPE (trained here), saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("outside") / "gpt2-tiny"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(out)
    return out


def test_token_bytes_are_the_raw_bytes_of_the_text(gpt2_dir):
    from nanopipe.hf.outside import load_outside

    _, tok = load_outside(str(gpt2_dir), "cpu")
    tb = tok.token_bytes()
    assert tb[tok.get_bos_token_id()] == 0  # <|endoftext|> is special: no bytes
    rng = random.Random(1)
    for _ in range(300):
        text = fuzz_text(rng)
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8")), text


def test_wrapper_loss_is_the_models_own(gpt2_dir):
    from transformers import AutoModelForCausalLM

    from nanopipe.hf.outside import load_outside

    model, tok = load_outside(str(gpt2_dir), "cpu")
    ids = torch.tensor([tok.encode(DOCS[5], prepend="<|bos|>")[:40]])
    reference = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        ours = model(ids[:, :-1], ids[:, 1:].contiguous())
        theirs = reference(input_ids=ids, labels=ids).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_base_eval_on_a_tiny_gpt2(tmp_path, monkeypatch, gpt2_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_data(tmp_path)
    c = cfg(tmp_path)
    run_stage(base_eval, c, base_eval.parse_options(["--hf-path", str(gpt2_dir)], c))
    m = json.loads((tmp_path / "metrics/base_eval-hf-gpt2-tiny.json").read_text())
    assert m["hf_path"] == str(gpt2_dir) and m["step"] is None
    # A randomly initialised GPT-2 predicts almost uniformly: ~log2(V) bits per token, so bits per byte is
    # log2(V) x (tokens per byte of this text in the model's own tokenizer).
    from nanopipe.hf.outside import load_outside

    _, tok = load_outside(str(gpt2_dir), "cpu")
    val_docs = DOCS[2::3]
    tokens_per_byte = sum(len(tok.encode(d)) for d in val_docs) / sum(len(d.encode()) for d in val_docs)
    expected = math.log2(tok.get_vocab_size()) * tokens_per_byte
    assert m["val_bpb"] == pytest.approx(expected, rel=0.05) and m["train_bpb"] == pytest.approx(expected, rel=0.05)
    assert set(m["core_centered"]) == {"toy_mc", "toy_lm"} and m["core_metric"] is not None
    assert len(m["samples"]) == 7 and m["samples"][0].startswith("The capital of France is")
    section = (tmp_path / "metrics/sections/base_eval-hf-gpt2-tiny.md").read_text()
    assert section.startswith("## base_eval-hf-gpt2-tiny") and "transformers" in section
    assert not (tmp_path / "metrics/base_eval.json").exists()  # the DVC stage's own output is never touched


def test_our_model_scores_the_same_natively_and_through_its_export(tmp_path, monkeypatch):
    """bpb (its own tokenizer's bytes), CORE and greedy samples of models/base, and of the same weights
    exported and loaded as an outside model: a different tokenizer implementation, model code and
    token_bytes computation, the same numbers."""
    from nanopipe.hf.export import export_model
    from nanopipe.model.checkpoint import save_checkpoint

    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    tok, model = tiny_tokenizer(), tiny_model(sequence_len=128)
    tok.save(tmp_path / "models/tokenizer")
    save_checkpoint(tmp_path / "models/base", model, None, {"step": 12}, save_rng=False)
    export_model(model, tok, tmp_path / "models/hf", eos_token="<|bos|>", provenance={}, card="")
    c = cfg(tmp_path)
    run_stage(base_eval, c)
    run_stage(base_eval, c, base_eval.parse_options(["--hf-path", "models/hf"], c))
    native = json.loads((tmp_path / "metrics/base_eval.json").read_text())
    outside = json.loads((tmp_path / "metrics/base_eval-hf-hf.json").read_text())
    for key in ("val_bpb", "train_bpb", "core_metric"):
        assert outside[key] == pytest.approx(native[key], abs=1e-5), key
    assert outside["core_centered"] == pytest.approx(native["core_centered"], abs=1e-6)
    assert outside["samples"] == native["samples"]


def test_bad_paths_are_named_in_one_line(tmp_path, monkeypatch, gpt2_dir):
    import shutil

    import huggingface_hub.constants
    import transformers.utils.hub

    from nanopipe.stage import main

    monkeypatch.chdir(tmp_path)
    # offline, as this machine is: the hub is the one thing mocked (both libraries read the variable at import)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", True)
    write_data(tmp_path)
    (tmp_path / "params.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(cfg(tmp_path)))
    with pytest.raises(SystemExit, match=r"nanopipe base_eval: --hf-path no-such/model: cannot load its tokenizer: "
                                         r"not a local directory, and not loadable from the hub \(HF_HUB_OFFLINE is set\)"):
        main(base_eval, ["--hf-path", "no-such/model"])
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(gpt2_dir, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tok / name).unlink()
    with pytest.raises(SystemExit, match=r"no-tokenizer: cannot load its tokenizer: the directory has no tokenizer files"):
        main(base_eval, ["--hf-path", str(no_tok)])
    with pytest.raises(SystemExit, match=r"empty/config.json: not found; not a transformers model directory"):
        (tmp_path / "empty").mkdir()
        main(base_eval, ["--hf-path", str(tmp_path / "empty")])
