"""Engine decode throughput: tokens/s of Engine.generate at batch 1 and 8 (num_samples), and of
the serving scheduler's batched decode with 1 and 8 concurrent requests (no HTTP).

Model: depth 4 (n_embd 256, 2 heads of 128), vocab 4096, sequence_len 256, freshly initialised
weights (decode speed does not depend on what the weights say); torch on 2 threads, --dtype as
runtime.dtype (auto: bf16 autocast on CUDA SM80+ and on CPUs with native bf16, fp32 elsewhere).
Each measurement: a 32-token prompt, 128 new tokens at temperature 1,
one warm-up run, then the median of --repeats runs. tok/s counts every row's tokens.

    PYTHONPATH=src python bench/bench_engine.py [--threads 2] [--repeats 3] [--dtype auto] [--json out.json]

Anchor (upstream nanochat on the 2-core dev machine, same model): ~620 tok/s at batch 1,
~3,080 tok/s at batch 8.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from nanopipe.inference.engine import Engine
from nanopipe.model.gpt import config_from_depth, create_model
from nanopipe.runtime import autocast_ctx, compute_dtype
from nanopipe.serving.scheduler import Scheduler

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class StubTokenizer:
    """What the Engine and the server need: special-token ids, encode (bytes) and decode."""

    def __init__(self, vocab_size):
        self.special = {name: vocab_size - len(SPECIALS) + i for i, name in enumerate(SPECIALS)}

    def encode_special(self, name):
        return self.special[name]

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def encode(self, text, prepend=None):
        return [ord(c) % 256 for c in text]

    def decode(self, ids):
        # one printable character per ordinary token (so streamed text maps 1:1 to tokens)
        specials = set(self.special.values())
        return "".join(chr(0x4E00 + i) for i in ids if i not in specials)


def time_engine(engine, prompt, num_samples, max_tokens, seed):
    t0 = time.perf_counter()
    steps = sum(1 for _ in engine.generate(prompt, num_samples=num_samples, max_tokens=max_tokens,
                                           temperature=1.0, seed=seed))
    return steps * num_samples, time.perf_counter() - t0


def time_scheduler(sched, prompts, max_tokens, seed):
    counts = [0] * len(prompts)

    def run(i):
        tokens, _, _ = sched.generate(prompts[i], max_tokens=max_tokens, temperature=1.0, seed=seed + i)
        counts[i] = len(tokens)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def median_rate(fn, repeats):
    fn(0)  # warm-up
    rates = []
    for r in range(repeats):
        n, dt = fn(r + 1)
        rates.append(n / dt)
    return statistics.median(rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (as runtime.dtype)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(config_from_depth(args.depth, args.vocab_size, args.seq_len), device)
    model.eval()
    tokenizer = StubTokenizer(args.vocab_size)
    engine = Engine(model, tokenizer)
    gen = torch.Generator().manual_seed(0)
    prompt = [tokenizer.get_bos_token_id()] + torch.randint(0, 256, (args.prompt_len - 1,), generator=gen).tolist()
    dtype = compute_dtype(device, args.dtype)
    autocast = autocast_ctx(device, dtype)

    results = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": args.threads, "depth": args.depth,
               "vocab_size": args.vocab_size, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens}
    with autocast:
        for b in (1, 8):
            results[f"engine_batch{b}_tok_s"] = median_rate(
                lambda r, b=b: time_engine(engine, prompt, b, args.max_tokens, seed=r), args.repeats)
    sched = Scheduler(model, tokenizer, max_batch=16, autocast_dtype=dtype)
    sched.start()
    try:
        for n in (1, 8):
            results[f"scheduler_{n}req_tok_s"] = median_rate(
                lambda r, n=n: time_scheduler(sched, [prompt] * n, args.max_tokens, seed=100 * r), args.repeats)
        results["scheduler_mode"] = sched.workers[0].mode
        # batch 1, interleaved pairs (the machine's load hits both alike), by wall time and by this
        # process's CPU time (all threads: what a token costs, whatever else runs on the machine)
        ratios, cpu_ratios = [], []
        for r in range(max(args.repeats, 5)):
            c0 = time.process_time()
            with autocast:
                n_e, dt_e = time_engine(engine, prompt, 1, args.max_tokens, seed=r)
            c1 = time.process_time()
            n_s, dt_s = time_scheduler(sched, [prompt], args.max_tokens, seed=r)
            c2 = time.process_time()
            ratios.append((n_s / dt_s) / (n_e / dt_e))
            cpu_ratios.append((n_s / (c2 - c1)) / (n_e / (c1 - c0)))
        results["scheduler_vs_engine_batch1"] = ratios
        results["scheduler_vs_engine_batch1_cpu"] = cpu_ratios
    finally:
        sched.shutdown()

    print(f"Engine decode, depth {args.depth}, vocab {args.vocab_size}, {args.threads} threads, {device}, {results['dtype']}:")
    print(f"  Engine.generate  batch 1: {results['engine_batch1_tok_s']:8.0f} tok/s   (nanochat anchor ~620)")
    print(f"  Engine.generate  batch 8: {results['engine_batch8_tok_s']:8.0f} tok/s   (nanochat anchor ~3,080)")
    print(f"  Scheduler ({results['scheduler_mode']})  1 request : {results['scheduler_1req_tok_s']:8.0f} tok/s")
    print(f"  Scheduler ({results['scheduler_mode']})  8 requests: {results['scheduler_8req_tok_s']:8.0f} tok/s")
    ratios = results["scheduler_vs_engine_batch1"]
    print(f"  Scheduler 1 request / Engine batch 1, {len(ratios)} interleaved pairs: median {statistics.median(ratios):.2f}x "
          f"[{min(ratios):.2f}, {max(ratios):.2f}] (goal >= 1.0: a lone stream decodes as fast as the Engine)")
    cpu = results["scheduler_vs_engine_batch1_cpu"]
    print(f"  the same by tokens per CPU second of this process: median {statistics.median(cpu):.2f}x "
          f"[{min(cpu):.2f}, {max(cpu):.2f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
