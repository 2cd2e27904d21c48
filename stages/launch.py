#!/usr/bin/env python3
"""Launch one nanopipe stage the way dvc.yaml asks: `python stages/launch.py <stage> [--torchrun]`.

It runs `python -m nanopipe.cli <stage>`, which runs src/nanopipe/stages/<stage>.py through the
stage contract (src/nanopipe/stage.py) on params.yaml. How, `runtime.*` in params.yaml decides
(docs/decisions.md D11 says why; the README's "Scale out" how):

- CPU stages (no --torchrun), or nproc_per_node = nnodes = 1: a plain process.
- One node: `torchrun --standalone --nproc-per-node=N -m nanopipe.cli <stage>`.
- Several nodes inside a SLURM allocation (`launcher: auto` or `slurm`): SLURM starts one torchrun
  agent per node and this launcher waits for them all:
      srun --nodes=M --ntasks=M --ntasks-per-node=1 --kill-on-bad-exit=1 [runtime.srun_args]
           bash -c 'exec torchrun --nnodes=M --nproc-per-node=N --node-rank=$SLURM_PROCID
                    --rdzv-backend=static --rdzv-endpoint=<first node>:<port> --rdzv-id=<stage>-<run>
                    -m nanopipe.cli <stage>'
  A stage DVC finds cached is started on no node, so the nodes cannot get out of step.
- Several nodes without SLURM (`launcher: torchrun`): this process, on node 0 under `dvc repro`,
  announces the stage (name, world shape, rendezvous id) on a TCPStore at the rendezvous host,
  port + 1, and runs its own agent as node 0; every other node runs
      NANOPIPE_NODE_RANK=<k> python stages/launch.py --follow
  which joins each announced stage once, with the same rendezvous id, and waits for the next.

Every launch gets a rendezvous id unique to the stage and the run, `<stage>-<run>-<random>` (run:
NANOPIPE_RUN_ID or SLURM_JOB_ID when set): agents of different stages never join one rendezvous.
With the static backend node rank 0, the node that runs DVC, holds global rank 0, the one rank that
writes outputs. The environment gets the allocator and debugging settings of nanochat and torchtitan
(ENV below) unless the user set them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import yaml

# Set unless already set. PYTORCH_ALLOC_CONF: nanochat base_train.py/chat_sft.py @1ec0a34 (fragmentation
# OOMs upstream without it); NCCL_DEBUG=WARN, PYTHONFAULTHANDLER=1: torchtitan multinode_trainer.slurm
# (a hang or crash on one rank then prints why, in every rank's log). torchrun sets OMP_NUM_THREADS=1
# for each worker when a node runs several, as nanochat's speedrun.sh does for the whole run.
ENV = {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "NCCL_DEBUG": "WARN", "PYTHONFAULTHANDLER": "1"}
DEFAULT_PORT = 29500
ANNOUNCE_KEY = "nanopipe/stage"


def environment(env: dict) -> dict:
    """The stage's environment: ENV under the user's own settings."""
    return {**ENV, **env}


def rendezvous_id(stage: str, env: dict) -> str:
    """Fresh for every launch, even of one stage within one run: a late agent of an earlier launch can never join."""
    run = env.get("NANOPIPE_RUN_ID") or env.get("SLURM_JOB_ID")
    return "-".join(filter(None, [stage, run, uuid.uuid4().hex[:8]]))


def _torchrun() -> str:
    return shutil.which("torchrun") or "torchrun"


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        sys.exit(f"params.yaml: `runtime.rdzv_endpoint` = {endpoint!r}: expected host:port of node 0")
    return host, int(port)


def slurm_head(env: dict, hostnames=None) -> str:
    """The allocation's first node: where srun starts task 0 (SLURM_PROCID 0, torchrun node rank 0)."""
    if hostnames is None:
        out = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True)
        hostnames = out.stdout.split()
    return hostnames[0]


