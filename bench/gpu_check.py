"""GPU check: does this machine run nanopipe the way nanochat runs on 8xH100? One script, offline,
about 10 minutes on one GPU. It drives the real stages (`python -m nanopipe.cli <stage>`, through
torchrun where a stage has ranks) in a temp copy of the repo, on the embedded offline data, and
prints a table of our numbers beside nanochat's published ones, with their sources:

1. attention backend: fa3 on Hopper (SM90), fa2 on other SM80+ GPUs (nanopipe.model.attention),
   printed with the reason; a different backend is a FAIL (`--expect-backend` to expect another);
2. pretrain d12 (model.depth=12) for 20 steps, torch.compile'd, fp8 where the GPU has fp8 tensor
   cores and torchao is installed (else "fp8: not available (reason)"): median tok/s and MFU over
   the steady steps (the stage's own StepMeter: its first two steps, with compilation, are left out);
3. base_eval on 2 ranks (1 if there is only one GPU) from a COLD eval-bundle cache: a CORE-format
   bundle built here from the val shard, served by a local HTTP server that counts the downloads;
4. serve: the serve stage (uvicorn) on the d12 model, 8 concurrent streaming clients on the
   OpenAI-compatible endpoint (the `openai` client if installed, else httpx): aggregate tok/s and
   p50/p95 time to first token;
5. d26 (the speedrun model, fp8, device batch 16) for a few steps, if the time budget allows:
   tok/s per GPU and the speedrun time it projects for 8 GPUs, against the leaderboard.

Nothing touches the network: HF_HUB_OFFLINE=1 (FA3 comes from the `kernels` hub cache or not at
all), the data is the embedded source (Python's own stdlib text), the tokenizer is trained here in
a second (or copied from models/tokenizer when its vocab size matches), the CORE bundle is local.

    python bench/gpu_check.py                        # every visible GPU (pretrain on all of them)
    python bench/gpu_check.py --gpus 1               # one GPU: ~10 min
    python bench/gpu_check.py --gpus 8               # 8 GPUs: pretrain on 8 ranks, base_eval on 2
    torchrun --nproc-per-node=8 bench/gpu_check.py   # the same: rank 0 drives, the other ranks exit
    python bench/gpu_check.py --cpu-smoke            # CPU, tiny model, 2 gloo ranks, ~1-2 min (tests)
    ... --json out.json --keep-workdir DIR --expect-backend fa2 --no-d26

Exit status: 1 if any check FAILs (the table says which), 0 otherwise. INFO rows are not checks
(their numbers are not comparable with the reference: 20 steps are not a training run), SKIP
rows could not run here (the reason is printed).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
T_START = time.time()

# -----------------------------------------------------------------------------
# nanochat's published figures (8xH100), each with where it is written. nanochat at
# github.com/karpathy/nanochat @92d63d4 (HEAD when this was written, Jul 2026).

NANOCHAT = "karpathy/nanochat@92d63d4"
SOURCES = {
    "fa": f"{NANOCHAT} nanochat/flash_attention.py: FA3 from the kernels hub on SM90 (varunneal/flash-attention-3), "
          "else SDPA; dev/LOG.md '2026-01-11: Flash Attention 3 Integration': ~9% more tok/s than FA2",
    "fp8": f"{NANOCHAT} dev/LOG.md '2026-02-02: FP8 Training with torchao': d26 tok/sec on 8xH100, bf16 630K, "
           "fp8 tensorwise 740K (1.17x); 'd12 was still slower with FP8'",
    "d12_mfu": f"{NANOCHAT} dev/LOG.md '2026-01-12: Multi-Token Prediction': d12 baseline MFU 41% (8xH100, bf16)",
    "d12_bpb": f"{NANOCHAT} dev/LOG.md '2026-01-11: Per-Layer Residual Scalars': d12 val_bpb 0.9693 after a full run",
    "d12_time": f"{NANOCHAT} README.md 'Research': d12 is a '~5 min pretraining run' on 8xH100",
    "core": f"{NANOCHAT} README.md leaderboard / dev/LEADERBOARD.md Run 3 (d26, fp8, ratio 8.25, 1M batch, "
            "FineWeb-EDU: our speedrun preset): 2.76 h, CORE 0.2602, val_bpb 0.74645; GPT-2 CORE 0.256525",
    "serve": f"{NANOCHAT}: no published serving throughput (scripts/infer_bench.py measures decode, no figure published)",
}
REF = {"d12_mfu": 41.0, "d12_minutes": 5.0, "d26_tok_s_8gpu": 740_000, "speedrun_hours": 2.76, "speedrun_core": 0.2602,
       "speedrun_bpb": 0.74645, "speedrun_ratio": 8.25, "h100_peak": 989e12}

checks: list[dict] = []  # the table: one row per check


def check(name, ours, reference, source, status, **details):
    row = dict(check=name, ours=ours, reference=reference, source=source, status=status, **details)
    checks.append(row)
    print(f"[{time.time() - T_START:6.0f}s] {status:4s} {name}: {ours}", flush=True)
    return row


def say(msg):
    print(f"[{time.time() - T_START:6.0f}s] {msg}", flush=True)


# -----------------------------------------------------------------------------
# Running stages in the work copy: each a fresh process, as dvc.yaml runs them, its output in logs/

def child_env(workdir: Path, threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items()  # an outer torchrun's variables would confuse the inner ones
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI") and not k.startswith("TORCHELASTIC")}
    env.update(PYTHONPATH=os.pathsep.join([str(workdir / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1",
               PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def stage_cmd(stage: str, nproc: int, overrides=()) -> list[str]:
    launch = [sys.executable, "-m", "nanopipe.cli"]
    if nproc > 1:  # torch.distributed.run is torchrun, without depending on the script being on PATH
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                  "-m", "nanopipe.cli"]
    return launch + [stage, *overrides]


def run_stage(args, stage, nproc=1, overrides=(), log_name=None, timeout=None):
    """Run one stage to completion; returns (ok, wall seconds, log text)."""
    log = args.workdir / "logs" / f"{log_name or stage}.log"
    cmd = stage_cmd(stage, nproc, overrides)
    say(f"$ {' '.join(cmd[1:])}   (log: {log})")
    t0 = time.time()
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, cwd=args.workdir, env=child_env(args.workdir, args.threads), stdout=f, check=False,
                               stderr=subprocess.STDOUT, timeout=timeout or args.stage_timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log.read_text(errors="replace")
    if rc != 0:
        say(f"{stage} failed ({rc}); last lines of {log}:\n" + "\n".join(text.splitlines()[-25:]))
    return rc == 0, time.time() - t0, text


def metrics(args, name):
    path = args.workdir / "metrics" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -----------------------------------------------------------------------------
# The CORE bundle: three tasks in the DCLM layout (nanopipe.eval.core), built from the val shard,
# zipped and served by a local HTTP server that counts the GETs of the zip (the "downloads").

def build_core_bundle(workdir: Path, n: int) -> Path:
    import pyarrow.parquet as pq

    from nanopipe.data.shards import split_paths
    from nanopipe.tokenizer import load_tokenizer
    _, val_path = split_paths(json.loads((workdir / "data/shards/manifest.json").read_text()), workdir / "data/shards")
    texts = [t for t in pq.read_table(val_path, columns=["text"]).column("text").to_pylist() if len(t) > 400]
    tok = load_tokenizer(workdir / "models/tokenizer")
    rng = random.Random(0)

    def snippet(t, k=160):
        start = rng.randrange(0, max(1, len(t) - 2 * k))
        return " ".join(t[start:start + k].split()[1:-1])

    mc, schema, lm = [], [], []
    while len(mc) < n or len(schema) < n or len(lm) < n:
        a, b, c, d = (rng.choice(texts) for _ in range(4))
        sa, cont = snippet(a, 240), None
        ws = sa.split()
        if len(ws) < 12:
            continue
        ctx, cont = " ".join(ws[:-6]), " ".join(ws[-6:])
        others = [" ".join(snippet(x, 80).split()[:6]) for x in (b, c, d)]
        if len(mc) < n and all(others):  # which continuation follows? (random baseline 25%)
            choices = [cont, *others]
            rng.shuffle(choices)
            mc.append({"query": ctx, "choices": choices, "gold": choices.index(cont)})
        if len(schema) < n:  # which context does the shared continuation follow? (50%)
            opts = [ctx, " ".join(snippet(b, 240).split()[:len(ws) - 6])]
            gold = rng.randrange(2)
            opts = opts if gold == 0 else opts[::-1]
            if all(opts):
                schema.append({"context_options": opts, "continuation": cont, "gold": gold})
        wa = [i for i, w in enumerate(ws) if w.isalpha() and i > 8]
        if len(lm) < n and wa:  # exact greedy continuation of one word (0%)
            i = wa[-1]
            context, word = " ".join(ws[:i]).strip(), ws[i]
            t0, t1 = tok.encode([context, f"{context} {word}"], prepend=tok.get_bos_token_id())
            if context and t0 == t1[:len(t0)] and len(t1) > len(t0):  # the stage asks for a strict prefix
                lm.append({"context": context, "continuation": word})
    root = workdir / "served_src" / "eval_bundle"
    (root / "eval_data").mkdir(parents=True, exist_ok=True)
    (root / "core.yaml").write_text(
        "icl_tasks:\n"
        "- {label: gc_mc, dataset_uri: gc_mc.jsonl, num_fewshot: [2], icl_task_type: multiple_choice}\n"
        "- {label: gc_schema, dataset_uri: gc_schema.jsonl, num_fewshot: [1], icl_task_type: schema}\n"
        "- {label: gc_lm, dataset_uri: gc_lm.jsonl, num_fewshot: [0], icl_task_type: language_modeling}\n")
    # (no continuation_delimiter: the default ' ', which the LM items above were checked against)
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ngc_mc,25\ngc_schema,50\ngc_lm,0\n")
    for name, rows in (("gc_mc", mc), ("gc_schema", schema), ("gc_lm", lm)):
        (root / "eval_data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    served = workdir / "served"
    served.mkdir(exist_ok=True)
    with zipfile.ZipFile(served / "eval_bundle.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, "eval_bundle/" + str(p.relative_to(root)))  # upstream's layout: a top-level eval_bundle/
    return served / "eval_bundle.zip"


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    counts: dict  # path -> GETs, set per server

    def do_GET(self):
        self.counts[self.path] = self.counts.get(self.path, 0) + 1
        super().do_GET()

    def log_message(self, *a):
        pass


def start_bundle_server(directory: Path):
    counts: dict = {}
    handler = type("Handler", (CountingHandler,), {"counts": counts})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", counts


# -----------------------------------------------------------------------------
# Serving clients: 8 streaming chats at once on /v1/chat/completions

async def stream_openai(url, i, max_tokens):
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    t0, first, n, usage = time.perf_counter(), None, 0, None
    stream = await client.chat.completions.create(
        model="nanopipe", messages=[{"role": "user", "content": f"Request {i}: tell me a story."}],
        max_tokens=max_tokens, temperature=1.0, stream=True, stream_options={"include_usage": True},
        extra_body={"top_k": 50})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content:
                first, n = first or time.perf_counter(), n + 1
    await client.close()
    return (usage if usage is not None else n), (first or time.perf_counter()) - t0


async def stream_httpx(url, i, max_tokens):
    import httpx
    body = {"model": "nanopipe", "messages": [{"role": "user", "content": f"Request {i}: tell me a story."}],
            "max_tokens": max_tokens, "temperature": 1.0, "top_k": 50, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, n, usage = time.perf_counter(), None, 0, None
    async with httpx.AsyncClient(timeout=600) as client, client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in ev.get("choices", [])):
                first, n = first or time.perf_counter(), n + 1
    return (usage if usage is not None else n), (first or time.perf_counter()) - t0


async def run_clients(url, clients, per_client, max_tokens, one):
    async def client_loop(c):
        return [await one(url, c * per_client + k, max_tokens) for k in range(per_client)]
    t0 = time.perf_counter()
    per = await asyncio.gather(*[client_loop(c) for c in range(clients)])
    wall = time.perf_counter() - t0
    reqs = [r for rs in per for r in rs]
    ttft = sorted(t for _, t in reqs)
    p95 = ttft[min(len(ttft) - 1, math.ceil(0.95 * len(ttft)) - 1)]  # nearest rank
    return dict(requests=len(reqs), tokens=sum(n for n, _ in reqs), empty=sum(n == 0 for n, _ in reqs), wall_s=wall,
                tok_s=sum(n for n, _ in reqs) / wall, ttft_p50_ms=1e3 * statistics.median(ttft), ttft_p95_ms=1e3 * p95)


# -----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, tiny model, no fp8/compile, 2 gloo ranks (tests)")
    ap.add_argument("--gpus", type=int, default=0,
                    help="GPUs for pretrain (default: all visible; under torchrun: its world size)")
    ap.add_argument("--expect-backend", choices=["fa3", "fa2", "sdpa"], help="override the expected attention backend")
    ap.add_argument("--steps", type=int, default=None, help="pretrain steps (default 20; --cpu-smoke 6)")
    ap.add_argument("--no-fp8", action="store_true", help="train d12 in bf16 even where fp8 is available")
    ap.add_argument("--no-d26", action="store_true", help="skip the d26 throughput run")
    ap.add_argument("--budget-s", type=float, default=600, help="d26 runs only if the check is still this far from it")
    ap.add_argument("--min-frac", type=float, default=0.5, help="PASS when MFU / tok/s >= this fraction of nanochat's")
    ap.add_argument("--core-examples", type=int, default=None, help="examples per CORE task (default 300; smoke 8)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per served request (default 128; smoke 24)")
    ap.add_argument("--stage-timeout", type=float, default=None)
    ap.add_argument("--keep-workdir", type=Path, default=None, help="work here (kept) instead of a temp dir")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    # Under `torchrun --nproc-per-node=N bench/gpu_check.py` rank 0 drives the check with N GPUs (it
    # launches the stages' own torchrun); the other ranks have nothing to do.
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if int(os.environ["RANK"]) != 0:
            return
        args.gpus = args.gpus or int(os.environ["WORLD_SIZE"])
        os.environ.pop("OMP_NUM_THREADS", None)  # torchrun's 1 thread per worker would slow the CPU-side stages
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before nanopipe.model.attention looks for FA3 in the hub cache

    import torch
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit(f"gpu_check: no CUDA device visible (torch {torch.__version__}); run with --cpu-smoke for the CPU mode")
    ngpu = 0 if smoke else torch.cuda.device_count()
    world = 2 if smoke else min(args.gpus or ngpu, ngpu)
    eval_ranks = 2 if smoke else min(2, ngpu)
    args.steps = args.steps or (6 if smoke else 20)
    args.threads = 1 if smoke else None  # two gloo ranks on a 2-core machine: one thread each
    args.stage_timeout = args.stage_timeout or (300 if smoke else 480)
    n_core = args.core_examples or (8 if smoke else 300)
    max_tokens = args.max_tokens or (24 if smoke else 128)
    per_client = args.requests_per_client or (1 if smoke else 2)
    tmp = None
    if args.keep_workdir:
        args.workdir = args.keep_workdir.resolve()
        shutil.rmtree(args.workdir, ignore_errors=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gpu_check_")
        args.workdir = Path(tmp.name)
    (args.workdir / "logs").mkdir(parents=True)
    if smoke:
        machine = f"CPU smoke ({os.cpu_count()} cores, torch {torch.__version__})"
    else:
        cap = torch.cuda.get_device_capability(0)
        machine = f"{ngpu}x {torch.cuda.get_device_name(0)} (SM{cap[0]}{cap[1]}), torch {torch.__version__}"
    say(f"gpu_check on {machine}; pretrain on {world} rank(s); work dir {args.workdir}")
    details = {"machine": machine, "world_size": world, "workdir": str(args.workdir)}

    # -- 1. attention backend: what nanopipe.model.attention picks for bf16 CUDA tensors --------------
    sys.path.insert(0, str(REPO / "src"))
    from nanopipe.model import attention
    if smoke:
        got, why = attention.backend_name("cpu", torch.float32), "CPU: the flash kernels need bf16/fp16 CUDA tensors"
        expected = args.expect_backend or "sdpa"
    else:
        got = attention.backend_name("cuda:0", torch.bfloat16)
        major = cap[0]
        expected = args.expect_backend or ("fa3" if major == 9 else "fa2" if major >= 8 else "sdpa")
        # the reasons a faster kernel was not loaded (the module logs them once at import; ask again)
        reasons = []
        if not attention.HAS_FA3:
            reasons.append(f"FA3: {attention._load_flash_attention_3()[1]}")
        if not attention.HAS_FA2 and got != "fa3":
            reasons.append(f"FA2: {attention._load_flash_attention_2()[1]}")
        why = {"fa3": "SM90 and the kernels hub copy of varunneal/flash-attention-3 loaded",
               "fa2": f"SM{major}x and the flash_attn package imported"}.get(got, "no flash kernel loaded")
        why += "".join(f"; {r}" for r in reasons)
    say(f"attention backend: {got} ({why}); expected {expected}"
        + (" (--expect-backend)" if args.expect_backend else " (fa3 on SM90, fa2 on other SM80+)"))
    check("attention backend", f"{got} ({why})" if got != expected else got, "fa3 on SM90, else SDPA", "fa",
          "PASS" if got == expected else "FAIL", expected=expected, reason=why)
    details["attention"] = {"backend": got, "expected": expected, "reason": why}

    # fp8: fp8 tensor cores (SM89+) and torchao; the pretrain stage refuses it anywhere else
    fp8_reason = None
    if smoke:
        fp8_reason = "CPU smoke mode (fp8 needs a CUDA GPU)"
    elif args.no_fp8:
        fp8_reason = "--no-fp8"
    elif cap < (8, 9):
        fp8_reason = f"SM{cap[0]}{cap[1]} has no fp8 tensor cores (SM89+: Ada, Hopper)"
    else:
        try:
            import torchao.float8  # noqa: F401
        except Exception as e:
            fp8_reason = f"torchao not importable ({type(e).__name__}: {e}); pip install -e '.[gpu]'"
    use_fp8 = fp8_reason is None
    say("fp8: on (torchao tensorwise)" if use_fp8 else f"fp8: not available ({fp8_reason})")

    # -- the work copy: conf + code, params.yaml composed offline ------------------------------------
    for name in ("conf", "src", "stages"):
        shutil.copytree(REPO / name, args.workdir / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", "pyproject.toml"):
        shutil.copy2(REPO / name, args.workdir / name)
    server, base_url, downloads = start_bundle_server(args.workdir / "served")
    common = ["tracking.enabled=false", "data=embedded", "data.row_group_size=16", "data.num_train_shards=3",
              f"base_eval.bundle_url={base_url}/eval_bundle.zip", "base_eval.bundle_cache=cold_bundle_cache",
              f"pretrain.num_iterations={args.steps}", "pretrain.eval_every=-1", "pretrain.sample_every=-1",
              "pretrain.save_every=-1", "pretrain.core_metric_every=-1", f"runtime.nproc_per_node={world}",
              "serve.source=base", "serve.host=127.0.0.1"]
    if smoke:  # smoke's tiny model (d2, seq 128, vocab 512), fp32 on CPU like the test suite
        overrides = ["experiment=smoke", *common, "runtime.device=cpu", "runtime.dtype=float32", "runtime.threads=1",
                     "pretrain.compile='false'", "pretrain.fp8=false", "pretrain.eval_tokens=2048",
                     "pretrain.device_batch_size=4", "pretrain.total_batch_size=1024", "base_eval.device_batch_size=4",
                     "base_eval.eval_tokens=1024", "base_eval.max_per_task=-1", "serve.max_batch=8"]
    else:  # nanochat's d12: depth 12, seq 2048, vocab 32768, batch 32 x 2048 per GPU, 2^19 tokens per step
        overrides = ["experiment=d12", *common, "model.depth=12", "pretrain.compile='true'",
                     f"pretrain.fp8={str(use_fp8).lower()}",
                     "pretrain.eval_tokens=1048576", "base_eval.eval_tokens=1048576", "base_eval.max_per_task=-1"]
    p = subprocess.run([sys.executable, "-m", "nanopipe.cli", "compose", *overrides], cwd=args.workdir,
                       env=child_env(args.workdir, None), capture_output=True, text=True, check=False)
    if p.returncode:
        sys.exit(f"gpu_check: composing the config failed:\n{p.stdout}{p.stderr}")
    details["overrides"] = overrides

    # -- data and tokenizer (offline, seconds) --------------------------------------------------------
    ok, dt, _ = run_stage(args, "download")
    import yaml
    vocab = yaml.safe_load((args.workdir / "params.yaml").read_text())["tokenizer"]["vocab_size"]
    have = REPO / "models/tokenizer"
    reuse = False
    if (have / "tokenizer.json").exists() and (have / "token_bytes.pt").exists():
        from nanopipe.tokenizer import load_tokenizer
        reuse = load_tokenizer(have).get_vocab_size() == vocab
    if reuse:
        shutil.copytree(have, args.workdir / "models/tokenizer")
        say(f"tokenizer: copied {have} (vocab {vocab})")
    else:
        ok2, _, _ = run_stage(args, "tokenizer")
        ok = ok and ok2
    if not ok:
        print("\ngpu_check: could not build the offline data/tokenizer; see the logs above")
        return finish(args, details, tmp)

    # -- 2. pretrain d12 (20 steps): tok/s and MFU from the stage's own meter --------------------------
    ok, dt, log = run_stage(args, "pretrain", world)
    m = metrics(args, "pretrain") if ok else {}
    details["pretrain"] = {**m, "wall_s": round(dt, 1)}
    fp8_line = next((ln.strip() for ln in log.splitlines() if "FP8 training enabled" in ln), None)
    if use_fp8:
        ours = fp8_line or ("on (no conversion line in the log)" if ok else "on, but pretrain failed (logs/pretrain.log)")
        check("fp8 (torchao)", ours, "d26: fp8 740K vs bf16 630K tok/s (1.17x)", "fp8", "PASS" if fp8_line and ok else "FAIL")
    elif not use_fp8:
        hopper = not smoke and cap == (9, 0) and not args.no_fp8  # the speedrun preset needs fp8 there
        check("fp8 (torchao)", f"not available ({fp8_reason})", "fp8 on H100 (the speedrun uses --fp8)", "fp8",
              "FAIL" if hopper else "SKIP")
    if not smoke and "using PyTorch SDPA" in log and got != "sdpa":  # the ranks fell back although we did not
        check("attention backend (pretrain ranks)", "sdpa (the ranks logged an SDPA fallback)", "fa3 on SM90", "fa", "FAIL")
    label = f"d{12 if not smoke else 2} pretrain {args.steps} steps{' (fp8)' if use_fp8 else ''}"
    if not ok or not m.get("tok_per_sec"):
        check(label, "failed" if not ok else "no tok/s (too few steps?)", "", "d12_mfu", "FAIL")
    else:
        tok_gpu = m["tok_per_sec"] / world
        if smoke:
            check(f"{label}: tok/s", f"{m['tok_per_sec']:,.0f} tok/s ({world} CPU ranks)", "n/a on CPU", "d12_mfu",
                  "PASS" if math.isfinite(m["train_loss"]) else "FAIL")
        else:
            ref_tok = REF["d12_mfu"] / 100 * REF["h100_peak"] / m["flops_per_token"]  # 41% of an H100, our FLOPs/token
            mfu = m.get("mfu")
            check(f"{label}: tok/s per GPU", f"{tok_gpu:,.0f}", f"~{ref_tok:,.0f} (41% MFU of an H100 at our FLOPs/token)",
                  "d12_mfu", "INFO", tok_per_sec_per_gpu=tok_gpu)
            check(f"{label}: MFU", f"{mfu:.1f}%" if mfu is not None else "n/a (unknown GPU peak)", "41% (bf16)", "d12_mfu",
                  "PASS" if mfu is not None and mfu >= args.min_frac * REF["d12_mfu"] else "FAIL", mfu=mfu)
            # what a full d12 run (ratio 10.5) would take on 8 such GPUs at this rate
            minutes = 10.5 * m["num_scaling_params"] / (8 * tok_gpu) / 60
            check("d12 full run on 8 GPUs (projected)", f"{minutes:.1f} min", "~5 min", "d12_time", "INFO")
        check(f"{label}: val bpb", f"{m['final_val_bpb']:.4f} after {args.steps} steps (not comparable)",
              "0.9693 after a full d12 run", "d12_bpb", "INFO")

    # -- 3. base_eval on 2 ranks from a cold bundle cache ------------------------------------------------
    if ok:
        zip_path = build_core_bundle(args.workdir, n_core)
        say(f"CORE bundle: {zip_path.stat().st_size:,} bytes, 3 tasks x {n_core} examples, at {base_url}/eval_bundle.zip")
        if eval_ranks < 2:
            say("base_eval: 1 rank (only one GPU visible; 2 ranks need 2 GPUs)")
        assert not (args.workdir / "cold_bundle_cache").exists()
        ok_e, dt, log = run_stage(args, "base_eval", eval_ranks)
        e = metrics(args, "base_eval") if ok_e else {}
        n_dl = downloads.get("/eval_bundle.zip", 0)
        core = e.get("core_metric")
        details["base_eval"] = {**e, "wall_s": round(dt, 1), "downloads": n_dl, "ranks": eval_ranks}
        ours = (f"finished in {dt:.0f} s on {eval_ranks} rank(s); CORE {core:.4f}" if core is not None else
                f"finished on {eval_ranks} rank(s); CORE unavailable ({e.get('core_unavailable')})" if ok_e else "failed")
        ours += f"; {n_dl} download(s)"
        # one download whatever the ranks: rank 0 fetches, the others wait for it
        status = "PASS" if ok_e and core is not None and n_dl == 1 else "FAIL"
        check(f"base_eval {eval_ranks} ranks, cold cache", ours, "CORE 0.2602 for d26 (not comparable: local bundle)",
              "core", status, core=core, downloads=n_dl)
    else:
        check("base_eval, cold cache", "not run (pretrain failed)", "", "core", "FAIL")
    server.shutdown()

    # -- 4. serve: 8 concurrent streaming clients on the OpenAI endpoint --------------------------------
    if ok:
        serve_check(args, details, max_tokens, per_client)
    else:
        check(f"serve {args.clients} streams", "not run (pretrain failed)", "", "serve", "FAIL")

    # -- 5. d26, the speedrun model: tok/s per GPU and the speedrun time it projects ---------------------
    remaining = args.budget_s - (time.time() - T_START)
    if smoke or args.no_d26:
        check("d26 fp8 tok/s per GPU", "not run" + (" (CPU smoke)" if smoke else " (--no-d26)"), "92,500 (740K / 8)",
              "fp8", "SKIP")
    elif remaining < 240:
        check("d26 fp8 tok/s per GPU", f"not run: {remaining:.0f} s left of --budget-s {args.budget_s:.0f}",
              "92,500 (740K / 8)", "fp8", "SKIP")
    else:
        # nanochat's Run 3 per GPU: device batch 16 x 2048, 1M-token steps on 8 GPUs = 4 micro-steps per GPU per step
        d26 = ["model.depth=26", "pretrain.device_batch_size=16", f"pretrain.num_iterations={min(args.steps, 10)}",
               f"pretrain.total_batch_size={16 * 2048 * world * 4}", "pretrain.eval_tokens=32768"]
        ok26, dt, log = run_stage(args, "pretrain", world, d26, log_name="pretrain_d26", timeout=max(60, remaining - 30))
        m = metrics(args, "pretrain") if ok26 else {}
        details["pretrain_d26"] = {**m, "wall_s": round(dt, 1)}
        if not ok26 or not m.get("tok_per_sec"):
            why = "out of GPU memory" if "OutOfMemoryError" in log else "see logs/pretrain_d26.log"
            check("d26 tok/s per GPU", f"failed ({why})", "92,500 (740K / 8)", "fp8", "FAIL")
        else:
            tok_gpu = m["tok_per_sec"] / world
            ref = REF["d26_tok_s_8gpu"] / 8
            ours = f"{tok_gpu:,.0f}" + (f" (MFU {m['mfu']:.1f}%)" if m.get("mfu") is not None else "")
            check(f"d26 {'fp8' if use_fp8 else 'bf16'} tok/s per GPU", ours, f"{ref:,.0f} (740K / 8, fp8)", "fp8",
                  "PASS" if tok_gpu >= args.min_frac * ref else "FAIL")
            hours = REF["speedrun_ratio"] * m["num_scaling_params"] / (8 * tok_gpu) / 3600
            check("speedrun d26 on 8 GPUs (projected)", f"{hours:.2f} h of training", "2.76 h, CORE 0.2602, bpb 0.74645",
                  "core", "INFO")
    return finish(args, details, tmp)


def serve_check(args, details, max_tokens, per_client):
    import httpx
    port = free_port()
    log = open(args.workdir / "logs" / "serve.log", "w")
    cmd = stage_cmd("serve", 1, [f"serve.port={port}", f"serve.max_tokens={max(max_tokens, 64)}"])
    say(f"$ {' '.join(cmd[1:])} (uvicorn; log: {log.name})")
    proc = subprocess.Popen(cmd, cwd=args.workdir, env=child_env(args.workdir, 2 if args.cpu_smoke else None),
                            stdout=log, stderr=subprocess.STDOUT)
    url, label = f"http://127.0.0.1:{port}", f"serve {args.clients} streams"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("ready"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.25)
        try:
            import openai  # noqa: F401
            one, client = stream_openai, "openai"
        except ImportError:
            one, client = stream_httpx, "httpx"
        asyncio.run(run_clients(url, 1, 1, 8, one))  # warm-up: the first decode allocates caches
        r = asyncio.run(run_clients(url, args.clients, per_client, max_tokens, one))
        r["client"] = client
        details["serve"] = r
        ours = (f"{r['tok_s']:,.0f} tok/s over {r['requests']} requests ({client}); TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                f"p95 {r['ttft_p95_ms']:.0f} ms")
        check(label, ours, "none published", "serve", "PASS" if r["tokens"] > 0 and r["empty"] == 0 else "FAIL", **r)
    except Exception as e:
        log.flush()
        tail = "\n".join((args.workdir / "logs/serve.log").read_text(errors="replace").splitlines()[-20:])
        say(f"serve failed: {type(e).__name__}: {e}\n{tail}")
        check(label, f"failed: {type(e).__name__}: {e}", "none published", "serve", "FAIL")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def finish(args, details, tmp) -> int:
    """The table, the sources, the JSON; non-zero when something FAILed (or nothing ran)."""
    names = sorted({r["source"] for r in checks}, key=list(SOURCES).index)
    ref_no = {s: i + 1 for i, s in enumerate(names)}
    rows = [("check", "ours", "nanochat reference", "status")] + [
        (r["check"], r["ours"], f"{r['reference']} [{ref_no[r['source']]}]" if r["reference"] else "", r["status"])
        for r in checks]
    w = [min(max(len(row[i]) for row in rows), cap) for i, cap in enumerate((44, 80, 60, 6))]

    def cut(s, n):
        return s if len(s) <= n else s[:n - 1] + "…"
    print(f"\ngpu_check: {details['machine']} ({time.time() - T_START:.0f} s)")
    for i, row in enumerate(rows):
        print(" | ".join(cut(c, n).ljust(n) for c, n in zip(row, w)))
        if i == 0:
            print("-+-".join("-" * n for n in w))
    print("\nsources:")
    for s in names:
        print(f"  [{ref_no[s]}] {SOURCES[s]}")
    failed = [r["check"] for r in checks if r["status"] == "FAIL"]
    verdict = "FAIL" if failed or not checks else "PASS"
    print(f"\n{verdict}" + (f": {', '.join(failed)}" if failed else ""))
    if args.json:
        out = {"verdict": verdict, "elapsed_s": round(time.time() - T_START, 1), "checks": checks,
               "sources": {s: SOURCES[s] for s in names}, "details": details}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 1 if verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
