"""Scale-out: stages/launch.py's command lines, and real multi-"node" runs through `dvc repro` on this
machine — two torchrun agents on loopback (the follow protocol), and a one-machine SLURM whose tasks
stand in for nodes — each compared bit for bit with the single-node run of the same world size."""
import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_repo_copy, require_tool, run, subprocess_env

spec = importlib.util.spec_from_file_location("launch", REPO / "stages/launch.py")
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)

RT = {"nproc_per_node": 8, "nnodes": 2, "launcher": "auto", "rdzv_backend": "static", "rdzv_endpoint": "", "srun_args": ""}


def _tail(cmd):
    return cmd[cmd.index("-m"):]


# -- command lines (pure) -----------------------------------------------------------------------


def test_cpu_stage_and_one_process_run_plainly():
    assert launch.command("tokenizer", False, RT, {}, "x") == [sys.executable, "-m", "nanopipe.cli", "tokenizer"]
    one = {**RT, "nproc_per_node": 1, "nnodes": 1}
    assert launch.command("pretrain", True, one, {"SLURM_JOB_ID": "7"}, "x")[1:] == ["-m", "nanopipe.cli", "pretrain"]


def test_one_node_is_standalone_torchrun():
    cmd = launch.command("sft", True, {**RT, "nnodes": 1}, {"SLURM_JOB_ID": "7"}, "x")
    assert cmd[1:] == ["--standalone", "--nproc-per-node=8", "-m", "nanopipe.cli", "sft"]


def test_slurm_starts_one_agent_per_node_with_its_procid_as_node_rank():
    env = {"SLURM_JOB_ID": "41", "SLURM_JOB_NODELIST": "gpu[3-4]"}
    cmd = launch.command("pretrain", True, {**RT, "srun_args": "--gpus-per-node=8 --partition=h100"}, env,
                         "pretrain-41-ab", hostnames=["gpu3", "gpu4"])
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[5:7] == ["--gpus-per-node=8", "--partition=h100"]  # after nanopipe's, so they override
    assert cmd[7:9] == ["bash", "-c"]
    assert cmd[9] == ("exec torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$SLURM_PROCID --rdzv-backend=static "
                      "--rdzv-endpoint=gpu3:29500 --rdzv-id=pretrain-41-ab -m nanopipe.cli pretrain").replace(
                          "torchrun", launch._torchrun(), 1)
    cmd = launch.command("pretrain", True, {**RT, "rdzv_endpoint": "10.0.0.3:6000", "rdzv_backend": "c10d"}, env, "i",
                         hostnames=["gpu3", "gpu4"])
    assert "--rdzv-endpoint=10.0.0.3:6000 --rdzv-backend" not in cmd[-1] and "--rdzv-endpoint=10.0.0.3:6000" in cmd[-1]
    assert "--rdzv-backend=c10d" in cmd[-1]


def test_torchrun_without_slurm_runs_this_node_with_its_rank():
    rt = {**RT, "rdzv_endpoint": "node0:29500"}
    cmd = launch.command("base_eval", True, rt, {}, "base_eval-1")
    assert cmd[1:-3] == ["--nnodes=2", "--nproc-per-node=8", "--node-rank=0", "--rdzv-backend=static",
                         "--rdzv-endpoint=node0:29500", "--rdzv-id=base_eval-1"]
    assert _tail(cmd) == ["-m", "nanopipe.cli", "base_eval"]
    assert "--node-rank=3" in launch.command("base_eval", True, rt, {"NANOPIPE_NODE_RANK": "3"}, "i")
    # launcher=torchrun wins over a SLURM allocation; launcher=slurm outside one is an error that says what to do
    assert launch.command("sft", True, {**rt, "launcher": "torchrun"}, {"SLURM_JOB_ID": "1"}, "i")[0] != "srun"
    with pytest.raises(SystemExit, match="not inside a SLURM allocation"):
        launch.command("sft", True, {**rt, "launcher": "slurm"}, {}, "i")
    with pytest.raises(SystemExit, match="runtime.rdzv_endpoint"):
        launch.command("sft", True, RT, {}, "i")


def test_every_launch_gets_its_own_rendezvous_id(tmp_path, monkeypatch):
    ids = {launch.rendezvous_id("pretrain", {"SLURM_JOB_ID": "9"}) for _ in range(20)}
    assert len(ids) == 20 and all(i.startswith("pretrain-9-") for i in ids)
    assert launch.rendezvous_id("sft", {"NANOPIPE_RUN_ID": "r1", "SLURM_JOB_ID": "9"}).startswith("sft-r1-")


def test_the_launcher_sets_the_allocator_and_debug_environment_without_overriding_the_users():
    env = launch.environment({"NCCL_DEBUG": "INFO"})
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True" and env["NCCL_DEBUG"] == "INFO"


def test_announcements_reach_a_follower_and_vanish_with_the_stage():
    port = _free_port()
    assert launch.read_announcement("127.0.0.1", port) is None
    ann = launch.announcement("pretrain", {**RT, "rdzv_endpoint": f"127.0.0.1:{port}"}, "pretrain-x", "sha")
    rc = launch.announce_and_run([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(REPO / 'stages')!r}); import launch
