"""The `serve` stage (nanochat's chat_web.py): the chat model behind a web UI and an OpenAI-compatible API.

Long-running, so it lives in stages/serve/dvc.yaml (`dvc repro stages/serve/dvc.yaml`) and `dvc repro`
finishes without it. The model is the checkpoint `serve.source` names (auto: the newest of rl, sft,
base); the server itself is nanopipe.serving. An MLflow run covers the server's lifetime (its config
and checkpoint); there is no metrics file: a server has no outputs.
"""
from __future__ import annotations

import logging

from nanopipe import paths
from nanopipe.model.checkpoint import checkpoint_at, load_model
from nanopipe.serving.app import serve
from nanopipe.stage import DEVICE_PARAMS, Stage
from nanopipe.tokenizer import load_tokenizer

log = logging.getLogger("nanopipe.serve")

PARAMS = ["serve", *DEVICE_PARAMS]


def run(st: Stage) -> None:
    tokenizer = load_tokenizer(paths.TOKENIZER)
    ckpt = checkpoint_at(paths.checkpoint_dir(st.cfg.serve.source), st.cfg.serve.step, "serve.step")
    model, _ = load_model(ckpt, st.dev.device, "eval", tokenizer=tokenizer)
    log.info("serving %s", ckpt)
    st.tracker.log_text(str(ckpt), "checkpoint.txt")
    serve(model, tokenizer, st.cfg.serve, dtype=st.cfg.runtime.dtype)
