"""The `pretrain` stage (nanochat's base_train.py): a GPT from scratch on the train shards.

Sizing follows one dial, `model.depth`: width and heads from the aspect ratio and head dim
(nanopipe.model.gpt.config_from_depth); the batch size (when `pretrain.total_batch_size=-1`), the
learning rates and the weight decay are transferred from the d12 reference run by `plan()`. Horizon:
num_iterations > target_flops > target_param_data_ratio, the first positive one wins.

Resume: every `save_every` steps a full checkpoint (weights, optimizer, RNG, loader position, loop
state) goes to models/resume/pretrain/; `dvc repro` after an interruption continues from it. The
final weights go to models/base/ (the DVC output).
"""
from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from nanopipe import artifacts, paths
from nanopipe.config import ConfigError, bad_value
from nanopipe.data.loader import (
    gather_state_dicts,
    tokenizing_distributed_data_loader_with_state_bos_bestfit,
)
from nanopipe.data.shards import read_manifest, split_paths
from nanopipe.eval.bpb import bpb_on_shards, bpb_tokens
from nanopipe.eval.core import core_or_unavailable
from nanopipe.eval.samples import greedy_samples
from nanopipe.model import fp8
from nanopipe.model.attention import windowed_sdpa_problem
from nanopipe.model.checkpoint import save_checkpoint
from nanopipe.model.gpt import GPT, config_from_depth, create_model, maybe_compile
from nanopipe.stage import WORLD_PARAMS, Stage, fmt_num
from nanopipe.tokenizer import load_token_bytes, load_tokenizer
from nanopipe.train.loop import NonFiniteGuard, Resume, StepMeter, fingerprint, optimizer_step
from nanopipe.train.schedules import lr_multiplier, muon_momentum

log = logging.getLogger("nanopipe.pretrain")

# CORE during training (pretrain.core_metric_every) fetches the bundle base_eval names.
PARAMS = ["model", "pretrain", "base_eval.bundle_url", "base_eval.bundle_cache", *WORLD_PARAMS]
B_REF = 2**19  # tokens per step of the d12 reference run every hyperparameter is transferred from
# Python's GC is disabled after the first step of a run (it stalls steps for ~0.5 s at a time); a full
# collection every GC_EVERY steps keeps very long runs safe (nanochat scripts/base_train.py @1ec0a34).
GC_EVERY = 5000


def matmul_precision(dev, fp8_recipe: str | None = None) -> str:
    """What the model's matmuls run in, for the metrics: 'fp8 (<recipe>)' for an fp8 run's training
    (its Float8 layers; layers fp8 skips run at the autocast precision), otherwise the autocast dtype
    ('bf16', 'fp16'), or 'fp32' where autocast is off (an fp32 run; MPS). Read off the autocast
    context the stage really enters, so the label cannot drift from what ran. Weights and optimizer
    state are fp32 either way (on CUDA the embedding tables are stored in bf16)."""
    if fp8_recipe is not None:
        return f"fp8 ({fp8_recipe})"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[autocast_dtype(dev)]


def autocast_dtype(dev) -> torch.dtype:
    """The dtype matmuls (and so q, k, v) run in: the autocast dtype, fp32 where autocast is off."""
    ctx = dev.autocast()
    return ctx.fast_dtype if isinstance(ctx, torch.autocast) else torch.float32


@dataclass(frozen=True)
class Plan:
    total_batch_size: int  # tokens per optimizer step, all ranks
    grad_accum_steps: int
    num_iterations: int
    horizon_from: str  # which config key set num_iterations
    lr_scale: float
    weight_decay: float
    flops_per_token: float
    num_params: int
    num_scaling_params: int
    param_counts: dict = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.total_batch_size * self.num_iterations

    @property
    def tokens_per_scaling_param(self) -> float:
        return self.total_tokens / self.num_scaling_params

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.total_batch_size * self.num_iterations


