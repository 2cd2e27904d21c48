"""The `base_eval` stage (nanochat's base_eval.py): how good is the pretrained model, models/base?

- val and train bits per byte over `base_eval.eval_tokens` tokens (nanopipe.eval.bpb);
- greedy samples on nanochat's prompts (nanopipe.eval.samples);
- CORE (nanopipe.eval.core), when the DCLM eval bundle can be had from `base_eval.bundle_url`
  (cached in `base_eval.bundle_cache`); offline, CORE is recorded as unavailable with the reason and
  the stage still succeeds.
"""
from __future__ import annotations

import logging

from nanopipe import paths
from nanopipe.data.shards import read_manifest, split_paths
from nanopipe.eval.bpb import bpb_on_shards
from nanopipe.eval.core import core_or_unavailable
from nanopipe.eval.samples import greedy_samples
from nanopipe.model.checkpoint import load_model
from nanopipe.stage import DEVICE_PARAMS, Stage
from nanopipe.tokenizer import load_token_bytes, load_tokenizer

log = logging.getLogger("nanopipe.base_eval")

PARAMS = ["base_eval", *DEVICE_PARAMS]


def run(st: Stage) -> None:
    c, dev = st.cfg.base_eval, st.dev
    tokenizer = load_tokenizer(paths.TOKENIZER)
    token_bytes = load_token_bytes(paths.TOKENIZER, device=dev.device)
    model, meta = load_model(paths.CHECKPOINTS["base"], dev.device, "eval", tokenizer=tokenizer)
    train, val = split_paths(read_manifest())

    metrics: dict = {"step": meta.get("step")}
    for split, shard_paths in (("train", train), ("val", [val])):
        metrics[f"{split}_bpb"] = bpb_on_shards(model, tokenizer, token_bytes, shard_paths, c.device_batch_size,
                                                model.config.sequence_len, c.eval_tokens, dev)
        log.info("%s bpb: %.4f", split, metrics[f"{split}_bpb"])
    samples = greedy_samples(model, tokenizer, c.sample_tokens) if dev.master else []
    core = core_or_unavailable(model, tokenizer, dev, c.bundle_url, c.bundle_cache, c.max_per_task) if c.core else \
        {"core_metric": None, "core_unavailable": "disabled by base_eval.core=false"}

    metrics["core_metric"] = core["core_metric"]
    if "core_unavailable" in core:
        metrics["core_unavailable"] = core["core_unavailable"]
    else:
        metrics["core_centered"] = core["centered_results"]
    report = [f"- val bpb: {metrics['val_bpb']:.4f}", f"- train bpb: {metrics['train_bpb']:.4f}",
              f"- CORE: {metrics['core_metric']:.4f}" if metrics["core_metric"] is not None else f"- CORE: unavailable ({metrics['core_unavailable']})"]
    if "core_centered" in metrics:
        report += ["", "| task | accuracy | centered |", "|---|---:|---:|"]
        report += [f"| {k} | {core['results'][k]:.4f} | {v:.4f} |" for k, v in core["centered_results"].items()]
    report += ["", "Samples (greedy):", "", *[f"- {s!r}" for s in samples]]
    metrics["samples"] = samples
    st.finish(metrics, "\n".join(report))
