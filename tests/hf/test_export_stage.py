"""The export stage on a tiny checkpoint: models/hf that transformers loads and generates from
offline, its metrics and model card, and the bad inputs named."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import make_cfg, require_module
from hf_fixtures import tiny_model, tiny_tokenizer

from nanopipe.stage import run_stage
from nanopipe.stages import export

require_module("transformers")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_run(root, tok, source="rl", step=16):
    """models/tokenizer, models/<source> and the metrics files a real run leaves behind."""
    from nanopipe.model.checkpoint import save_checkpoint

    tok.save(root / "models/tokenizer")
    model = tiny_model()
    save_checkpoint(root / "models" / source, model, None, {"step": step}, save_rng=False)
    metrics = {
        "pretrain": {"min_val_bpb": 1.2295, "total_tokens": 1024000},
        "base_eval": {"val_bpb": 1.2659, "core_metric": None},
        "sft": {"val_bpb": 0.2013},
        "rl": {"task": "arithmetic", "pass_at_k_end": {"pass_at_1": 0.625}},
        "chat_eval": {"rl": {"step": 16, "Arithmetic": 0.625, "ChatCORE": 0.2083, "counts": {}}},
    }
    for name, m in metrics.items():
        (root / "metrics").mkdir(exist_ok=True)
        (root / f"metrics/{name}.json").write_text(json.dumps(m))
    return model


def test_stage_writes_a_model_transformers_loads_offline(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_run(tmp_path, tok)
    run_stage(export, make_cfg("experiment=smoke", "tracking.enabled=false"))

    m = json.loads((tmp_path / "metrics/export.json").read_text())
    assert m["source"] == "rl" and m["step"] == 16 and m["verified"] and m["verify_max_abs_logit_diff"] <= 1e-4
    assert m["name"] == "nanopipe-d3-rl" and m["num_params"] == sum(p.numel() for p in model.parameters())
    section = (tmp_path / "metrics/sections/export.md").read_text()
    assert section.startswith("## export") and "verified through transformers" in section

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "models/hf", trust_remote_code=True)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "models/hf")
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,
                                     return_tensors="pt")
    out = hf.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert hf_tok.eos_token == "<|assistant_end|>"

    card = (tmp_path / "models/hf/README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "# nanopipe-d3-rl" in card
    for number in ("1.2295", "1.2659", "0.2013", "0.6250", "0.2083"):  # the run's own metrics
        assert number in card, number
    assert "| CORE |" not in card  # not measured (offline): left out, not invented
    prov = json.loads((tmp_path / "models/hf/nanopipe.json").read_text())
    assert prov["source"] == "rl" and prov["step"] == 16 and len(prov["checkpoint_sha256"]) == 64


def test_base_source_ends_documents_at_bos(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, tok, source="base", step=500)
    run_stage(export, make_cfg("experiment=smoke", "tracking.enabled=false", "export.source=base",
                               "export.verify=false", "export.name=my-model"))
    m = json.loads((tmp_path / "metrics/export.json").read_text())
    assert m["verified"] is False and m["name"] == "my-model" and m["step"] == 500
    tok_cfg = json.loads((tmp_path / "models/hf/tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|bos|>"
    gen = json.loads((tmp_path / "models/hf/generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]


def test_missing_inputs_are_named(tmp_path, monkeypatch, tok):
    from nanopipe.artifacts import MissingInput
    from nanopipe.model.checkpoint import CheckpointError

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("experiment=smoke", "tracking.enabled=false")
    with pytest.raises(MissingInput, match=r"models/tokenizer/tokenizer.json: not found.*`tokenizer` stage"):
        run_stage(export, cfg)
    tok.save(tmp_path / "models/tokenizer")
    with pytest.raises(CheckpointError, match=r"models/rl: checkpoint directory not found"):
        run_stage(export, cfg)
    assert not (tmp_path / "models/hf").exists() and not (tmp_path / "metrics/export.json").exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path, monkeypatch, tok):
    """A checkpoint whose config has a key our GPT does not know (say, a later nanochat's) is not exported."""
    from nanopipe.model.checkpoint import CheckpointError

    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, tok)
    meta_path = tmp_path / "models/rl/meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["smear_gate"] = True
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"models/rl/meta.json: model_config has keys .*smear_gate"):
        run_stage(export, make_cfg("experiment=smoke", "tracking.enabled=false"))
    assert not (tmp_path / "models/hf").exists()