def plan(cfg, model: GPT, world_size: int) -> Plan:
    """Batch size, horizon, LRs and weight decay for this model, transferred from d12 (nanochat base_train.py):

    - data: D = target_param_data_ratio x scaling params (transformer matrices + lm_head); the d12
      reference trains on the same ratio of its own params, D_ref.
    - batch (total_batch_size=-1): B = B_ref (D / D_ref)^0.383, rounded to a power of 2, the optimal
      batch's growth with data from "Power Lines" (Bergsma et al. 2025, arXiv 2505.13738).
    - LRs (batch_lr_scaling): x sqrt(B / B_ref), the square-root rule for Adam-type optimizers
      (Malladi et al. 2022, arXiv 2205.10287); off in the tiny preset, whose 2k-token batches would
      shrink the LRs 16x.
    - weight decay: x sqrt(B / B_ref) x D_ref / D, keeping the AdamW timescale tau = B / (lr wd D)
      constant as a fraction of training (Wang & Aitchison 2024, arXiv 2405.13698).
    """
    p, m = cfg.pretrain, cfg.model
    scaling = model.num_scaling_params()
    n_scaling = scaling["transformer_matrices"] + scaling["lm_head"]
    with torch.device("meta"):
        ref = GPT(config_from_depth(12, model.config.vocab_size, m.max_seq_len, m.aspect_ratio, m.head_dim, m.window_pattern))
    ref_scaling = ref.num_scaling_params()
    n_ref = ref_scaling["transformer_matrices"] + ref_scaling["lm_head"]
    ratio = p.target_param_data_ratio
    target_tokens = int(ratio * n_scaling)
    d_ref = ratio * n_ref

    total_batch = p.total_batch_size
    if total_batch == -1:
        b_pred = B_REF * (target_tokens / d_ref) ** 0.383
        total_batch = 2 ** round(math.log2(b_pred))
    tokens_per_fwdbwd = p.device_batch_size * m.max_seq_len * world_size
    if total_batch % tokens_per_fwdbwd:
        raise bad_value("pretrain.total_batch_size", total_batch,
                        f"a multiple of pretrain.device_batch_size x model.max_seq_len x world size = "
                        f"{p.device_batch_size} x {m.max_seq_len} x {world_size} = {tokens_per_fwdbwd}")
    lr_scale = math.sqrt(total_batch / B_REF) if p.batch_lr_scaling else 1.0
    weight_decay = p.weight_decay * math.sqrt(total_batch / B_REF) * (d_ref / target_tokens)

    flops_per_token = model.estimate_flops()
    if p.num_iterations > 0:
        iters, horizon = p.num_iterations, "num_iterations"
    elif p.target_flops > 0:
        iters, horizon = round(p.target_flops / (flops_per_token * total_batch)), "target_flops"
    elif ratio > 0:
        iters, horizon = target_tokens // total_batch, "target_param_data_ratio"
    else:
        raise ConfigError("params.yaml: no training horizon: set pretrain.num_iterations, pretrain.target_flops "
                          "or pretrain.target_param_data_ratio > 0")
    if iters < 1:
        raise bad_value(f"pretrain.{horizon}", p[horizon], f"a horizon of at least one step at batch {total_batch}")
    return Plan(total_batch, total_batch // tokens_per_fwdbwd, iters, horizon, lr_scale, weight_decay, flops_per_token,
                scaling["total"], n_scaling, scaling)


