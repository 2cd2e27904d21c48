"""The whole chain through real `dvc repro` on the smoke preset, in a temporary copy of the repo."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from helpers import run, subprocess_env

CHAIN = ["download", "tokenizer", "tok_eval", "pretrain", "base_eval", "sft", "rl", "chat_eval", "export", "report"]


def _ran(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


@pytest.mark.e2e
def test_whole_chain_through_dvc(repo_copy):
    repo = repo_copy("experiment=smoke")
    out = run(["dvc", "repro"], repo, timeout=1500).stdout
    ran = _ran(out)
    assert sorted(ran) == sorted(CHAIN), out
    for before, after in [("download", "tokenizer"), ("tokenizer", "pretrain"), ("pretrain", "sft"), ("sft", "rl"),
                          ("rl", "chat_eval"), ("chat_eval", "export"), ("export", "report")]:
        assert ran.index(before) < ran.index(after)

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    flat = json.dumps(metrics)
    for key in ("train_rows", "bytes_per_token_val", "final_val_bpb", "val_bpb", "ChatCORE", "wall_time_s"):
        assert f'"{key}"' in flat, key
    base_eval = json.loads((repo / "metrics/base_eval.json").read_text())
    assert base_eval["core_metric"] is not None or base_eval["core_unavailable"]  # offline: says why
    import csv

    val = [float(r["val_bpb"]) for r in csv.DictReader(open(repo / "metrics/pretrain/val.csv"))]
    assert val[-1] < val[0], f"pretraining did not learn: val bpb {val}"
    report = (repo / "metrics/report.md").read_text()
    for stage in CHAIN[:-1]:
        assert stage in report

    # models/hf: transformers loads it and generates from it offline, in a fresh process.
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained('models/hf', trust_remote_code=True)\n"
            "t = AutoTokenizer.from_pretrained('models/hf')\n"
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True, return_tensors='pt')\n"
            "print(m.generate(ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1])")
    p = run([sys.executable, "-c", load], repo, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(repo / ".hf_home")})
    assert int(p.stdout.strip().splitlines()[-1]) >= 1
    assert json.loads((repo / "metrics/export.json").read_text())["verify_max_abs_logit_diff"] <= 1e-4

    # Nothing changed: nothing reruns.
    assert _ran(run(["dvc", "repro"], repo).stdout) == []
    # An SFT parameter reruns SFT and what depends on it, nothing upstream.
    run([sys.executable, "-m", "nanopipe.cli", "compose", "experiment=smoke", "sft.matrix_lr=0.01"], repo)
    assert sorted(_ran(run(["dvc", "repro"], repo, timeout=1500).stdout)) == ["chat_eval", "export", "report", "rl", "sft"]

    # Code deps follow the lifecycle (docs/pipeline.md): a serving edit reruns nothing in the chain,
    # an edit to the bits-per-byte code reruns exactly the stages that compute with it.
    def changed_stages():
        status = json.loads(run(["dvc", "status", "--json", "dvc.yaml"], repo).stdout)
        return sorted(name.split(":")[-1] for name in status)

    with open(repo / "src/nanopipe/serving/app.py", "a") as f:
        f.write("\n# an edit\n")
    assert changed_stages() == []
    with open(repo / "src/nanopipe/eval/bpb.py", "a") as f:
        f.write("\n# an edit\n")
    assert changed_stages() == ["base_eval", "pretrain", "sft"]
    run(["git", "checkout", "--", "src"], repo)
    assert changed_stages() == []

    # The plots render.
    run(["dvc", "plots", "show", "-o", str(repo / "plots_html")], repo)
    assert (repo / "plots_html" / "index.html").exists()

    # The CLI chat answers from the newest model.
    p = run([sys.executable, "-m", "nanopipe.cli", "chat", "--prompt", "Who are you?"], repo)
    assert p.stdout.strip()

    # The documented server command serves the trained model over HTTP (OpenAI-compatible route).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run([sys.executable, "-m", "nanopipe.cli", "compose", "experiment=smoke", "sft.matrix_lr=0.01", f"serve.port={port}"], repo)
    server = subprocess.Popen(["dvc", "repro", "stages/serve/dvc.yaml"], cwd=repo, env=subprocess_env(),
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "nanopipe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C to DVC and the server under it: a clean shutdown
        server.wait(timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline:  # until every process of the group has exited
            try:
                os.killpg(server.pid, 0)
                time.sleep(0.2)
            except ProcessLookupError:
                break

    # Every stage run is in MLflow.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["nanopipe"])
    assert set(runs["tags.stage"]) >= set(CHAIN) | {"serve"}
    assert (runs["status"] == "FINISHED").all()
