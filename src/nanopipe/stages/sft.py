"""The `sft` stage (nanochat's chat_sft.py): supervised fine-tuning of models/base into a chat model.

The base model learns the chat format on a mixture of conversations (nanopipe.train.sft_data
.build_mixture), packed best-fit into rows of max_seq_len + 1 tokens (sft_data.sft_batches). Two
differences from nanochat on purpose (docs/decisions.md, D1 and D2): only the assistant's tokens are
supervised (the render mask), and over-long conversations are truncated and counted instead of
clogging the packer. `num_iterations > 0` runs exactly that many steps (the mixture wraps around); -1
runs one epoch of it. The LR schedule is nanochat's SFT one over progress (constant, then a linear
warmdown over the last `warmdown_ratio`); Muon momentum ramps 0.85 -> 0.95 over 300 steps.

Resume: every `save_every` steps a full checkpoint (weights, optimizer, loader state, loop state)
goes to models/resume/sft/; a rerun of the same config on the same base model continues from it.
The final weights go to models/sft/ (the DVC output). After training, rank 0 samples the model
greedily on a few probe prompts (nanopipe.eval.chat_format) and records the replies and any format
problems in the metrics and the report section.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import OmegaConf

from nanopipe import artifacts, paths
from nanopipe.config import bad_value
from nanopipe.data.loader import gather_state_dicts
from nanopipe.eval.bpb import evaluate_loss_bpb
from nanopipe.eval.chat_format import chat_samples, format_problems
from nanopipe.model.checkpoint import load_model, save_checkpoint
from nanopipe.model.gpt import maybe_compile
from nanopipe.stage import WORLD_PARAMS, Stage, fmt
from nanopipe.tokenizer import load_token_bytes, load_tokenizer
from nanopipe.train.loop import (
    NonFiniteGuard,
    Resume,
    StepMeter,
    fingerprint,
    optimizer_step,
    scale_initial_lrs,
)
from nanopipe.train.schedules import lr_multiplier_by_progress, muon_momentum
from nanopipe.train.sft_data import (
    COUNTERS,
    build_mixture,
    describe,
    fresh_state,
    pick_state,
    sft_batches,
)

log = logging.getLogger("nanopipe.sft")

PARAMS = ["sft", *WORLD_PARAMS]


@dataclass(frozen=True)
class Plan:
    max_seq_len: int  # row length
    device_batch_size: int
    total_batch_size: int  # tokens per optimizer step, all ranks
    grad_accum_steps: int


def plan(s, model, base_meta: dict, world_size: int) -> Plan:
    """Row length, micro-batch, total batch and gradient accumulation for this run."""
    T = s.max_seq_len if s.max_seq_len > 0 else model.config.sequence_len
    B = s.device_batch_size
    total = s.total_batch_size
    if total <= 0:
        total = base_meta.get("total_batch_size")
        if not total:
            raise bad_value("sft.total_batch_size", -1, f"a size: -1 takes the base checkpoint's, but "
                            f"{paths.CHECKPOINTS['base']}/meta.json has none")
    per_step = B * T * world_size
    if total % per_step:
        raise bad_value("sft.total_batch_size", total, f"a multiple of sft.device_batch_size x max_seq_len x "
                        f"world size = {B} x {T} x {world_size} = {per_step}")
    if T > model.config.sequence_len:
        log.warning("sft max_seq_len %d exceeds the base model's sequence_len %d (it was never trained on "
                    "positions that far)", T, model.config.sequence_len)
    return Plan(T, B, total, total // per_step)


def run(st: Stage) -> None:
    cfg, s, dev = st.cfg, st.cfg.sft, st.dev

    # -- build: tokenizer, base model, plan, optimizer, data, resume ---------------------------
    tokenizer = load_tokenizer(paths.TOKENIZER)
    token_bytes = load_token_bytes(paths.TOKENIZER, device=dev.device)
    artifacts.require(paths.CHECKPOINTS["base"], "pretrain")
    model, base_meta = load_model(paths.CHECKPOINTS["base"], dev.device, "train", tokenizer=tokenizer)
    pl = plan(s, model, base_meta, dev.world_size)
    B, T, accum = pl.device_batch_size, pl.max_seq_len, pl.grad_accum_steps
    if base_meta.get("device_batch_size") and B > base_meta["device_batch_size"]:
        log.warning("FOOTGUN WARNING: base model training used device_batch_size %d, sft.device_batch_size=%d "
                    "may not fit in memory", base_meta["device_batch_size"], B)
    log.info("tokens / micro-batch / rank: %d x %d = %s; total batch %s => gradient accumulation %d",
             B, T, f"{B * T:,}", f"{pl.total_batch_size:,}", accum)
    compile_on = dev.device.type == "cuda" if s.compile == "auto" else s.compile == "true"
    train_model = maybe_compile(model, compile_on)
    flops_per_token = model.estimate_flops()
    optimizer = model.setup_optimizer(unembedding_lr=s.unembedding_lr, embedding_lr=s.embedding_lr,
                                      matrix_lr=s.matrix_lr, weight_decay=s.weight_decay, scalar_lr=s.scalar_lr)
    scale_initial_lrs(optimizer, s.init_lr_frac)

    train_ds, val_ds = build_mixture(s, "train"), build_mixture(s, "val")
    mix = describe(train_ds)
    log.info("train mixture: %s conversations %s; val: %s conversations %s",
             f"{len(train_ds):,}", mix, f"{len(val_ds):,}", describe(val_ds))

    # Resume only from a checkpoint of this very run: same config, base model and tokenizer.
    run_id = fingerprint(OmegaConf.to_container(s), cfg.runtime.seed, base_meta["files"]["model.pt"]["sha256"],
                         artifacts.sha256_file(paths.TOKENIZER / "tokenizer.json"))
    resume = Resume(st, run_id, keep=s.keep_checkpoints)  # its snapshots become models/sft/steps/
    meta = resume.load(model, optimizer)
    step, loader_state = 0, None
    loop = {"min_val_loss": None, "min_val_bpb": None, "smooth_train_loss": 0.0, "total_training_time": 0.0,
            "progress": 0.0}
    if meta is not None:
        step, loader_state, loop = meta["step"], meta["dataloader_state_dict"], meta["loop_state"]
        log.info("resuming from step %d (%s)", step, resume.latest())
    resumed_from = step

    N = s.num_iterations
    loader = sft_batches(train_ds, tokenizer, B, T, dev.rank, dev.world_size, dev.device, state=loader_state)
    x, y, next_state = next(loader)  # `loader_state` is the position before (x, y): what a resume replays from
    # this rank's position and counters after the batches trained on so far
    trained_state = fresh_state(dev.rank, dev.world_size) if loader_state is None else \
        pick_state(loader_state, dev.rank, dev.world_size, quiet=True)
    eval_steps = max(1, s.eval_tokens // (B * T * dev.world_size))
    meter = StepMeter(N if N > 0 else None, step, pl.total_batch_size, flops_per_token, dev, "sft",
                      loop["smooth_train_loss"], loop["total_training_time"])
    guard = NonFiniteGuard("sft", s.max_nonfinite_steps, loop.get("nonfinite_steps"))  # a nan/inf loss: stop or skip

    # -- loop: val loss at its interval, resume checkpoints, then one optimizer step -------------
    val, stats = {}, {}
    st.log({"num_conversations": len(train_ds)}, step=step)
    while True:
        last = step >= N if N > 0 else loop["progress"] >= 1.0
        if last or (s.eval_every > 0 and step % s.eval_every == 0):
            val_loader = sft_batches(val_ds, tokenizer, B, T, dev.rank, dev.world_size, dev.device)
            model.eval()
            val = evaluate_loss_bpb(model, val_loader, eval_steps, token_bytes, dev)
            model.train()
            val_loader.close()
            for k in ("val_loss", "val_bpb"):
                best = loop[f"min_{k}"]
                loop[f"min_{k}"] = val[k] if best is None else min(best, val[k])
            meter.say(f"step {step:05d} | val loss {val['val_loss']:.4f} | val bpb {val['val_bpb']:.4f}") \
                if dev.master else None
            flops = flops_per_token * pl.total_batch_size * step
            st.log({**val, "total_training_flops": flops}, step=step, plot="val")
        if not last and s.save_every > 0 and step > 0 and step != resumed_from and step % s.save_every == 0:
            resume.save(step, model, optimizer, {"dataloader_state_dict": gather_state_dicts(loader_state),
                                                 "loop_state": loop, "user_config": OmegaConf.to_container(s)})
            st.flush_plots()
        if last:
            break

        meter.start()
        loss_sum = None  # every micro-step's loss, on the device: what the guard checks
        for _ in range(accum):
            with dev.autocast():
                loss = train_model(x, y)
            train_loss = loss.detach()
            loss_sum = train_loss if loss_sum is None else loss_sum + train_loss
            (loss / accum).backward()
            loader_state = next_state
            x, y, next_state = next(loader)
        trained_state = loader_state
        progress = (step + 1) / N if N > 0 else min(1.0, loader_state["consumed"] / len(train_ds))
        loop["progress"] = progress = dev.all_reduce_max(progress)  # every rank stops (and schedules) alike
        lrm = lr_multiplier_by_progress(progress, s.warmup_ratio, s.warmdown_ratio, s.final_lr_frac)
        if guard.before_step(step, dev, train_loss, loss_sum):
            optimizer_step(optimizer, model, lrm, muon_momentum(step))
        else:
            model.zero_grad(set_to_none=True)
        stats = meter.stop(step, guard.after_step(step, dev, train_loss, loss_sum))  # raises on a nan/inf loss
        loop.update(meter.loop_state(), nonfinite_steps=guard.skipped)
        if step % s.log_every == 0:
            st.log({**stats, "lrm": lrm, "progress": progress, "epoch": loader_state["epoch"]}, step=step, plot="train")
        step += 1
    meter.close()
    loader.close()

    # -- save, probe the chat format, summarize ------------------------------------------------
    counts = dict(zip(COUNTERS, map(int, dev.all_reduce_sum([trained_state[k] for k in COUNTERS]))))
    # content only in the DVC output (wall-clock time is in metrics/sft.json): same weights, same models/sft hash
    content_loop = {k: v for k, v in loop.items() if k != "total_training_time"}
    final_meta = {"step": step, "val_loss": val.get("val_loss"), "val_bpb": val.get("val_bpb"), "max_seq_len": T,
                  "device_batch_size": B, "total_batch_size": pl.total_batch_size, "loop_state": content_loop,
                  "base_step": base_meta.get("step"), "user_config": OmegaConf.to_container(s)}
    save_checkpoint(paths.CHECKPOINTS["sft"], model, None, final_meta, save_rng=False, history=resume.history)
    resume.clear()

    samples, problems = [], []
    if dev.master and s.sample_tokens > 0:
        samples = chat_samples(model, tokenizer, max_tokens=s.sample_tokens)
        problems = format_problems(samples)
        for p in problems:
            log.warning("format: %s", p)
    counts["epochs"] = dev.all_reduce_max(trained_state["consumed"] / len(train_ds))
    st.finish(*summarize(s, pl, step, loop, val, stats, counts, mix, len(train_ds), meter, dev, resumed_from,
                         samples, problems))


def summarize(s, pl: Plan, step: int, loop: dict, val: dict, stats: dict, counts: dict, mix: dict, num_conversations: int,
              meter: StepMeter, dev, resumed_from: int, samples: list[dict], problems: list[str]) -> tuple[dict, str]:
    """The stage's metrics and its report section."""
    T, accum = pl.max_seq_len, pl.grad_accum_steps
    rows_tokens = counts["rows"] * (T + 1)
    metrics = {
        "step": step, "mixture": s.mixture, "num_conversations": num_conversations, "mixture_rows": mix,
        "val_loss": val.get("val_loss"), "val_bpb": val.get("val_bpb"),
        "min_val_loss": loop["min_val_loss"], "min_val_bpb": loop["min_val_bpb"],
        "train_loss": stats.get("loss_smooth"),
        "conversations_trained": counts["conversations"], "truncated_conversations": counts["truncated"],
        "skipped_conversations": counts["skipped"], "supervised_tokens": counts["supervised_tokens"],
        "padding_fraction": counts["padding_tokens"] / rows_tokens if rows_tokens else None,
        "epochs": counts["epochs"],
        "max_seq_len": T, "device_batch_size": pl.device_batch_size, "total_batch_size": pl.total_batch_size,
        "grad_accum_steps": accum, "tok_per_sec": meter.median_tok_per_sec(),
        "training_time_s": loop["total_training_time"], "peak_memory_mib": dev.max_memory_mib(),
        "resumed_from_step": resumed_from or None, "format_problems": problems, "samples": samples,
        "nonfinite_steps_skipped": loop.get("nonfinite_steps", []),
    }
    report = "\n".join([
        f"- mixture: {s.mixture}, {num_conversations:,} conversations ({', '.join(f'{k} {v:,}' for k, v in mix.items())})",
        f"- iterations: {step}, batch {pl.total_batch_size:,} tokens (rows of {T}, grad accum {accum}), "
        f"world size {dev.world_size}, {metrics['epochs']:.2f} epochs",
        f"- conversations trained: {counts['conversations']:,}; truncated to the row: {counts['truncated']:,}; "
        f"skipped (nothing supervised in the row): {counts['skipped']:,}",
        f"- supervised tokens: {counts['supervised_tokens']:,}; padding: "
        f"{100 * (metrics['padding_fraction'] or 0):.1f}% of row tokens",
        f"- val loss: {fmt(metrics['val_loss'])} (min {fmt(loop['min_val_loss'])}); "
        f"val bpb: {fmt(metrics['val_bpb'])} (min {fmt(loop['min_val_bpb'])})",
        f"- median tok/s: {fmt(metrics['tok_per_sec'], '.0f')}; training time: {loop['total_training_time']:.1f} s; "
        f"peak memory {metrics['peak_memory_mib']:.0f} MiB",
        f"- chat format: {'ok' if not problems else f'{len(problems)} problem(s)'}",
        *(["", "Greedy replies:", ""] + [f"- {x['kind']}: {x['prompt']!r} -> {x['reply']!r}" for x in samples]
          if samples else []),
    ])
    return metrics, report
