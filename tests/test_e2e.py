"""The whole chain through real `dvc repro` on the smoke preset, in a temporary copy of the repo."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import run, subprocess_env

sys.path.insert(0, str(Path(__file__).resolve().parent / "eval"))
from test_core import write_bundle, zip_bundle  # noqa: E402  (the CORE fixture bundle)

CHAIN = ["download", "tokenizer", "tok_eval", "pretrain", "base_eval", "sft", "rl", "chat_eval", "export", "report"]


def _ran(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


def check_core(repo: Path, bundle: Path):
    """base_eval computed CORE on the local fixture bundle (not "unavailable"), and its number is what
    evaluate_core gives for models/base on that bundle in this process."""
    from nanopipe.eval.core import evaluate_core
    from nanopipe.model.checkpoint import load_model
    from nanopipe.tokenizer import load_tokenizer

    base_eval = json.loads((repo / "metrics/base_eval.json").read_text())
    assert "core_unavailable" not in base_eval, base_eval.get("core_unavailable")
    core = base_eval["core_metric"]
    assert isinstance(core, float) and math.isfinite(core), core
    assert set(base_eval["core_centered"]) == {"tiny_mc", "tiny_schema", "tiny_lm"}
    tokenizer = load_tokenizer(repo / "models/tokenizer")
    model, _ = load_model(repo / "models/base", "cpu", "eval", tokenizer=tokenizer)
    max_per_task = yaml.safe_load((repo / "params.yaml").read_text())["base_eval"]["max_per_task"]
    direct = evaluate_core(model, tokenizer, "cpu", bundle, max_per_task=max_per_task)
    assert abs(direct["core_metric"] - core) <= 1e-6, (direct["core_metric"], core)
    for task, centered in direct["centered_results"].items():
        assert abs(base_eval["core_centered"][task] - centered) <= 1e-6, task


def cli_reply(repo: Path, prompt: str, max_tokens: int) -> str:
    """`nanopipe chat --prompt` at temperature 0: the greedy reply of the newest model."""
    out = run([sys.executable, "-m", "nanopipe.cli", "chat", "--prompt", prompt, "--temperature", "0",
               "--max-tokens", str(max_tokens)], repo).stdout
    assert out.endswith("\n"), repr(out)  # one-shot: stdout holds the reply and nothing else
    return out[:-1]


def check_served_reply(base_url: str, prompt: str, max_tokens: int, greedy: str):
    """The OpenAI route at temperature 0 answers the CLI's greedy reply, as one chat.completion and as a
    well-formed stream: a role chunk, content chunks, one finish chunk, then [DONE]."""
    body = {"model": "nanopipe", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    r = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and len(out["choices"]) == 1
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": greedy, "refusal": None}  # OpenAI's message shape
    n = out["usage"]["completion_tokens"]
    assert 1 <= n <= max_tokens
    assert choice["finish_reason"] == ("length" if n == max_tokens else "stop"), (choice["finish_reason"], n)

    with httpx.stream("POST", f"{base_url}/v1/chat/completions", timeout=60, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] and len(c["choices"]) == 1
               for c in chunks), chunks
    deltas = [c["choices"][0]["delta"] for c in chunks]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""} and finishes[0] is None
    assert deltas[-1] == {} and finishes[-1] == choice["finish_reason"]
    middle = deltas[1:-1]
    assert middle and all(set(d) == {"content"} for d in middle) and all(f is None for f in finishes[1:-1])
    assert "".join(d["content"] for d in middle) == greedy


@pytest.mark.e2e
def test_whole_chain_through_dvc(repo_copy, tmp_path):
    # CORE on a local fixture bundle (tests/eval/test_core.py), fetched from a file:// URL like the real one
    bundle = write_bundle(tmp_path / "core_bundle")
    core_url = f"base_eval.bundle_url={zip_bundle(bundle, tmp_path / 'eval_bundle.zip').as_uri()}"
    repo = repo_copy("experiment=smoke", core_url)
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
    check_core(repo, bundle)
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
    run([sys.executable, "-m", "nanopipe.cli", "compose", "experiment=smoke", core_url, "sft.matrix_lr=0.01"], repo)
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

    # The CLI chat answers from the newest model (greedy: what the server must answer too).
    prompt, max_tokens = "Who are you?", 24
    greedy = cli_reply(repo, prompt, max_tokens)
    assert greedy.strip()

    # The documented server command serves the trained model over HTTP (OpenAI-compatible route).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run([sys.executable, "-m", "nanopipe.cli", "compose", "experiment=smoke", core_url, "sft.matrix_lr=0.01", f"serve.port={port}"], repo)
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
        check_served_reply(f"http://127.0.0.1:{port}", prompt, max_tokens, greedy)
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
    # Serving through DVC leaves the git tree clean: the serve stage's committed dvc.lock is rewritten unchanged.
    assert run(["git", "status", "--porcelain", "--", "stages"], repo).stdout == ""

    # Every stage run is in MLflow.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["nanopipe"])
    assert set(runs["tags.stage"]) >= set(CHAIN) | {"serve"}
    assert (runs["status"] == "FINISHED").all()