def test_vocab_mismatch_between_tokenizer_and_checkpoint_is_refused(tmp_path, monkeypatch, tok):
    from nanopipe.model.checkpoint import CheckpointError

    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, tok)
    tiny_tokenizer(vocab_size=600).save(tmp_path / "models/tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer vocab size 600 does not match the model's vocab_size 512"):
        run_stage(export, make_cfg("experiment=smoke", "tracking.enabled=false"))
    assert torch.load(tmp_path / "models/rl/model.pt", weights_only=True)  # inputs untouched


@pytest.mark.parametrize("log_weights", [True, False])
def test_export_is_logged_with_its_run_in_mlflow(tmp_path, monkeypatch, tok, log_weights):
    """`mlflow ui` shows which run produced which shareable model: the files under hf_model/, tags naming
    the source checkpoint; the weights are left to DVC when export.log_weights=false."""
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, tok)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_stage(export, make_cfg("experiment=smoke", f"tracking.uri={store}", "tracking.experiment=export-test",
                               "export.verify=false", f"export.log_weights={str(log_weights).lower()}"))
    import mlflow

    client = mlflow.MlflowClient(store)  # this store, whatever an earlier test set as MLflow's global one
    (run,) = client.search_runs([client.get_experiment_by_name("export-test").experiment_id])
    tags = run.data.tags
    assert tags["stage"] == "export" and tags["hf_model"] == "models/hf" and tags["hf_source"] == "rl"
    assert tags["hf_step"] == "16" and len(tags["hf_checkpoint_sha256"]) == 64
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "hf_model")}
    expected = {f"hf_model/{p.name}" for p in (tmp_path / "models/hf").iterdir()}
    assert logged == (expected if log_weights else expected - {"hf_model/model.safetensors"})
    assert run.data.params["export.source"] == "rl" and run.data.metrics["num_params"] > 0
    if not log_weights:
        assert "mlflow_model" not in tags  # the model would carry the weights
        return

    # the chat model as an MLflow model: loaded by MLflow alone, it replies as transformers does on models/hf
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    uri = tags["mlflow_model"]
    assert uri.startswith("models:/") and f"`mlflow.pyfunc.load_model(\"{uri}\")" in \
        (tmp_path / "metrics/sections/export.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "models/hf", trust_remote_code=True)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "models/hf")
    prompts = ["Hi!", "What is 2+3?"]
    expected = []
    for prompt in prompts:
        ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_dict=True, return_tensors="pt")
        out = hf.generate(**ids, max_new_tokens=6, do_sample=False)
        expected.append(hf_tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    shutil.rmtree(tmp_path / "models/hf")  # the MLflow model holds its own copy
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(store):  # a models:/ URI resolves through MLflow's global store
        loaded = mlflow.pyfunc.load_model(uri)
    replies = loaded.predict(prompts, params={"max_new_tokens": 6})
    assert list(replies) == expected and any(expected)
    assert loaded.metadata.run_id == run.info.run_id
    with pytest.raises(Exception, match="max_new_tokens"):
        loaded.predict(["Hi!"], params={"max_new_tokens": 0})


def test_card_example_runs(tmp_path, monkeypatch, tok):
    """The model card's Python snippet, as written, runs against the export it describes."""
    import re

    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, tok)
    run_stage(export, make_cfg("experiment=smoke", "tracking.enabled=false", "export.verify=false"))
    card = (tmp_path / "models/hf/README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, re.S)
    exec(compile(snippet.replace("max_new_tokens=64", "max_new_tokens=4"), "README.md", "exec"), {})
    assert oct((tmp_path / "models/hf/model.safetensors").stat().st_mode & 0o777) == \
        oct((tmp_path / "models/hf/config.json").stat().st_mode & 0o777)