a = launch.read_announcement('127.0.0.1', {port}); sys.exit(0 if a and a['rdzv_id'] == 'pretrain-x' else 3)"""],
                                 ann, subprocess_env())
    assert rc == 0  # the stage's own process (standing in for node 0's agent) saw the announcement
    assert launch.read_announcement("127.0.0.1", port) is None  # withdrawn when the stage ended


# -- real runs: two "nodes" on loopback, and SLURM ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(repo: Path) -> dict:
    return torch.load(repo / "models/base/model.pt", weights_only=True)


def _val(repo: Path) -> list[dict]:
    return list(csv.DictReader(open(repo / "metrics/pretrain/val.csv")))


def _compose(repo: Path, *overrides: str) -> None:
    # one intra-op thread per rank whatever the layout (torchrun sets it only for several processes per
    # node), so that 1 node x 2 processes and 2 nodes x 1 process sum in the same order
    run([sys.executable, "-m", "nanopipe.cli", "compose", "experiment=smoke", "tracking.enabled=false",
         "runtime.threads=1", *overrides], repo)


def _assert_same_run(repo: Path, reference: dict) -> None:
    got = _weights(repo)
    assert got.keys() == reference["weights"].keys()
    for k in got:
        assert torch.equal(got[k], reference["weights"][k]), f"{k} differs from the single-node 2-process run"
    assert _val(repo) == reference["val"]


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory):
    """A smoke repo with the tokenizer, and the single-node 2-process pretrain everything is compared with."""
    repo = make_repo_copy(tmp_path_factory.mktemp("scale") / "repo", "experiment=smoke", "tracking.enabled=false")
    _compose(repo, "runtime.nproc_per_node=2")
    p = run(["dvc", "repro", "pretrain"], repo)
    assert "--standalone --nproc-per-node=2" in p.stderr
    ref = {"weights": _weights(repo), "val": _val(repo)}
    assert json.loads((repo / "metrics/pretrain.json").read_text())["world_size"] == 2
    return repo, ref


class Follower:
    """`NANOPIPE_NODE_RANK=1 python stages/launch.py --follow` in `cwd`, its log kept for the asserts."""

    def __init__(self, cwd: Path, idle: int = 600):
        self.log = open(cwd.parent / f"follower-{cwd.name}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "stages/launch.py", "--follow", "--idle-timeout", str(idle)],
                                     cwd=cwd, env=subprocess_env({"NANOPIPE_NODE_RANK": "1"}), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        self.log.close()


def _two_nodes(repo: Path) -> Follower:
    """params.yaml for 2 nodes x 1 process without SLURM, and node 1's follower in the same checkout."""
    _compose(repo, "runtime.nnodes=2", "runtime.launcher=torchrun", f"runtime.rdzv_endpoint=127.0.0.1:{_free_port()}")
    return Follower(repo)


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_node_and_follow_only_what_runs(two_rank_reference):
    repo, ref = two_rank_reference
    follower = _two_nodes(repo)
    try:
        p = run(["dvc", "repro", "pretrain"], repo, timeout=600)
        assert "--nnodes=2 --nproc-per-node=1 --node-rank=0" in p.stderr
        _assert_same_run(repo, ref)
        # node 0 finds pretrain cached: it starts nothing, and the follower joins the next stage node 0 runs
        p = run(["dvc", "repro", "pretrain"], repo)
        assert "didn't change, skipping" in p.stdout + p.stderr
        run(["dvc", "repro", "base_eval"], repo, timeout=600)
        joined = [line.split(" -m nanopipe.cli ")[1] for line in follower.text().splitlines() if line.startswith("[follow] + ")]
        assert joined == ["pretrain", "base_eval"], follower.text()[-3000:]
        assert json.loads((repo / "metrics/base_eval.json").read_text())["world_size"] == 2
    finally:
        follower.stop()


