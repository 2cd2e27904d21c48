"""RL rollout and chat_eval throughput on the tiny model.

- rollout: rl.rollout (Engine.generate, num_samples rows decoded together) on arithmetic
  prompts: completions/s and tokens/s at num_samples 1 and 8, and the time of one RL question
  group (8 rollouts + batch + policy-gradient forward/backward), as the tiny preset runs it;
- chat_eval: problems/s of the generative path (SpellingBee, HumanEval, Arithmetic; greedy, one
  problem at a time, HumanEval graded in the sandbox) and of the categorical path (batched
  letter logits, on multiple-choice questions built from arithmetic problems).

Model: the tiny preset's shape (depth 4, n_embd 256, 4 heads of 64, sequence_len 256) with a
vocab-4096 tokenizer. By default: models/tokenizer when present (else one trained here on task
text) and freshly initialised weights, which never stop early, so every completion runs to the
token cap (the worst case). --model DIR evaluates a trained checkpoint (e.g. models/sft) instead.

    PYTHONPATH=src python bench/bench_rl_eval.py [--threads 2] [--model models/sft] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nanopipe.eval import chatcore as chat_eval
from nanopipe.inference.engine import Engine
from nanopipe.model.checkpoint import load_model
from nanopipe.model.gpt import config_from_depth, create_model
from nanopipe.tasks import Arithmetic, SpellingBee, Task, render_mc
from nanopipe.tokenizer import Tokenizer, load_tokenizer
from nanopipe.train import rl


class ArithmeticMC(Task):
    """Multiple choice over arithmetic answers (the right one and three neighbours): a categorical task offline."""

    letters = ("A", "B", "C", "D")

    def __init__(self, size=64):
        super().__init__()
        self.base = Arithmetic(size=size, split="test")

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.base)

    def get_example(self, i):
        ex = self.base[i]
        answer = ex["answer"]
        choices = [answer + d for d in (0, 1, -1, 2)]
        k = i % 4
        choices[0], choices[k] = choices[k], choices[0]
        return {"messages": [{"role": "user", "content": render_mc(ex["messages"][0]["content"], self.letters, choices)},
                             {"role": "assistant", "content": self.letters[k]}], "letters": self.letters}

    def evaluate(self, conversation, letter):
        return letter == conversation["messages"][-1]["content"]


def get_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    if path and (Path(path) / "tokenizer.json").exists():
        return load_tokenizer(path)
    arith, spell = Arithmetic(size=3000, split="train"), SpellingBee(size=2000, split="train")
    texts = [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
             for task in (arith, spell) for i in range(len(task)) for m in task[i]["messages"]]
    return Tokenizer.train_from_iterator(iter(texts), vocab_size)


def bench_rollouts(engine, tokenizer, num_samples: int, max_tokens: int, questions: int) -> dict:
    task = Arithmetic(size=questions + 1, split="train", max_steps=1)
    rl.rollout(engine, tokenizer.render_for_completion(task[questions]), num_samples, max_tokens, 1.0, 50, 0)  # warm-up
    n = tokens = 0
    t0 = time.perf_counter()
    for i in range(questions):
        prompt = tokenizer.render_for_completion(task[i])
        seqs, _, _ = rl.rollout(engine, prompt, num_samples, max_tokens, 1.0, 50, seed=i)
        n += len(seqs)
        tokens += sum(len(s) - len(prompt) for s in seqs)
    dt = time.perf_counter() - t0
    return {"completions_per_s": n / dt, "tokens_per_s": tokens / dt}


def bench_rl_group(model, engine, tokenizer, num_samples: int, max_tokens: int, repeats: int) -> float:
    """Seconds for one question group: rollouts, rewards, batch, one forward/backward (no optimizer step)."""
    task = Arithmetic(size=repeats, split="train", max_steps=1)
    end = tokenizer.encode_special("<|assistant_end|>")
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        model.eval()
        seqs, masks, stopped = rl.rollout(engine, prompt, num_samples, max_tokens, 1.0, 50, seed=i)
        rewards = [task.reward(conv, rl.completion_text(tokenizer, s, len(prompt), d)) for s, d in zip(seqs, stopped)]
        rewards[0] = 1.0  # a non-zero advantage, as when the group disagrees
        inputs, targets, _, adv = rl.build_batch(seqs, masks, rewards, end, "cpu")
        model.train()
        rl.pg_loss(model, inputs, targets, adv, 1).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_chat_eval(model, tokenizer, problems: int, max_new_tokens: int) -> dict:
    engine = Engine(model, tokenizer)
    out = {}
    for name, task in (("SpellingBee", SpellingBee(size=256, split="test")), ("HumanEval", chat_eval.build_task("HumanEval")),
                       ("Arithmetic", Arithmetic(size=256, split="test"))):
        t0 = time.perf_counter()
        _, total = chat_eval.run_generative_eval(task, tokenizer, engine, 1, max_new_tokens, 0.0, 50, problems)
        out[f"{name}_problems_per_s"] = total / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, total = chat_eval.run_categorical_eval(ArithmeticMC(size=64), tokenizer, model, 8, 64)
    out["categorical_problems_per_s"] = total / (time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", default="models/tokenizer", help="tokenizer dir (trained here if absent)")
    ap.add_argument("--model", default=None, help="checkpoint dir to load instead of fresh weights")
    ap.add_argument("--rollout-tokens", type=int, default=48, help="max new tokens per rollout (tiny preset: 48)")
    ap.add_argument("--eval-tokens", type=int, default=128, help="max new tokens per chat_eval problem (tiny preset: 128)")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--problems", type=int, default=8, help="problems per generative chat_eval task (tiny preset: 8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = get_tokenizer(args.tokenizer, 4096)
    torch.manual_seed(0)
    if args.model:
        model, _ = load_model(args.model, "cpu", "eval", tokenizer=tokenizer)
    else:
        model = create_model(config_from_depth(4, tokenizer.get_vocab_size(), 256, 64, 64, "L"), "cpu")
    model.eval()
    engine = Engine(model, tokenizer)
    res = {"threads": args.threads, "model": args.model or "fresh", "vocab_size": tokenizer.get_vocab_size(),
           "rollout_tokens": args.rollout_tokens, "eval_tokens": args.eval_tokens}
    for n in (1, 8):
        r = bench_rollouts(engine, tokenizer, n, args.rollout_tokens, args.questions)
        res[f"rollout_n{n}_completions_per_s"], res[f"rollout_n{n}_tok_per_s"] = r["completions_per_s"], r["tokens_per_s"]
    res["rl_group_8_s"] = bench_rl_group(model, engine, tokenizer, 8, args.rollout_tokens, args.questions)
    model.eval()
    res.update(bench_chat_eval(model, tokenizer, args.problems, args.eval_tokens))

    print(f"RL / chat_eval throughput, tiny model ({res['model']}, vocab {res['vocab_size']}), {args.threads} threads, CPU:")
    for n in (1, 8):
        print(f"  rollouts, {n} sample(s) per prompt: {res[f'rollout_n{n}_completions_per_s']:7.2f} completions/s "
              f"({res[f'rollout_n{n}_tok_per_s']:6.0f} tok/s, <= {args.rollout_tokens} tokens each)")
    print(f"  one RL question group (8 rollouts + forward/backward): {res['rl_group_8_s']:.2f} s")
    for name in ("SpellingBee", "HumanEval", "Arithmetic"):
        print(f"  chat_eval {name:<11} (generative, <= {args.eval_tokens} tokens): {res[f'{name}_problems_per_s']:6.2f} problems/s")
    print(f"  chat_eval categorical (batch 8): {res['categorical_problems_per_s']:6.1f} problems/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
