"""The `rl` stage (nanochat's chat_rl.py): on-policy REINFORCE with a group-mean baseline
(the algorithm and its pieces: nanopipe.train.rl).

Differences from nanochat on purpose:
- the stop token is trained (docs/decisions.md, D3): a completion that ended by sampling
  <|assistant_end|> keeps it as its last sampled token, so stopping is reinforced too;
- the examples of step s are the global positions s*E .. s*E+E-1 (E = examples_per_step),
  rank r taking every world-th one, so a step sees the same questions on 1 or N ranks and a
  resume knows where it is from the step alone;
- pass@k is also measured after the last step, so the report shows the start and the end;
- num_samples need not be a multiple of device_batch_size (the last chunk is smaller).

Outputs: models/rl (weights only, atomic), metrics/rl.json, metrics/rl/{reward,pass_at_k}.csv,
the report section. In-progress checkpoints (weights + optimizer) go to models/resume/rl.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

from omegaconf import OmegaConf

from nanopipe import artifacts, paths
from nanopipe.config import bad_value
from nanopipe.inference.engine import Engine
from nanopipe.model.checkpoint import load_model, save_checkpoint
from nanopipe.runtime import Progress
from nanopipe.stage import WORLD_PARAMS, Stage, fmt
from nanopipe.tokenizer import load_tokenizer
from nanopipe.train.loop import NonFiniteGuard, Resume, fingerprint, optimizer_step, scale_initial_lrs
from nanopipe.train.rl import build_batch, completion_text, pass_at_k, pg_loss, rollout

log = logging.getLogger("nanopipe.rl")

PARAMS = ["rl", *WORLD_PARAMS]
ARITHMETIC_TRAIN_SIZE = 1000  # generated train problems when rl.train_examples = -1


def make_tasks(r):
    """(train task, number of train questions, held-out task) for rl.task."""
    dataset_dir = r.dataset_dir or None
    if r.task == "gsm8k":
        from nanopipe.tasks import GSM8K

        train, val = GSM8K("main", "train", dataset_dir=dataset_dir), GSM8K("main", "test", dataset_dir=dataset_dir)
    else:
        from nanopipe.tasks import Arithmetic

        size = ARITHMETIC_TRAIN_SIZE if r.train_examples == -1 else r.train_examples
        train = Arithmetic(size=size, split="train", max_steps=r.arithmetic_max_steps)
        val = Arithmetic(size=r.eval_examples, split="test", max_steps=r.arithmetic_max_steps)
    num_train = len(train) if r.train_examples == -1 else min(r.train_examples, len(train))
    return train, num_train, val


@dataclass(frozen=True)
class Plan:
    num_train: int  # train questions used
    num_steps: int
    chunks: list[int]  # samples per forward/backward pass, summing to rl.num_samples
    normaliser: int  # passes per question x questions per rank: the per-token loss is divided by it

    @staticmethod
    def of(r, num_train: int, world_size: int) -> "Plan":
        if r.examples_per_step % world_size:
            raise bad_value("rl.examples_per_step", r.examples_per_step, f"a multiple of the world size ({world_size})")
        num_steps = r.num_steps if r.num_steps > 0 else (num_train // r.examples_per_step) * r.num_epochs
        if num_steps < 1:
            raise bad_value("rl.examples_per_step", r.examples_per_step,
                            f"at most the {num_train} train questions (or set rl.num_steps)")
        chunks = [min(r.device_batch_size, r.num_samples - i) for i in range(0, r.num_samples, r.device_batch_size)]
        return Plan(num_train, num_steps, chunks, len(chunks) * (r.examples_per_step // world_size))


def run(st: Stage) -> None:
    if not st.cfg.rl.enabled:
        return skip(st)
    cfg, r, dev = st.cfg, st.cfg.rl, st.dev

    # -- build: policy, tasks, plan, optimizer, resume -------------------------------------------
    tokenizer = load_tokenizer(paths.TOKENIZER)
    src_dir = paths.CHECKPOINTS[r.source]
    artifacts.require(src_dir / "meta.json", r.source)
    model, src_meta = load_model(src_dir, dev.device, "train", tokenizer=tokenizer)
    engine = Engine(model, tokenizer)
    train_task, num_train, val_task = make_tasks(r)
    pl = Plan.of(r, num_train, dev.world_size)
    E = r.examples_per_step
    log.info("RL on %s: %d train questions, %d steps x %d questions x %d samples (%d sequences/step), "
             "from %s (step %s)", r.task, num_train, pl.num_steps, E, r.num_samples, E * r.num_samples,
             src_dir, src_meta.get("step"))
    optimizer = model.setup_optimizer(unembedding_lr=r.unembedding_lr, embedding_lr=r.embedding_lr,
                                      matrix_lr=r.matrix_lr, weight_decay=r.weight_decay)
    scale_initial_lrs(optimizer, r.init_lr_frac)

    # Resume only a run with the same config, starting weights and tokenizer.
    run_id = fingerprint(OmegaConf.to_container(r), cfg.runtime.seed, src_meta["files"]["model.pt"]["sha256"],
                         artifacts.sha256_file(paths.TOKENIZER / "tokenizer.json"))
    resume = Resume(st, run_id, keep=r.keep_checkpoints)  # its snapshots become models/rl/steps/
    state = resume.load(model, optimizer)
    start = 0
    history = {"pass_at_k": [], "reward": []}
    if state is not None:
        start, history = state["step"], state["history"]
        log.info("resuming from step %d (%s)", start, resume.latest())
    # a nan/inf policy-gradient loss: stop, or skip the update (rollouts sync every step anyway: checked before it)
    guard = NonFiniteGuard("rl", r.max_nonfinite_steps, (state or {}).get("nonfinite_steps"))

    def evaluate(step):
        model.eval()
        t0 = time.time()
        passk = pass_at_k(engine, val_task, r.eval_examples, r.pass_k, r.max_new_tokens, r.top_k or None, dev, dev.autocast)
        history["pass_at_k"].append({"step": step, **passk})
        st.log(passk, step=step, plot="pass_at_k")
        log.info("step %d | %s (%.1f s)", step, ", ".join(f"pass@{k.rsplit('_', 1)[1]}: {v:.4f}" for k, v in passk.items()),
                 time.time() - t0)

    # -- loop: pass@k at its interval; rollouts and gradients for this rank's questions; one step --
    timing = {"gen_time": 0.0, "gen_samples": 0, "step_times": []}
    progress = Progress("rl", pl.num_steps, "step", start)  # each step logs a line; this one adds the ETA
    for step in range(start, pl.num_steps):
        if step % (r.eval_every if r.eval_every > 0 else pl.num_steps) == 0:
            evaluate(step)
        t_step = time.time()
        groups = [policy_gradient(model, engine, train_task, (step * E + j) % num_train, step, r, pl, dev, timing)
                  for j in range(dev.rank, E, dev.world_size)]
        stats = {key: dev.all_reduce_mean(statistics.fmean(v for g in groups for v in g[key]))
                 for key in ("reward", "sequence_length", "completion_length", "stopped_frac")}
        lrm = 1.0 - step / pl.num_steps
        if guard.check(step, dev.all_reduce_sum([sum(g["pg_loss"] for g in groups)])[0]):
            optimizer_step(optimizer, model, lrm)
        else:
            model.zero_grad(set_to_none=True)
        timing["step_times"].append(time.time() - t_step)
        history["reward"].append({"step": step, **stats})
        st.log({**stats, "lrm": lrm, "step_time_s": timing["step_times"][-1]}, step=step, plot="reward")
        log.info("step %d/%d | reward %.4f | sequence length %.1f | stopped %.2f | %.1f s", step, pl.num_steps,
                 stats["reward"], stats["sequence_length"], stats["stopped_frac"], timing["step_times"][-1])
        done = step + 1
        progress.update(done, f"reward {stats['reward']:.4f}")
        if r.save_every > 0 and done < pl.num_steps and done % r.save_every == 0:
            resume.save(done, model, optimizer, {"history": history, "user_config": OmegaConf.to_container(r),
                                                 "nonfinite_steps": guard.skipped})
            st.flush_plots()
    evaluate(pl.num_steps)

    # -- save and summarize ------------------------------------------------------------------------
    model.eval()
    save_checkpoint(paths.CHECKPOINTS["rl"], model, None,
                    {"step": pl.num_steps, "source": r.source, "source_step": src_meta.get("step"),
                     "user_config": OmegaConf.to_container(r), "pass_at_k": history["pass_at_k"][-1]},
                    save_rng=False, history=resume.history)
    resume.clear()
    metrics, report = summarize(r, pl, history, timing, len(val_task), src_meta, dev, start)
    st.finish({**metrics, "nonfinite_steps_skipped": guard.skipped}, report)


def policy_gradient(model, engine: Engine, task, example_idx: int, step: int, r, pl: Plan, dev, timing: dict) -> dict:
    """Sample one question's group from the current policy, grade it, and backpropagate its policy-gradient
    loss (one forward/backward per chunk of samples). Returns the group's statistics as lists, and its summed loss
    (`pg_loss`, a float: what the non-finite guard checks)."""
    tokenizer = engine.tokenizer
    conversation = task[example_idx]
    prompt = tokenizer.render_for_completion(conversation)
    model.eval()
    seqs, masks, stopped = [], [], []
    t0 = time.time()
    for c, n in enumerate(pl.chunks):
        seed = hash((step, example_idx, c)) & 0x7FFFFFFF  # ints hash the same in every process
        with dev.autocast():
            s, m, d = rollout(engine, prompt, n, r.max_new_tokens, r.temperature, r.top_k or None, seed)
        seqs += s
        masks += m
        stopped += d
    timing["gen_time"] += time.time() - t0
    timing["gen_samples"] += len(seqs)
    rewards = [float(task.reward(conversation, completion_text(tokenizer, s, len(prompt), d))) for s, d in zip(seqs, stopped)]
    inputs, targets, rew, adv = build_batch(seqs, masks, rewards, tokenizer.encode_special("<|assistant_end|>"), dev.device)
    model.train()
    row, loss_sum = 0, 0.0
    for n in pl.chunks:
        with dev.autocast():
            loss = pg_loss(model, inputs[row:row + n], targets[row:row + n], adv[row:row + n], pl.normaliser)
        loss.backward()
        loss_sum = loss_sum + loss.detach()
        row += n
    return {"pg_loss": float(loss_sum), "reward": [rew.mean().item()], "sequence_length": [len(s) for s in seqs],
            "completion_length": [len(s) - len(prompt) for s in seqs], "stopped_frac": stopped}


def summarize(r, pl: Plan, history: dict, timing: dict, num_val: int, src_meta: dict, dev, start: int) -> tuple[dict, str]:
    """The stage's metrics and its report section."""
    gen_time, gen_samples, step_times = timing["gen_time"], timing["gen_samples"], timing["step_times"]
    num_steps, num_train, E, world = pl.num_steps, pl.num_train, r.examples_per_step, dev.world_size
    rewards_hist = [h["reward"] for h in history["reward"]]
    first_pk, last_pk = history["pass_at_k"][0], history["pass_at_k"][-1]
    metrics = {
        "task": r.task, "source": r.source, "num_steps": num_steps, "train_questions": num_train,
        "sequences_per_step": E * r.num_samples,
        "reward_first": rewards_hist[0] if rewards_hist else None,
        "reward_last": rewards_hist[-1] if rewards_hist else None,
        "reward_mean": statistics.fmean(rewards_hist) if rewards_hist else None,
        "sequence_length_mean": statistics.fmean(h["sequence_length"] for h in history["reward"]) if rewards_hist else None,
        "pass_at_k_start": {k: v for k, v in first_pk.items() if k != "step"},
        "pass_at_k_end": {k: v for k, v in last_pk.items() if k != "step"},
        "rollout_samples_per_s": gen_samples / gen_time if gen_time > 0 else None,
        "step_time_s": statistics.median(step_times) if step_times else None,
        "peak_memory_mib": dev.max_memory_mib(), "resumed_from_step": start or None,
    }
    k = r.pass_k
    report = "\n".join([
        f"- task: {r.task} ({num_train} train questions, {min(r.eval_examples, num_val)} held out); "
        f"started from models/{r.source} (step {src_meta.get('step')})",
        f"- {num_steps} steps x {E} questions x {r.num_samples} samples; temperature {r.temperature}, top-k {r.top_k}, "
        f"max {r.max_new_tokens} new tokens; LR x{r.init_lr_frac} decaying linearly to 0",
        f"- mean reward: first step {fmt(metrics['reward_first'])}, last step {fmt(metrics['reward_last'])}, "
        f"over all steps {fmt(metrics['reward_mean'])}",
        f"- pass@1 / pass@{k} (T=1.0): step {first_pk['step']}: {first_pk['pass_at_1']:.4f} / {first_pk[f'pass_at_{k}']:.4f}"
        f" -> step {last_pk['step']}: {last_pk['pass_at_1']:.4f} / {last_pk[f'pass_at_{k}']:.4f}",
        f"- mean sequence length (prompt + completion): {fmt(metrics['sequence_length_mean'], '.1f')} tokens",
        f"- rollout throughput: {fmt(metrics['rollout_samples_per_s'], '.2f')} samples/s; "
        f"median step {fmt(metrics['step_time_s'], '.2f')} s; "
        f"world size {world}",
    ])
    return metrics, report


def skip(st: Stage) -> None:
    """rl.enabled=false (the speedrun preset: nanochat's speedrun.sh runs no RL): the stage's outputs say
    so. models/rl holds a note and no checkpoint, so chat_eval skips the source and serve picks sft."""
    if not st.rank0:
        return
    why = "rl.enabled is false: no RL was run (nanochat's speedrun.sh runs none); models/rl holds no checkpoint"
    with artifacts.atomic_dir(paths.CHECKPOINTS["rl"]) as out:
        (out / "SKIPPED.txt").write_text(why + "\n", encoding="utf-8")
    for plot, column in (("reward", "reward"), ("pass_at_k", "pass_at_1")):  # DVC's declared plots, empty
        artifacts.write_text(paths.plot_file("rl", plot), f"step,{column}\n")
    st.finish({"skipped": why}, f"_Skipped_: {why}.")
