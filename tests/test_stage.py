"""The stage contract (nanopipe.stage): a stage sees only what it declares, and the process is torn
down on every exit path."""
import socket
import subprocess
import sys
import types

import pytest
import torch.distributed as dist
from omegaconf.errors import ConfigAttributeError

from helpers import REPO, make_cfg
from nanopipe.config import ConfigError, select
from nanopipe.stage import DEVICE_PARAMS, run_stage


def fake_stage(name, params, body):
    module = types.ModuleType(f"nanopipe.stages.{name}")
    module.PARAMS = params
    module.run = body
    return module


def test_a_stage_reads_only_its_declared_params():
    seen = {}

    def body(st):
        seen["model"] = dict(st.cfg.model)
        seen["seed"] = st.cfg.runtime.seed
        with pytest.raises(ConfigAttributeError):
            st.cfg.pretrain  # not declared
        with pytest.raises(ConfigAttributeError):
            st.cfg.runtime.nnodes  # only runtime.seed is
        with pytest.raises(Exception):
            st.cfg.model.depth = 7  # read-only

    run_stage(fake_stage("probe", ["model", "runtime.seed"], body), make_cfg("experiment=smoke", "tracking.enabled=false"))
    assert seen == {"model": dict(make_cfg("experiment=smoke").model), "seed": 42}


def test_declaring_a_key_the_config_lacks_is_an_error():
    with pytest.raises(ConfigError, match="`model.dpeth`"):
        select(make_cfg("experiment=smoke"), ["model.dpeth"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_process_group_and_mlflow_run_closed_on_every_exit_path(tmp_path, monkeypatch, error):
    """Under torchrun's environment the contract joins a (gloo) process group; an exception or Ctrl-C in
    the stage still destroys it and marks the MLflow run FAILED."""
    monkeypatch.chdir(tmp_path)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg("experiment=smoke", f"tracking.uri={uri}", "runtime.device=cpu")

    def body(st):
        assert st.dev.ddp and dist.is_initialized()
        raise error

    with pytest.raises(type(error)):
        run_stage(fake_stage("crashes", DEVICE_PARAMS, body), cfg)
    assert not dist.is_initialized()

    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["nanopipe"], filter_string="tags.stage = 'crashes'")
    assert list(runs["status"]) == ["FAILED"]
    assert not (tmp_path / "metrics/crashes.json").exists()


def test_cli_turns_a_missing_input_into_one_line(tmp_path):
    """A missing input is one line naming the file and the stage that produces it; no traceback."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    p = subprocess.run([sys.executable, "-m", "nanopipe.cli", "rl", "rl.source=base", "tracking.enabled=false"],
                       cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == ("nanopipe rl: models/tokenizer/tokenizer.json: not found; it is produced "
                                                 "by the `tokenizer` stage (run `dvc repro tokenizer`)")


@pytest.mark.parametrize("override, key", [
    ("pretrain.matrix_lr=nan", "pretrain.matrix_lr"), ("pretrain.matrix_lr=0", "pretrain.matrix_lr"),
    ("sft.embedding_lr=-1", "sft.embedding_lr"), ("pretrain.warmdown_ratio=1.5", "pretrain.warmdown_ratio"),
    ("rl.num_samples=1", "rl.num_samples"), ("rl.source=rl", "rl.source"), ("chat_eval.tasks=[BoolQ]", "chat_eval.tasks"),
    ("serve.port=70000", "serve.port"), ("model.window_pattern=SLX", "model.window_pattern"),
    ("runtime.nnodes=2 runtime.launcher=torchrun", "runtime.rdzv_endpoint"), ("runtime.launcher=srun", "runtime.launcher"),
    ("rl.enabled=false", "export.source"), ("tokenizer.vocab_size=264", "tokenizer.vocab_size"),
    ("data.num_train_shards=4", "data.num_train_shards"), ("data.source=url", "data.url_template"),
    ("data.val_shard=4", "data.val_shard"),
])
def test_range_checks_name_key_value_and_expectation(override, key):
    with pytest.raises(ConfigError, match=rf"test config: `{key}` = .*: expected "):
        make_cfg(*override.split())


@pytest.mark.parametrize("override", ["pretrain.matrix_lr=1e-9", "pretrain.warmdown_ratio=1.0", "rl.num_samples=2",
                                      "serve.port=0", "tokenizer.vocab_size=265", "chat_eval.tasks=[ARC-Easy,MMLU]",
                                      "runtime.nnodes=2", "rl.enabled=false export.source=sft"])
def test_range_checks_accept_their_bounds(override):
    make_cfg(*override.split())  # runtime.nnodes=2 alone: launcher auto may find SLURM, which needs no endpoint
