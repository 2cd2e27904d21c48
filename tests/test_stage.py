"""The stage contract (nanopipe.stage): a stage sees only what it declares, and the process is torn
down on every exit path."""
import socket
import subprocess
import sys
import types

import pytest
import torch.distributed as dist
from helpers import REPO, make_cfg
from omegaconf.errors import ConfigAttributeError

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
    # every LR, weight decay, ratio and beta finite and in range (issue 18): inf passed `>= 0`, beta 1 `in [0, 1]`
    ("pretrain.matrix_lr=inf", "pretrain.matrix_lr"), ("pretrain.weight_decay=inf", "pretrain.weight_decay"),
    ("sft.weight_decay=nan", "sft.weight_decay"), ("rl.weight_decay=inf", "rl.weight_decay"),
    ("rl.matrix_lr=nan", "rl.matrix_lr"), ("sft.init_lr_frac=nan", "sft.init_lr_frac"),
    ("pretrain.adam_beta2=1.0", "pretrain.adam_beta2"), ("pretrain.adam_beta1=nan", "pretrain.adam_beta1"),
    ("pretrain.target_param_data_ratio=nan", "pretrain.target_param_data_ratio"),
    ("pretrain.target_param_data_ratio=0", "pretrain.target_param_data_ratio"),
    ("pretrain.target_flops=inf", "pretrain.target_flops"), ("chat_eval.temperature=inf", "chat_eval.temperature"),
    ("rl.temperature=nan", "rl.temperature"), ("pretrain.max_nonfinite_steps=-1", "pretrain.max_nonfinite_steps"),
])
def test_range_checks_name_key_value_and_expectation(override, key):
    with pytest.raises(ConfigError, match=rf"test config: `{key}` = .*: expected "):
        make_cfg(*override.split())


@pytest.mark.parametrize("override", ["pretrain.matrix_lr=1e-9", "pretrain.warmdown_ratio=1.0", "rl.num_samples=2",
                                      "pretrain.adam_beta2=0.999", "pretrain.weight_decay=0", "pretrain.target_flops=-1",
                                      "sft.max_nonfinite_steps=3",
                                      "serve.port=0", "tokenizer.vocab_size=265", "chat_eval.tasks=[ARC-Easy,MMLU]",
                                      "runtime.nnodes=2", "rl.enabled=false export.source=sft"])
def test_range_checks_accept_their_bounds(override):
    make_cfg(*override.split())  # runtime.nnodes=2 alone: launcher auto may find SLURM, which needs no endpoint


@pytest.mark.parametrize("content, says", [
    (bytes(range(128, 256)) * 4, "params.yaml: not a text file (byte 0 is not UTF-8); regenerate it with `nanopipe compose`"),
    (b"pretrain: {matrix_lr: [1,\n", "params.yaml: not valid YAML at line 2, column 1"),
], ids=["binary", "broken-yaml"])
def test_a_garbled_params_yaml_is_one_line_naming_it(tmp_path, content, says):
    (tmp_path / "params.yaml").write_bytes(content)
    p = subprocess.run([sys.executable, "-m", "nanopipe.cli", "tokenizer"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nanopipe tokenizer: {tmp_path.resolve()}/") and says in last, last


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (root may mount one); elsewhere the test is skipped (see the ENOSPC simulation below)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def _tiny_model(vocab=512):
    from nanopipe.model.gpt import GPT, GPTConfig

    return GPT(GPTConfig(sequence_len=16, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=64, window_pattern="L"))


def test_a_full_disk_is_one_line_naming_the_path(full_disk, tmp_path, monkeypatch):
    """A checkpoint (torch.save says "unexpected pos ...") and a metrics file on a full filesystem: DiskFull naming
    the final path; the stage's CLI prints it as one line; no temp files are left behind."""
    from nanopipe import artifacts
    from nanopipe.model.checkpoint import save_checkpoint
    from nanopipe.stage import main

    with pytest.raises(artifacts.DiskFull, match=rf"^{full_disk}/base/model.pt: cannot write it: the disk is full"):
        save_checkpoint(full_disk / "base", _tiny_model(), None, {"step": 1}, save_rng=False)
    with pytest.raises(artifacts.DiskFull, match=rf"^{full_disk}/m.json: cannot write it: the disk is full"):
        artifacts.write_json(full_disk / "m.json", {"x": "y" * 200_000})
    assert list(full_disk.iterdir()) == []

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    body = lambda st: save_checkpoint(full_disk / "base", _tiny_model(), None, {}, save_rng=False)  # noqa: E731
    import signal
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own SIGTERM handling
    with pytest.raises(SystemExit) as e:
        main(fake_stage("saves", ["runtime.seed"], body), ["tracking.enabled=false"])
    assert str(e.value.code).startswith(f"nanopipe saves: {full_disk}/base/model.pt: cannot write it: the disk is full")
    assert "\n" not in str(e.value.code)


def test_enospc_deep_in_a_writer_is_disk_full(tmp_path, monkeypatch):
    """Without a tmpfs: an OSError(ENOSPC) at the file-write boundary, wrapped by torch, is still DiskFull."""
    import errno

    from nanopipe import artifacts
    from nanopipe.model import checkpoint

    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint._HashingWriter, "write", write)
    with pytest.raises(artifacts.DiskFull, match=rf"^{tmp_path}/ckpt/model.pt: cannot write it: the disk is full"):
        checkpoint.save_checkpoint(tmp_path / "ckpt", _tiny_model(), None, {}, save_rng=False)
    assert not (tmp_path / "ckpt").exists()


_LINGER = """
import sys, time, types
from nanopipe.stage import main
m = types.ModuleType("nanopipe.stages.lingers")
m.PARAMS = ["runtime.seed"]
def run(st):
    st.tracker._call("wait", "get_run")  # the run is in the store
    print("running", flush=True)
    time.sleep(600)
m.run = run
main(m, sys.argv[1:])
"""


def _start_lingering_stage(tmp_path, uri):
    p = subprocess.Popen([sys.executable, "-c", _LINGER, f"tracking.uri={uri}"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert p.stdout.readline().strip() == "running", p.stderr.read()
    return p


def _runs(uri, stage):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("nanopipe")
    return {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'")}


@pytest.mark.slow
def test_runs_left_running_by_a_dead_process_are_marked_killed(tmp_path, monkeypatch):
    """kill -9 leaves the stage's MLflow run RUNNING; the next start of that stage marks it KILLED (its pid is gone),
    while a run whose process still runs stays RUNNING. SIGTERM (torchrun, scancel) ends the run KILLED at once."""
    import signal

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed, alive = _start_lingering_stage(tmp_path, uri), _start_lingering_stage(tmp_path, uri)
    try:
        killed.kill()
        killed.wait()
        assert sorted(_runs(uri, "lingers").values()) == ["RUNNING", "RUNNING"]
        monkeypatch.chdir(tmp_path)
        run_stage(fake_stage("lingers", ["runtime.seed"], lambda st: None), make_cfg("experiment=smoke", f"tracking.uri={uri}"))
        assert sorted(_runs(uri, "lingers").values()) == ["FINISHED", "KILLED", "RUNNING"]
        alive.send_signal(signal.SIGTERM)
        assert alive.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        alive.kill()
    assert sorted(_runs(uri, "lingers").values()) == ["FINISHED", "KILLED", "KILLED"]