def run(st: Stage) -> None:
    cfg, p, m = st.cfg, st.cfg.pretrain, st.cfg.model
    dev = st.dev
    if p.fp8 and (why := fp8.unsupported_reason(dev.device)) is not None:
        raise bad_value("pretrain.fp8", True, f"false on {dev.device.type}: {why}")

    # -- build: tokenizer, data, model, optimizer ----------------------------------------------
    tokenizer = load_tokenizer(paths.TOKENIZER)
    token_bytes = load_token_bytes(paths.TOKENIZER, device=dev.device)
    manifest = read_manifest()
    train_shards, val_shard = split_paths(manifest)
    config = config_from_depth(m.depth, tokenizer.get_vocab_size(), m.max_seq_len, m.aspect_ratio, m.head_dim, m.window_pattern)
    model = create_model(config, dev.device)
    # Sliding-window layers on a GPU with neither FA3 nor FA2 would train on masked SDPA, silently and far
    # slower (nanochat only warns, scripts/base_train.py @1ec0a34): stop, unless the run opts in.
    why = windowed_sdpa_problem(model.window_sizes, config.sequence_len, dev.device, autocast_dtype(dev))
    if why is not None:
        if not m.allow_sdpa_window:
            raise ConfigError(f"params.yaml: {why}. Install FA3 (`pip install kernels`, Hopper) or flash-attn (docs/gpu.md), "
                              "train full-context layers only with model.window_pattern=L, or accept the slow path with "
                              "model.allow_sdpa_window=true")
        log.warning("%s; going ahead as model.allow_sdpa_window=true", why)
    pl = plan(cfg, model, dev.world_size)
    log.info("model %s | %s params | %.3e FLOPs/token", config, f"{pl.num_params:,}", pl.flops_per_token)
    log.info("batch %d tokens (grad accum %d) x %d iterations (%s) = %s tokens, %.2f tokens/param, LRs x%.4f",
             pl.total_batch_size, pl.grad_accum_steps, pl.num_iterations, pl.horizon_from, f"{pl.total_tokens:,}",
             pl.tokens_per_scaling_param, pl.lr_scale)
    if p.fp8:
        fp8.convert_to_fp8(model, p.fp8_recipe, dev.device)
    train_precision = matmul_precision(dev, p.fp8_recipe if p.fp8 else None)
    eval_precision = matmul_precision(dev)  # val bpb, CORE and samples run with fp8 swapped out (below)
    train_model = maybe_compile(model, dev.device.type == "cuda" if p.compile == "auto" else p.compile == "true")
    s = pl.lr_scale
    optimizer = model.setup_optimizer(unembedding_lr=p.unembedding_lr * s, embedding_lr=p.embedding_lr * s,
                                      matrix_lr=p.matrix_lr * s, weight_decay=pl.weight_decay,
                                      adam_betas=(p.adam_beta1, p.adam_beta2), scalar_lr=p.scalar_lr * s)

    # Resume only from a checkpoint of this very run: same config, tokenizer and shards.
    run_id = fingerprint(OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.pretrain), cfg.runtime.seed,
                         artifacts.sha256_file(paths.TOKENIZER / "tokenizer.json"), [s["sha256"] for s in manifest["shards"]])
    resume = Resume(st, run_id, keep=p.keep_checkpoints)  # its snapshots become models/base/steps/
    meta = resume.load(model, optimizer)
    step, loader_state = 0, None
    loop = {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0.0}
    if meta is not None:
        step, loader_state, loop = meta["step"], meta["dataloader_state_dict"], meta["loop_state"]
        loop["min_val_bpb"] = loop["min_val_bpb"] if loop["min_val_bpb"] is not None else float("inf")
        log.info("resuming from step %d (%s)", step, resume.latest())
    resumed_from = step

    B, T, N = p.device_batch_size, m.max_seq_len, pl.num_iterations
    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, train_shards, tokenizer_threads=p.loader_threads, device=dev.device, resume_state_dict=loader_state)
    x, y, next_state = next(loader)
    # `position`: this rank's loader position before (x, y), what a resume replays from. Kept local per
    # micro-step; all ranks' positions are gathered (a collective) only when a checkpoint is written.
    position = None
    meter = StepMeter(N, step, pl.total_batch_size, pl.flops_per_token, dev, "pretrain",
                      loop["smooth_train_loss"], loop["total_training_time"])
    guard = NonFiniteGuard("pretrain", p.max_nonfinite_steps, loop.get("nonfinite_steps"))  # a nan/inf loss: stop or skip

    # -- loop: evaluate / sample / save at their intervals, then one optimizer step ------------
    val_bpb, core, samples = None, {"core_metric": None}, []
    st.log({"num_params": pl.num_params, "num_iterations": N}, step=step)
    # Evaluation and sampling run with fp8 off: disable_fp8 swaps every Float8 layer for a plain Linear
    # sharing its weight, so the numbers are measured at the eval precision, comparable with a bf16 run's
    # (nanochat scripts/base_train.py @1ec0a34 wraps val bpb, CORE and sampling alike). `model` is the
    # raw module: the compiled `train_model` wraps the same module objects, and the swap is undone
    # before the next training step. (nanochat runs bpb through the compiled model; ours runs all three
    # on the raw one.)
    while True:
        last = step == N
        if p.eval_every > 0 and (last or step % p.eval_every == 0) or (last and p.eval_every <= 0):
            with fp8.disable_fp8(model):
                val_bpb = bpb_on_shards(model, tokenizer, token_bytes, [val_shard], B, T, p.eval_tokens, dev)
            loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
            meter.say(f"step {step:05d} | val bpb {val_bpb:.4f}") if dev.master else None
            st.log({"val_bpb": val_bpb, "total_training_flops": pl.flops_per_token * pl.total_batch_size * step}, step=step, plot="val")
        if p.core_metric_every > 0 and (last or (step > 0 and step % p.core_metric_every == 0)):
            be = cfg.base_eval
            with fp8.disable_fp8(model):
                core = core_or_unavailable(model, tokenizer, dev, be.bundle_url, be.bundle_cache, p.core_metric_max_per_task)
            if core["core_metric"] is not None:
                st.log({"core_metric": core["core_metric"]}, step=step, plot="val")
        if p.sample_every > 0 and dev.master and (last or (step > 0 and step % p.sample_every == 0)):
            with fp8.disable_fp8(model):
                samples = greedy_samples(model, tokenizer, max_tokens=16)
            for text in samples:
                meter.say(f"  sample: {text!r}")
        if not last and p.save_every > 0 and step > 0 and step != resumed_from and step % p.save_every == 0:
            resume.save(step, model, optimizer, {"dataloader_state_dict": gather_state_dicts(position), "loop_state": loop,
                                                 "val_bpb": val_bpb, "user_config": OmegaConf.to_container(cfg.pretrain)})
            st.flush_plots()
        if last:
            break

        meter.start()
        loss_sum = None  # every micro-step's loss, on the device: what the guard checks
        for _ in range(pl.grad_accum_steps):
            with dev.autocast():
                loss = train_model(x, y)
            train_loss = loss.detach()
            loss_sum = train_loss if loss_sum is None else loss_sum + train_loss
            (loss / pl.grad_accum_steps).backward()
            position = next_state
            x, y, next_state = next(loader)
        lrm = lr_multiplier(step, N, p.warmup_ratio, p.warmdown_ratio, p.final_lr_frac)
        if guard.before_step(step, dev, train_loss, loss_sum):
            optimizer_step(optimizer, model, lrm, muon_momentum(step), pl.weight_decay * (1 - step / N))
        else:
            model.zero_grad(set_to_none=True)
        stats = meter.stop(step, guard.after_step(step, dev, train_loss, loss_sum))  # raises on a nan/inf loss
        loop.update(meter.loop_state(), nonfinite_steps=guard.skipped)
        if step % p.log_every == 0:
            st.log({**stats, "lrm": lrm}, step=step, plot="train")
        first_step_of_run = step == resumed_from
        step += 1
        if first_step_of_run:  # Python's GC otherwise stalls steps for ~0.5 s at a time
            gc.collect()  # the garbage of the setup
            gc.freeze()  # everything alive now is never scanned again
            gc.disable()
        elif step % GC_EVERY == 0:  # as nanochat: counted after the increment
            gc.collect()
    meter.close()
    loader.close()
    gc.enable()

    # -- save and summarize ------------------------------------------------------------------------
    # Content only in the DVC output: wall-clock time goes to metrics/pretrain.json, so a rerun that computes the
    # same weights writes a byte-identical models/base (one DVC hash).
    content_loop = {k: v for k, v in loop.items() if k != "total_training_time"}
    final_meta = {"step": step, "val_bpb": val_bpb, "loop_state": content_loop, "max_seq_len": T, "device_batch_size": B,
                  "total_batch_size": pl.total_batch_size, "user_config": OmegaConf.to_container(cfg.pretrain)}
    save_checkpoint(paths.CHECKPOINTS["base"], model, None, final_meta, save_rng=False, history=resume.history)
    resume.clear()
    st.finish(*summarize(pl, loop, val_bpb, core, samples, meter, dev, step, resumed_from, train_precision, eval_precision,
                         val_tokens=bpb_tokens(B, T, p.eval_tokens, dev.world_size)))


