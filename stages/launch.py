#!/usr/bin/env python3
"""Launch one nanopipe stage the way dvc.yaml asks: `python stages/launch.py <stage> [--torchrun]`.

It runs `python -m nanopipe.cli <stage>`, which runs the stage module src/nanopipe/stages/<stage>.py
through the stage contract (src/nanopipe/stage.py) on params.yaml.

CPU stages run as a plain process. With --torchrun (the stages that compute on a device: pretrain,
base_eval, sft, rl, chat_eval), `runtime.nproc_per_node` and `runtime.nnodes` from params.yaml
decide: both 1 runs a plain process; otherwise it execs
    torchrun --nproc-per-node N [--nnodes M --node-rank R --rdzv-backend B --rdzv-endpoint H:P --rdzv-id ID]
             -m nanopipe.cli <stage>
Multi-node: run the same stage on every node with NANOPIPE_NODE_RANK set (node 0 runs
`dvc repro`, the others `python stages/launch.py <stage> --torchrun`). See README.
"""
import os
import shutil
import sys

import yaml


def command(stage: str, torchrun: bool, runtime: dict) -> list[str]:
    nproc, nnodes = int(runtime.get("nproc_per_node", 1)), int(runtime.get("nnodes", 1))
    if not torchrun or (nproc == 1 and nnodes == 1):
        return [sys.executable, "-m", "nanopipe.cli", stage]
    tr = shutil.which("torchrun") or "torchrun"
    cmd = [tr, f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", f"--node-rank={os.environ.get('NANOPIPE_NODE_RANK', '0')}",
                f"--rdzv-backend={runtime.get('rdzv_backend', 'static')}", f"--rdzv-endpoint={runtime['rdzv_endpoint']}",
                f"--rdzv-id={runtime.get('rdzv_id', 'nanopipe')}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "nanopipe.cli", stage]


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    stage, torchrun = args[0], "--torchrun" in args[1:]
    with open("params.yaml") as f:
        runtime = (yaml.safe_load(f) or {}).get("runtime", {})
    cmd = command(stage, torchrun, runtime)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execvp(cmd[0], cmd)
