"""`nanopipe chat`: talk to the newest model in the terminal (the one command that is not a DVC stage).

    nanopipe chat                         # interactive: quit/exit, clear, Ctrl-D
    nanopipe chat --prompt "Hi there"     # answer once and exit: stdout holds the reply only
    nanopipe chat --seed 7 -t 0.8         # reproducible sampling (turn i uses seed 7+i)

The model is the checkpoint `serve.source` names (auto: the newest of rl, sft, base). Replies
stream as they decode, never splitting a UTF-8 character, calculator calls shown as
"🧮 `expr` → result" (nanopipe.inference.tool_text). The conversation is kept as tokens (the
model sees its own tool calls as it made them); when it no longer fits the model's context with
room for a reply, the oldest exchanges are dropped and a line on stderr says so (rolling context,
nanopipe.inference.chat_context, docs/decisions.md D16). Everything that is not the conversation
(logs, notices) goes to stderr, so `nanopipe chat --prompt ... > out.txt` captures just the reply.
"""
from __future__ import annotations

import argparse
import random
import sys

import torch

from nanopipe import paths
from nanopipe.inference.chat_context import ContextFull, first_kept, notice, reply_reserve
from nanopipe.inference.engine import Engine
from nanopipe.inference.tool_text import ToolText, render_tokens
from nanopipe.model.checkpoint import checkpoint_at, load_model
from nanopipe.runtime import autocast_ctx, compute_dtype
from nanopipe.stage import DEVICE_PARAMS, Stage
from nanopipe.tokenizer import load_tokenizer

PARAMS = ["serve", *DEVICE_PARAMS]
TRACKED = False  # an interactive session is not a run worth an MLflow entry


def parse_options(argv: list[str], cfg) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nanopipe chat", description="Chat with the newest model in the terminal.")
    ap.add_argument("--prompt", "-p", default=None, help="answer this one prompt and exit")
    ap.add_argument("--temperature", "-t", type=float, default=cfg.serve.temperature)
    ap.add_argument("--top-k", "-k", type=int, default=cfg.serve.top_k)
    ap.add_argument("--max-tokens", type=int, default=cfg.serve.max_tokens)
    ap.add_argument("--seed", type=int, default=None,
                    help="sampling seed: turn i samples with seed+i, so a session replays exactly "
                         "(default: a fresh seed per turn)")
    return ap.parse_args(argv)


def run(st: Stage) -> None:
    args = st.options or parse_options([], st.cfg)
    tokenizer = load_tokenizer(paths.TOKENIZER)
    ckpt = checkpoint_at(paths.checkpoint_dir(st.cfg.serve.source), st.cfg.serve.step, "serve.step")
    model, _ = load_model(ckpt, st.dev.device, "eval", tokenizer=tokenizer)
    run_chat(model, tokenizer, prompt=args.prompt, temperature=args.temperature, top_k=args.top_k,
             max_tokens=args.max_tokens, dtype=st.cfg.runtime.dtype, seed=args.seed)


def run_chat(model, tokenizer, prompt=None, temperature=0.6, top_k=50, max_tokens=256, input_fn=input,
             output=sys.stdout, seed=None, dtype=None, notices=None):
    """Chat on the terminal; returns the assistant replies (text) of the session.

    output: the conversation (replies; in interactive mode also the banner and labels);
    notices: everything else, the rolling context's notices and refused messages (default stderr).

    seed: None draws a fresh seed per turn (regenerating differs); an int makes turn i use seed+i.
    dtype: compute dtype override ('bfloat16', 'float32', ...); default: bf16 autocast on CUDA SM80+.
    """
    engine = Engine(model, tokenizer)
    device = torch.device(model.get_device())
    autocast = autocast_ctx(device, compute_dtype(device, dtype))
    special = tokenizer.encode_special
    bos = tokenizer.get_bos_token_id()
    user_start, user_end = special("<|user_start|>"), special("<|user_end|>")
    assistant_start, assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
    context = model.config.sequence_len

    def write(text):
        if text:
            output.write(text)
            output.flush()

    def tell(text):
        out = notices if notices is not None else sys.stderr
        out.write(f"({text})\n")
        out.flush()

    interactive = prompt is None
    if interactive:
        write("\nnanopipe chat\n" + "-" * 50 + "\n"
              "Type 'quit' or 'exit' to end the conversation\n"
              "Type 'clear' to start a new conversation\n" + "-" * 50 + "\n")

    turns = []  # token lists of finished (user + assistant) exchanges, oldest first
    replies = []
    while True:
        if not interactive:
            text = prompt.strip()
        else:
            try:
                text = input_fn("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                write("\nGoodbye!\n")
                break
            if text.lower() in ("quit", "exit"):
                write("Goodbye!\n")
                break
            if text.lower() == "clear":
                turns = []
                write("Conversation cleared.\n")
                continue
        if not text:
            if not interactive:
                break
            continue

        user_tokens = [user_start] + tokenizer.encode(text) + [user_end, assistant_start]
        reserve = reply_reserve(context, max_tokens)
        try:  # rolling context: the oldest exchanges go first; the new message itself must fit
            keep = first_kept([len(t) for t in turns] + [len(user_tokens)], 1, context, reserve)
        except ContextFull as e:
            tell(f"message not sent: {e}")
            if not interactive:
                raise SystemExit(1) from None
            continue
        if keep:
            tell(notice(2 * keep, context))  # each exchange is a user and an assistant message
            turns = turns[keep:]
        conversation = [bos] + [t for turn in turns for t in turn] + user_tokens
        budget = min(max_tokens, context - len(conversation))

        if interactive:
            write("\nAssistant: ")
        turn_seed = random.randint(0, 2**31 - 1) if seed is None else seed + len(replies)
        stream = ToolText(tokenizer)
        response = []
        try:
            with autocast:
                for column, _ in engine.generate(conversation, num_samples=1, max_tokens=budget,
                                                 temperature=temperature, top_k=top_k, seed=turn_seed):
                    token = column[0]
                    if token == assistant_end or token == bos:
                        break
                    response.append(token)
                    write(stream.push(token))
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            write(" [interrupted]")
        tail = stream.flush()
        write(tail + "\n")
        turns.append(user_tokens + response + [assistant_end])
        replies.append(render_tokens(tokenizer, response))
        if not interactive:
            break
    return replies