def summarize(pl: Plan, loop: dict, val_bpb, core: dict, samples: list[str], meter: StepMeter, dev, step: int,
              resumed_from: int, train_precision: str, eval_precision: str, val_tokens: int | None = None) -> tuple[dict, str]:
    """The stage's metrics and its report section."""
    tok_s = meter.median_tok_per_sec()
    metrics = {
        "step": step, "num_params": pl.num_params, "num_scaling_params": pl.num_scaling_params,
        "flops_per_token": pl.flops_per_token, "total_batch_size": pl.total_batch_size,
        "total_tokens": pl.total_tokens, "tokens_per_scaling_param": pl.tokens_per_scaling_param,
        "total_flops": pl.total_flops, "lr_scale": pl.lr_scale,
        "weight_decay": pl.weight_decay, "final_val_bpb": val_bpb, "val_bpb_tokens": val_tokens,
        "min_val_bpb": loop["min_val_bpb"] if math.isfinite(loop["min_val_bpb"]) else None,
        "core_metric": core.get("core_metric"), "train_loss": meter.smooth_loss / (1 - 0.9 ** max(step, 1)),
        "tok_per_sec": tok_s,
        "mfu": None if not math.isfinite(dev.peak_flops) else 100 * pl.flops_per_token * (tok_s or 0) / (dev.peak_flops * dev.world_size),
        "training_time_s": loop["total_training_time"], "peak_memory_mib": dev.max_memory_mib(),
        "resumed_from_step": resumed_from or None, "param_counts": pl.param_counts,
        "nonfinite_steps_skipped": loop.get("nonfinite_steps", []),
        # the matmul precision of the training steps, and of val bpb / CORE / samples (fp8 swapped out)
        "train_precision": train_precision, "eval_precision": eval_precision,
    }
    report = "\n".join([
        f"- parameters: {pl.num_params:,} ({pl.num_scaling_params:,} scaling)",
        f"- FLOPs per token: {pl.flops_per_token:.3e}; total training FLOPs: {pl.total_flops:.3e}",
        f"- iterations: {pl.num_iterations} ({pl.horizon_from}), batch {pl.total_batch_size:,} tokens, {pl.total_tokens:,} tokens",
        f"- tokens : scaling params = {pl.tokens_per_scaling_param:.2f}",
        f"- val bpb during training (first {fmt_num(val_tokens)} tokens of the val shard; base_eval measures the final "
        f"model on its own budget): min {fmt_num(metrics['min_val_bpb'])}, final {fmt_num(val_bpb)}",
        f"- median tok/s: {fmt_num(tok_s)}; MFU: {fmt_num(metrics['mfu'], 2)}{' %' if metrics['mfu'] is not None else ''}; "
        f"training time: {loop['total_training_time']:.1f} s",
        f"- matmul precision: training {train_precision}; val bpb, CORE and samples {eval_precision}",
        f"- peak memory: {metrics['peak_memory_mib']:.0f} MiB; world size {dev.world_size}",
        *(["", "Samples (greedy):", *[f"- {s!r}" for s in samples]] if samples else []),
    ])
    return metrics, report
