"""The `base_eval` stage (nanochat's base_eval.py): how good is the pretrained model, models/base?

- val and train bits per byte over `base_eval.eval_tokens` tokens (nanopipe.eval.bpb);
- greedy samples on nanochat's prompts (nanopipe.eval.samples);
- CORE (nanopipe.eval.core), when the DCLM eval bundle can be had from `base_eval.bundle_url`
  (cached in `base_eval.bundle_cache`); offline, CORE is recorded as unavailable with the reason and
  the stage still succeeds.

`nanopipe base_eval --hf-path <dir or hub id>` runs the same evaluation on any `transformers` causal LM
(nanochat's `--hf-path`, e.g. gpt2), in bits per byte of its own tokenizer's bytes
(nanopipe.hf.outside). Its results go to metrics/base_eval-hf-<name>.json and
metrics/sections/base_eval-hf-<name>.md (the report appends that section), never to the files DVC
tracks for models/base.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from nanopipe import paths
from nanopipe.config import ConfigError
from nanopipe.data.shards import read_manifest, split_paths
from nanopipe.eval.bpb import bpb_on_shards, bpb_tokens
from nanopipe.eval.core import core_or_unavailable
from nanopipe.eval.samples import greedy_samples
from nanopipe.hf.outside import OutsideModelError, load_outside
from nanopipe.model.checkpoint import checkpoint_at, load_model
from nanopipe.stage import DEVICE_PARAMS, Stage
from nanopipe.tokenizer import load_token_bytes, load_tokenizer

log = logging.getLogger("nanopipe.base_eval")

PARAMS = ["base_eval", *DEVICE_PARAMS]


def parse_options(argv: list[str], cfg) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nanopipe base_eval",
                                 description="Evaluate models/base, or an outside transformers causal LM.")
    ap.add_argument("--hf-path", default=None,
                    help="a transformers causal LM (local directory or hub id, e.g. gpt2) to evaluate instead of "
                         "models/base; results go to metrics/base_eval-hf-<name>.json")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="context for --hf-path (default: the model config's max_position_embeddings / n_positions)")
    return ap.parse_args(argv)


def outside_name(hf_path: str) -> str:
    """base_eval-hf-<name>: a local directory by its name, a hub id with '/' as '--' (as the hub cache does)."""
    name = Path(hf_path).name if Path(hf_path).exists() else hf_path.strip("/").replace("/", "--")
    return "base_eval-hf-" + re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def run(st: Stage) -> None:
    c, dev = st.cfg.base_eval, st.dev
    hf_path = getattr(st.options, "hf_path", None)
    if hf_path:
        try:
            model, tokenizer = load_outside(hf_path, dev.device, max_seq_len=st.options.max_seq_len)
        except OutsideModelError as e:
            raise ConfigError(f"--hf-path {e}") from None
        token_bytes = tokenizer.token_bytes(dev.device, size=model.vocab_size)
        meta, seq_len = {}, model.max_seq_len
        st.tracker.set_tags({"hf_path": hf_path})
    else:
        tokenizer = load_tokenizer(paths.TOKENIZER)
        token_bytes = load_token_bytes(paths.TOKENIZER, device=dev.device)
        ckpt = checkpoint_at(paths.CHECKPOINTS["base"], c.step, "base_eval.step")
        model, meta = load_model(ckpt, dev.device, "eval", tokenizer=tokenizer)
        seq_len = model.config.sequence_len
    train, val = split_paths(read_manifest())

    # every bpb here is over the first val_bpb_tokens tokens of its shards (the report says so beside pretrain's)
    metrics: dict = {"step": meta.get("step"), "val_bpb_tokens": bpb_tokens(c.device_batch_size, seq_len, c.eval_tokens, dev.world_size)}
    for split, shard_paths in (("train", train), ("val", [val])):
        metrics[f"{split}_bpb"] = bpb_on_shards(model, tokenizer, token_bytes, shard_paths, c.device_batch_size,
                                                seq_len, c.eval_tokens, dev)
        log.info("%s bpb: %.4f", split, metrics[f"{split}_bpb"])
    samples = greedy_samples(model, tokenizer, c.sample_tokens) if dev.master else []
    core = core_or_unavailable(model, tokenizer, dev, c.bundle_url, c.bundle_cache, c.max_per_task) if c.core else \
        {"core_metric": None, "core_unavailable": "disabled by base_eval.core=false"}

    metrics["core_metric"] = core["core_metric"]
    if "core_unavailable" in core:
        metrics["core_unavailable"] = core["core_unavailable"]
    else:
        metrics["core_centered"] = core["centered_results"]
    report = [f"- model: `{hf_path}` (transformers; bits per byte of its own tokenizer's bytes)"] if hf_path else []
    tokens = f"first {metrics['val_bpb_tokens']:,} tokens"
    report += [f"- val bpb: {metrics['val_bpb']:.4f} (final model, {tokens} of the val shard)",
               f"- train bpb: {metrics['train_bpb']:.4f} ({tokens} of the train shards)",
               f"- CORE: {metrics['core_metric']:.4f}" if metrics["core_metric"] is not None
               else f"- CORE: unavailable ({metrics['core_unavailable']})"]
    if "core_centered" in metrics:
        report += ["", "| task | accuracy | centered |", "|---|---:|---:|"]
        report += [f"| {k} | {core['results'][k]:.4f} | {v:.4f} |" for k, v in core["centered_results"].items()]
    report += ["", "Samples (greedy):", "", *[f"- {s!r}" for s in samples]]
    metrics["samples"] = samples
    if hf_path:
        metrics["hf_path"] = hf_path
    st.finish(metrics, "\n".join(report), name=outside_name(hf_path) if hf_path else None)