def mode(torchrun: bool, runtime: dict, env: dict) -> str:
    """plain | standalone | slurm | torchrun (several nodes, the others following)."""
    nproc, nnodes = int(runtime.get("nproc_per_node", 1)), int(runtime.get("nnodes", 1))
    if not torchrun or (nproc == 1 and nnodes == 1):
        return "plain"
    if nnodes == 1:
        return "standalone"
    launcher = runtime.get("launcher", "auto")
    if launcher == "slurm" and "SLURM_JOB_ID" not in env:
        sys.exit("params.yaml: `runtime.launcher` = slurm, but this is not inside a SLURM allocation "
                 "(no SLURM_JOB_ID): run `dvc repro` from an sbatch script or salloc (stages/slurm/speedrun.sbatch)")
    if launcher == "slurm" or (launcher == "auto" and "SLURM_JOB_ID" in env):
        return "slurm"
    return "torchrun"


def agent(stage: str, nproc: int, nnodes: int, node_rank: str, backend: str, endpoint: str, rdzv_id: str) -> list[str]:
    """One node's torchrun agent for a multi-node stage."""
    return [_torchrun(), f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", f"--node-rank={node_rank}",
            f"--rdzv-backend={backend}", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
            "-m", "nanopipe.cli", stage]


def command(stage: str, torchrun: bool, runtime: dict, env: dict, rdzv_id: str, hostnames=None) -> list[str]:
    """The command line this node runs for `stage` (pure: the unit tests call it)."""
    nproc, nnodes = int(runtime.get("nproc_per_node", 1)), int(runtime.get("nnodes", 1))
    how = mode(torchrun, runtime, env)
    if how == "plain":
        return [sys.executable, "-m", "nanopipe.cli", stage]
    if how == "standalone":
        return [_torchrun(), "--standalone", f"--nproc-per-node={nproc}", "-m", "nanopipe.cli", stage]
    backend = runtime.get("rdzv_backend", "static")
    if how == "slurm":
        endpoint = runtime.get("rdzv_endpoint") or f"{slurm_head(env, hostnames)}:{DEFAULT_PORT}"
        # $SLURM_PROCID is expanded by each task's shell, not here: task k is node rank k.
        inner = agent(stage, nproc, nnodes, "$SLURM_PROCID", backend, endpoint, rdzv_id)
        script = "exec " + " ".join(a if a.startswith("--node-rank=") else shlex.quote(a) for a in inner)
        return ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                *shlex.split(runtime.get("srun_args") or ""), "bash", "-c", script]
    endpoint = runtime.get("rdzv_endpoint") or ""
    _split_endpoint(endpoint)
    return agent(stage, nproc, nnodes, env.get("NANOPIPE_NODE_RANK", "0"), backend, endpoint, rdzv_id)


# -----------------------------------------------------------------------------
# Several nodes without SLURM: node 0 announces each stage it runs, the others follow.


def announcement(stage: str, runtime: dict, rdzv_id: str, params_sha: str) -> dict:
    return {"stage": stage, "rdzv_id": rdzv_id, "nproc_per_node": int(runtime["nproc_per_node"]),
            "nnodes": int(runtime["nnodes"]), "rdzv_backend": runtime.get("rdzv_backend", "static"),
            "rdzv_endpoint": runtime["rdzv_endpoint"], "params_sha256": params_sha}


def announce_and_run(cmd: list[str], ann: dict, env: dict) -> int:
    """Node 0: hold the announcement for as long as this stage runs, then withdraw it."""
    from torch.distributed import TCPStore

    host, port = _split_endpoint(ann["rdzv_endpoint"])
    store = TCPStore(host, port + 1, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    store.set(ANNOUNCE_KEY, json.dumps(ann))
    print(f"[launch] announced {ann['stage']} ({ann['rdzv_id']}) on {host}:{port + 1}", file=sys.stderr, flush=True)
    child = subprocess.Popen(cmd, env=env)
    # this launcher stays as node 0's parent (it holds the announcement), so it passes on the signals
    # torchrun and SLURM stop a run with: the stage then closes its MLflow run as KILLED
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _frame: child.send_signal(s))
    try:
        return child.wait()
    finally:
        del store