@pytest.mark.slow
def test_two_node_resume_after_kill9_is_bit_identical(two_rank_reference):
    repo, ref = two_rank_reference
    follower = _two_nodes(repo)
    try:
        log = open(repo.parent / "killed-run.log", "w+")
        proc = subprocess.Popen(["dvc", "repro", "-f", "-s", "pretrain"], cwd=repo, start_new_session=True,
                                env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        ckpt = repo / "models/resume/pretrain/step_000008/meta.json"
        deadline = time.time() + 600
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        log.flush()
        assert ckpt.exists(), f"no checkpoint appeared:\n{Path(log.name).read_text()[-3000:]}\n{follower.text()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # node 0's DVC, launcher and workers; node 1's worker loses its peer
        proc.wait()
        # forced: the inputs equal the reference run's and every output is cached, so a plain `dvc repro`
        # restores its outputs from the cache (docs/decisions.md D20), which is right but skips the resume
        p = run(["dvc", "repro", "-f", "-s", "pretrain"], repo, timeout=600)
        assert "resuming from step 8" in p.stderr, p.stderr[-3000:]
        _assert_same_run(repo, ref)
        assert follower.text().count("[follow] + ") == 2
    finally:
        follower.stop()


@pytest.mark.slow
def test_a_node_that_does_not_share_the_working_directory_fails_the_stage_naming_itself(two_rank_reference, tmp_path):
    repo, _ = two_rank_reference
    port = _free_port()
    _compose(repo, "runtime.nnodes=2", "runtime.launcher=torchrun", f"runtime.rdzv_endpoint=127.0.0.1:{port}")
    elsewhere = tmp_path / "node1"  # the same commit and params, on a disk node 0 does not write to
    shutil.copytree(repo, elsewhere, ignore=shutil.ignore_patterns(".dvc", "models", "data", "metrics"))
    follower = Follower(elsewhere)
    try:
        t0 = time.time()
        p = run(["dvc", "repro", "-f", "-s", "pretrain"], repo, check=False, timeout=600)
        assert p.returncode != 0
        assert time.time() - t0 < 300  # fails at start-up, not after a collective timeout
        log = p.stderr + follower.text()
        assert "cannot see the working directory" in log and f"{socket.gethostname()} (node rank 1)" in log, log[-4000:]
        assert str(repo.resolve()) in log
        assert not list(repo.glob(".nanopipe-shared-*"))
    finally:
        follower.stop()


@pytest.mark.slow
def test_resume_is_decided_by_rank0_and_an_unreadable_checkpoint_fails_every_rank(tmp_path):
    """Two ranks (gloo), each in its own directory: rank 0 holds a checkpoint rank 1 cannot see."""
    script = tmp_path / "resume_two_dirs.py"
    script.write_text(f"""
import os, sys, json
from pathlib import Path
sys.path.insert(0, {str(REPO / 'src')!r})
import torch
from nanopipe.runtime import compute_init
from nanopipe.model.gpt import GPT, config_from_depth
from nanopipe.model.checkpoint import CheckpointError
from nanopipe.train.loop import Resume

class St:  # the two things Resume asks of the running stage
    name = "pretrain"
    def plot_rows(self): return {{}}
    def restore_plots(self, rows, before_step): pass

rank = int(os.environ["RANK"])
os.chdir(Path({str(tmp_path)!r}) / f"node{{rank}}")
compute_init("cpu")
model = GPT(config_from_depth(1, 64, 32, 64, 32, "L"))
model.init_weights()
opt = model.setup_optimizer()
resume = Resume(St(), "fp", root=Path("resume"))
if sys.argv[1] == "save":
    resume.save(3, model, opt, {{}})
    sys.exit(0)
try:
    meta = resume.load(model, opt)
    print("RESULT", json.dumps(None if meta is None else meta["step"]))
except CheckpointError as e:
    print("ERROR", str(e).replace(chr(10), " | "))
""")
    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
    torchrun = shutil.which("torchrun")

    def go(arg):
        port = _free_port()
        procs = [subprocess.Popen([torchrun, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={r}", "--rdzv-backend=static",
                                   f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=t", str(script), arg], env=subprocess_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        return [p.communicate(timeout=300)[0] for p in procs]

    go("save")  # rank 0 writes node0/resume/pretrain/step_000003; node1 has nothing
    assert (tmp_path / "node0/resume/pretrain/step_000003/meta.json").exists()
    assert not (tmp_path / "node1/resume").exists()
    outs = go("load")
    for out in outs:  # both ranks fail, with one message naming the node and the path it could not read
        line = next(x for x in out.splitlines() if x.startswith(("ERROR", "RESULT")))
        assert line.startswith("ERROR cannot resume pretrain from"), out[-2000:]
        assert f"{socket.gethostname()} (node rank 1)" in line and "step_000003" in line
    # with the checkpoint visible to both, both resume at rank 0's step
    shutil.copytree(tmp_path / "node0/resume", tmp_path / "node1/resume")
    outs = go("load")
    assert all("RESULT 3" in out for out in outs), outs


@pytest.fixture(scope="module")
def local_slurm():
    require_tool("srun", "SLURM, run as root: apt-get install slurm-wlm munge; .ci/run does",
                 found=shutil.which("srun") is not None and os.geteuid() == 0)
    subprocess.run(["bash", str(REPO / "tests/slurm/local_slurm.sh"), "start"], check=True, timeout=120)
    yield
    # the daemons stay up for a later session on this machine; .ci/run's clean container ends them


@pytest.mark.slow
def test_slurm_runs_two_nodes_through_dvc_repro(two_rank_reference, local_slurm):
    repo, ref = two_rank_reference
    # one host: the allocation's two tasks stand in for two nodes (the srun_args override nanopipe's placement)
    _compose(repo, "runtime.nnodes=2", "runtime.launcher=slurm", "runtime.srun_args='--nodes=1 --ntasks-per-node=2'")
    p = run(["salloc", "--ntasks=2", "dvc", "repro", "-f", "-s", "pretrain"], repo, timeout=600)
    assert "+ srun --nodes=2 --ntasks=2" in p.stderr and "--node-rank=$SLURM_PROCID" in p.stderr
    assert f"--rdzv-endpoint={socket.gethostname()}:29500" in p.stderr
    _assert_same_run(repo, ref)
