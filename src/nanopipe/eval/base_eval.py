"""The `base_eval` stage: val/train bits per byte, greedy samples, and CORE, on models/base.

`bpb_on`, `greedy_samples` and `core_or_unavailable` are also what pretrain calls
during training. CORE needs the DCLM eval bundle: fetched through fsspec from
`base_eval.bundle_url` into `base_eval.bundle_cache`; offline, CORE is recorded as
unavailable with the reason and the stage still succeeds.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from nanopipe import paths
from nanopipe.data.loader import tokenizing_distributed_data_loader_bos_bestfit
from nanopipe.data.shards import read_manifest, split_paths
from nanopipe.eval.bpb import evaluate_bpb
from nanopipe.eval.core import EvalBundleUnavailable, evaluate_core, fetch_eval_bundle
from nanopipe.model.checkpoint import load_model
from nanopipe.stage import Stage
from nanopipe.tokenizer import load_token_bytes, load_tokenizer

log = logging.getLogger("nanopipe.base_eval")

# nanochat's base_train / base_eval prompts
PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def bpb_on(model, tokenizer, token_bytes, shard_paths, batch_size: int, seq_len: int, tokens: int, dev) -> float:
    """Bits per byte over the first `tokens` tokens of `shard_paths` (all ranks take part)."""
    steps = max(1, tokens // (batch_size * seq_len * dev.world_size))
    loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, batch_size, seq_len, shard_paths, device=dev.device)
    model.eval()
    with dev.autocast():
        bpb = evaluate_bpb(model, loader, steps, token_bytes)
    loader.close()
    model.train()
    return bpb


@torch.no_grad()
def greedy_samples(model, tokenizer, max_tokens: int, prompts=PROMPTS) -> list[str]:
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, prepend="<|bos|>")
        new = list(model.generate(ids, max_tokens=max_tokens, temperature=0))
        out.append(prompt + tokenizer.decode(new))
    model.train()
    return out


def core_or_unavailable(model, tokenizer, dev, cfg: DictConfig, max_per_task: int) -> dict:
    """CORE results, or {"core_metric": None, "core_unavailable": reason} when the bundle cannot be had."""
    try:
        bundle = fetch_eval_bundle(cfg.base_eval.bundle_url, Path(cfg.base_eval.bundle_cache))
    except EvalBundleUnavailable as e:
        log.warning("CORE unavailable: %s", e)
        return {"core_metric": None, "core_unavailable": str(e)}
    model.eval()
    with dev.autocast():
        out = evaluate_core(model, tokenizer, dev.device, bundle, max_per_task=max_per_task)
    model.train()
    return out


def main(cfg: DictConfig) -> None:
    from nanopipe.train.loop import setup_device

    dev = setup_device(cfg)
    with Stage("base_eval", cfg, sections=["base_eval"]) as st:
        tokenizer = load_tokenizer(paths.TOKENIZER)
        token_bytes = load_token_bytes(paths.TOKENIZER, device=dev.device)
        model, meta = load_model(paths.CHECKPOINTS["base"], dev.device, "eval", tokenizer=tokenizer)
        train, val = split_paths(read_manifest())
        seq_len, bs, tokens = model.config.sequence_len, cfg.base_eval.device_batch_size, cfg.base_eval.eval_tokens
        metrics: dict = {"step": meta.get("step")}
        for split, shard_paths in (("train", train), ("val", [val])):
            metrics[f"{split}_bpb"] = bpb_on(model, tokenizer, token_bytes, shard_paths, bs, seq_len, tokens, dev)
            log.info("%s bpb: %.4f", split, metrics[f"{split}_bpb"])
        samples = greedy_samples(model, tokenizer, cfg.base_eval.sample_tokens) if dev.master else []
        core = core_or_unavailable(model, tokenizer, dev, cfg, cfg.base_eval.max_per_task) if cfg.base_eval.core else \
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
    dev.close()