def read_announcement(host: str, port: int) -> dict | None:
    """The stage node 0 is running now, or None when it runs none (or is not reachable yet)."""
    import socket

    from torch.distributed import TCPStore

    try:  # a plain connect first: TCPStore's client logs a C++ stack trace for every refused attempt
        socket.create_connection((host, port + 1), timeout=2).close()
    except OSError:
        return None
    try:
        store = TCPStore(host, port + 1, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=2))
        return json.loads(store.get(ANNOUNCE_KEY)) if store.check([ANNOUNCE_KEY]) else None
    except Exception:  # nothing listening: node 0 is between stages, or not started yet
        return None


def follow(runtime: dict, env: dict, params_sha: str, idle_timeout: float, poll: float = 1.0) -> int:
    """Join every stage node 0 announces, once each; stop after `idle_timeout` s without a new one."""
    node_rank = env.get("NANOPIPE_NODE_RANK")
    if not node_rank or node_rank == "0":
        sys.exit("--follow is for the other nodes: set NANOPIPE_NODE_RANK to this node's rank (1 .. nnodes-1)")
    host, port = _split_endpoint(runtime.get("rdzv_endpoint") or "")
    joined, idle_since, failures = set(), time.time(), 0
    print(f"[follow] node {node_rank}: waiting for stages announced on {host}:{port + 1}", file=sys.stderr, flush=True)
    while time.time() - idle_since < idle_timeout:
        ann = read_announcement(host, port)
        if ann is None or ann["rdzv_id"] in joined:
            time.sleep(poll)
            continue
        joined.add(ann["rdzv_id"])
        if ann["params_sha256"] != params_sha:
            print(f"[follow] node {node_rank}: params.yaml here differs from node 0's; not joining {ann['stage']} "
                  "(multi-node runs need one working directory on a shared filesystem)", file=sys.stderr, flush=True)
            failures += 1
            continue
        cmd = agent(ann["stage"], ann["nproc_per_node"], ann["nnodes"], node_rank, ann["rdzv_backend"],
                    ann["rdzv_endpoint"], ann["rdzv_id"])
        print("[follow] + " + " ".join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, env=env).returncode
        failures += rc != 0
        print(f"[follow] node {node_rank}: {ann['stage']} ended ({rc})", file=sys.stderr, flush=True)
        idle_since = time.time()
    print(f"[follow] node {node_rank}: no new stage for {idle_timeout:.0f} s; done", file=sys.stderr, flush=True)
    return 1 if failures else 0


def read_params(path: str = "params.yaml") -> tuple[bytes, dict]:
    """(raw bytes, the `runtime` section); a missing, unparseable or wrongly shaped file exits with one line."""
    fix = "regenerate it with `nanopipe compose` (e.g. `python -m nanopipe.cli compose experiment=smoke`)"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        sys.exit(f"{path}: cannot be read ({e.strerror}); {fix}")
    try:
        params = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        sys.exit(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or type(e).__name__}); {fix}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        sys.exit(f"{path}: expected a mapping of config sections (data:, tokenizer:, runtime:, ...), "
                 f"found a YAML {type(params).__name__}; {fix}")
    runtime = params.get("runtime") or {}
    if not isinstance(runtime, dict):
        sys.exit(f"{path}: expected `runtime` to be a mapping (nproc_per_node:, nnodes:, ...), "
                 f"found a YAML {type(runtime).__name__}; {fix}")
    return raw, runtime


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    raw, runtime = read_params()
    params_sha = hashlib.sha256(raw).hexdigest()
    env = environment(dict(os.environ))
    if argv[0] == "--follow":
        idle = float(argv[argv.index("--idle-timeout") + 1]) if "--idle-timeout" in argv else 3600.0
        return follow(runtime, env, params_sha, idle)
    stage, torchrun = argv[0], "--torchrun" in argv[1:]
    rdzv_id = rendezvous_id(stage, env)
    cmd = command(stage, torchrun, runtime, env, rdzv_id)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    if mode(torchrun, runtime, env) == "torchrun" and env.get("NANOPIPE_NODE_RANK", "0") == "0":
        return announce_and_run(cmd, announcement(stage, runtime, rdzv_id, params_sha), env)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
