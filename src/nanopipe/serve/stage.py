"""`nanopipe serve` (the serve stage, long-running) and `nanopipe chat` (terminal chat).

Both load the checkpoint `serve.source` names: `auto` takes the latest lifecycle stage
that has a model (rl, then sft, then base).
"""
from __future__ import annotations

import argparse
import logging

from omegaconf import DictConfig

from nanopipe import paths
from nanopipe.model.checkpoint import load_model
from nanopipe.tokenizer import load_tokenizer

log = logging.getLogger("nanopipe.serve")


def checkpoint_dir(source: str):
    if source != "auto":
        if source not in paths.CHECKPOINTS:
            raise ValueError(f"serve.source={source!r}: expected auto, {', '.join(paths.CHECKPOINTS)}")
        return paths.CHECKPOINTS[source]
    for name in ("rl", "sft", "base"):
        if (paths.CHECKPOINTS[name] / "meta.json").exists():
            return paths.CHECKPOINTS[name]
    raise FileNotFoundError(f"no model found in {', '.join(str(p) for p in paths.CHECKPOINTS.values())}: "
                            "run `dvc repro` first (pretrain writes models/base)")


def _load(cfg: DictConfig):
    from nanopipe.train.loop import setup_device

    dev = setup_device(cfg)
    tokenizer = load_tokenizer(paths.TOKENIZER)
    ckpt = checkpoint_dir(cfg.serve.source)
    model, _ = load_model(ckpt, dev.device, "eval", tokenizer=tokenizer)
    log.info("serving %s", ckpt)
    return model, tokenizer, dev


def serve_main(cfg: DictConfig) -> None:
    from nanopipe.serve.app import serve
    from nanopipe.stage import Stage

    model, tokenizer, dev = _load(cfg)
    # An MLflow run for the server's lifetime (its config and checkpoint); no metrics file: it has no outputs.
    with Stage("serve", cfg, sections=["serve"]) as st:
        st.tracker.log_text(str(checkpoint_dir(cfg.serve.source)), "checkpoint.txt")
        serve(model, tokenizer, cfg.serve, dtype=cfg.runtime.dtype)


def chat_main(cfg: DictConfig, options: list[str] = ()) -> None:
    from nanopipe.serve.chat_cli import run_chat

    ap = argparse.ArgumentParser(prog="nanopipe chat", description="Chat with the newest model in the terminal.")
    ap.add_argument("--prompt", "-p", default=None, help="answer this one prompt and exit")
    ap.add_argument("--temperature", "-t", type=float, default=cfg.serve.temperature)
    ap.add_argument("--top-k", "-k", type=int, default=cfg.serve.top_k)
    ap.add_argument("--max-tokens", type=int, default=cfg.serve.max_tokens)
    args = ap.parse_args(list(options))
    model, tokenizer, _ = _load(cfg)
    run_chat(model, tokenizer, prompt=args.prompt, temperature=args.temperature, top_k=args.top_k,
             max_tokens=args.max_tokens, dtype=cfg.runtime.dtype)
