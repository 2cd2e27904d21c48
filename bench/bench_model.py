"""Pretraining step throughput on CPU: forward + backward + optimizer step of the GPT, eager or
torch.compile'd (model and optimizer kernels), in fp32 or under bf16 autocast (what
`runtime.dtype=auto` picks on CPUs with native bf16, AVX512-BF16/AMX), each variant in a fresh
process so peak RSS is its own. Denormals are flushed, as the stages do on CPU.

Model: depth 4 (n_embd 256, 2 heads of 128), vocab 4096, sequence_len 256, window pattern L (the
tiny/cpu presets' setting; pass --window-pattern SSSL to see the slow masked-SDPA path), batch 8
rows, random tokens; MuonAdamW with the base_train default LRs. Each variant: --warmup steps
(the first one includes compilation, reported as "first step"), then the median of --steps steps.

    PYTHONPATH=src python bench/bench_model.py [--threads 2] [--steps 30] \
        [--variants eager-fp32 eager-bf16 compiled-fp32 compiled-bf16] [--json out.json]

Anchor (upstream nanochat on the 2-core dev machine, same model, compiled, fp32 as nanochat runs on
CPU): ~4,860 tok/s, 421 ms/step, peak RSS 1.37 GiB, ~51 s compile.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ANCHOR = {"variant": "nanochat (anchor)", "tok_per_s": 4860, "ms_per_step": 421, "peak_rss_gib": 1.37, "first_step_s": 51}


VARIANTS = ["eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16"]


def run_variant(variant: str, threads: int, steps: int, warmup: int, window_pattern: str) -> dict:
    import torch
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    from nanopipe.model.gpt import config_from_depth, create_model, maybe_compile
    from nanopipe.runtime import autocast_ctx

    compiled = variant.startswith("compiled")
    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32

    B, T, V = 8, 256, 4096
    torch.manual_seed(0)
    model = create_model(config_from_depth(4, vocab_size=V, sequence_len=T, window_pattern=window_pattern), "cpu")
    train_model = maybe_compile(model, compiled)
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2,
                                      adam_betas=(0.8, 0.95), scalar_lr=0.5, compile=compiled)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)

    def step():
        t0 = time.perf_counter()
        with autocast_ctx("cpu", dtype):
            loss = train_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    first, _ = step()
    for _ in range(warmup - 1):
        step()
    times, losses = zip(*(step() for _ in range(steps)))
    med = statistics.median(times)
    return {"variant": variant, "tok_per_s": round(B * T / med),
            "ms_per_step": round(med * 1000, 1), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "first_step_s": round(first, 1), "final_loss": round(losses[-1], 4), "threads": threads,
            "window_pattern": window_pattern}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--window-pattern", default="L")
    ap.add_argument("--variants", nargs="+", default=["eager-fp32", "eager-bf16", "compiled-bf16"], choices=VARIANTS)
    ap.add_argument("--warm-cache", action="store_true", help="reuse the inductor cache (default: a fresh one, so "
                    "'first step' is a cold compile like the anchor's)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:  # one measurement in this (fresh) process; the parent reads the last line
        print(json.dumps(run_variant(args.child, args.threads, args.steps, args.warmup, args.window_pattern)))
        return

    rows, load_before = [], os.getloadavg()[0]
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant, "--threads", str(args.threads), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--window-pattern", args.window_pattern]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        cache = None if args.warm_cache else tempfile.mkdtemp(prefix="bench_model_inductor_")
        if cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        finally:
            if cache:
                shutil.rmtree(cache, ignore_errors=True)
        if p.returncode != 0:
            sys.exit(f"{variant} run failed:\n{p.stderr[-3000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))

    print(f"GPT d4 / seq 256 / batch 8 / vocab 4096 / window {args.window_pattern} / {args.threads} threads, CPU, "
          f"median of {args.steps} steps (fwd+bwd+optimizer)")
    load = (load_before, os.getloadavg()[0])
    print(f"1-min load average before/after: {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} cores"
          + ("  (WARNING: busy machine, timings are unreliable)" if load[0] > 0.5 * (os.cpu_count() or 1) else ""))
    print(f"{'variant':<20}{'tok/s':>8}{'x anchor':>10}{'ms/step':>10}{'peak RSS GiB':>14}{'first step s':>14}")
    for r in rows + [ANCHOR]:
        ratio = r["tok_per_s"] / ANCHOR["tok_per_s"]
        print(f"{r['variant']:<20}{r['tok_per_s']:>8,}{ratio:>10.2f}{r['ms_per_step']:>10}{r['peak_rss_gib']:>14}{r['first_step_s']:>14}")
    if args.json:
        from nanopipe.artifacts import write_json
        write_json(args.json, {"results": rows, "anchor": ANCHOR, "loadavg_before_after": load})


if __name__ == "__main__":
    main()
