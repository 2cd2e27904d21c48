"""The `rl` stage (nanochat's chat_rl.py): on-policy REINFORCE with a group-mean baseline.

For every training question, sample `num_samples` completions from the current policy with
the Engine (calculator tool calls live), reward each 0/1 with the task's grader, and take
advantage = reward - mean(group rewards) (no std normalisation). The loss is
-sum(advantage * log p(token)) over the *sampled* tokens only, normalised per token:
the prompt, the calculator output the Engine forced into the sequence, and padding are not
trained on. No KL term, no reference model, no ratio clipping: every batch comes from the
current weights and is used for exactly one optimizer step.

Differences from nanochat on purpose:
- the stop token is trained (spec decision 3): a completion that ended by sampling
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
import math
import statistics
import time

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nanopipe import artifacts, paths
from nanopipe.model.checkpoint import load_model, save_checkpoint
from nanopipe.serve.engine import Engine
from nanopipe.stage import Stage
from nanopipe.tokenizer import load_tokenizer
from nanopipe.train.loop import Resume, fingerprint, optimizer_step, setup_device

log = logging.getLogger("nanopipe.rl")
ARITHMETIC_TRAIN_SIZE = 1000  # generated train problems when rl.train_examples = -1


class RLConfigError(ValueError):
    pass


def check_config(r, world_size: int) -> None:
    def need(ok, key, expected):
        if not ok:
            raise RLConfigError(f"`rl.{key}` = {OmegaConf.select(r, key)!r}: expected {expected}")

    need(r.source in paths.CHECKPOINTS and r.source != "rl", "source", "sft or base")
    need(r.task in ("gsm8k", "arithmetic"), "task", "gsm8k or arithmetic")
    need(r.examples_per_step >= 1 and r.examples_per_step % world_size == 0, "examples_per_step",
         f"a positive multiple of the world size ({world_size})")
    need(r.num_samples >= 2, "num_samples", ">= 2 (the group-mean baseline needs a group)")
    need(r.device_batch_size >= 1, "device_batch_size", ">= 1")
    need(r.max_new_tokens >= 1, "max_new_tokens", ">= 1")
    need(r.temperature > 0, "temperature", "> 0 (on-policy sampling)")
    need(r.num_epochs >= 1, "num_epochs", ">= 1")
    need(r.num_steps == -1 or r.num_steps >= 1, "num_steps", "-1 or >= 1")
    need(r.train_examples == -1 or r.train_examples >= 1, "train_examples", "-1 or >= 1")
    need(r.eval_examples >= 1 and r.pass_k >= 1, "eval_examples", ">= 1 (and rl.pass_k >= 1)")
    need(r.arithmetic_max_steps >= 1, "arithmetic_max_steps", ">= 1")


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


# -----------------------------------------------------------------------------
# Rollouts, batch, loss (the pieces the tests check against the spec's formula)


@torch.no_grad()
def rollout(engine: Engine, prompt: list[int], num_samples: int, max_tokens: int, temperature: float,
            top_k: int | None, seed: int):
    """Sample completions of `prompt`: (sequences, masks, stopped).

    Like Engine.generate_batch (prompt + completion per row; mask 0 on the prompt and on
    forced calculator output, 1 on sampled tokens) except that a row which stopped keeps its
    stop token, sampled, mask 1: that is what lets RL reinforce stopping (decision 3).
    """
    tok = engine.tokenizer
    stop = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    seqs = [list(prompt) for _ in range(num_samples)]
    masks = [[0] * len(prompt) for _ in range(num_samples)]
    stopped = [False] * num_samples
    for column, column_masks in engine.generate(prompt, num_samples=num_samples, max_tokens=max_tokens,
                                                temperature=temperature, top_k=top_k, seed=seed):
        for i, (token, mask) in enumerate(zip(column, column_masks)):
            if stopped[i]:
                continue  # rows keep producing ignorable tokens after they finish
            seqs[i].append(token)
            masks[i].append(mask)
            stopped[i] = token in stop
        if all(stopped):
            break
    return seqs, masks, stopped


def completion_text(tokenizer, seq: list[int], prefix_len: int, stopped: bool) -> str:
    """The completion as the grader sees it: after the prompt, without the stop token."""
    return tokenizer.decode(seq[prefix_len:len(seq) - int(stopped)])


def build_batch(sequences, masks, rewards, pad_id: int, device):
    """(inputs, targets, rewards, advantages) for one question's group.

    Rows are right-padded to the longest with `pad_id` (mask 0). targets = ids shifted by one,
    -1 wherever the target token is not a sampled one (prompt, forced output, padding).
    advantages = rewards - mean(rewards), no std normalisation.
    """
    T = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for m in masks], dtype=torch.long, device=device)
    inputs = ids[:, :-1]
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    rewards = torch.tensor(rewards, dtype=torch.float, device=device)
    return inputs, targets, rewards, rewards - rewards.mean()


def pg_loss(model, inputs, targets, advantages, normaliser: int):
    """-sum_rows,t advantage[row] * log p(target[row, t]) / (valid tokens * normaliser).

    normaliser = passes per question x questions per rank, so the gradient of one step is the
    per-token-normalised mean over this rank's questions (ranks are averaged by the optimizer)."""
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)  # 0 where target == -1
    num_valid = (targets >= 0).sum().clamp(min=1)
    pg_obj = (logp * advantages.unsqueeze(-1)).sum() / (num_valid * normaliser)
    return -pg_obj


@torch.no_grad()
def pass_at_k(engine: Engine, task, num_examples: int, k: int, max_tokens: int, top_k: int | None,
              dev, autocast) -> dict:
    """Fraction of held-out questions with a correct answer among the first j of k samples at
    temperature 1.0, for j = 1..k (nanochat's "any of the first j" estimate; Engine seed 42)."""
    tokenizer = engine.tokenizer
    counts = torch.zeros(k + 1, dtype=torch.float64, device=dev.device)  # [pass@1..pass@k, questions]
    n = min(num_examples, len(task))
    for idx in range(dev.rank, n, dev.world_size):
        conversation = task[idx]
        prompt = tokenizer.render_for_completion(conversation)
        with autocast():
            seqs, _ = engine.generate_batch(prompt, num_samples=k, max_tokens=max_tokens, temperature=1.0, top_k=top_k)
        outcomes = [bool(task.evaluate(conversation, tokenizer.decode(s[len(prompt):]))) for s in seqs]
        for j in range(k):
            counts[j] += any(outcomes[:j + 1])
        counts[k] += 1
    if dev.ddp:
        dist.all_reduce(counts)
    return {f"pass_at_{j + 1}": (counts[j] / counts[k]).item() for j in range(k)}


# -----------------------------------------------------------------------------
# The stage


def main(cfg: DictConfig) -> None:
    r = cfg.rl
    dev = setup_device(cfg)
    check_config(r, dev.world_size)
    with Stage("rl", cfg, sections=["rl"]) as st:
        tokenizer = load_tokenizer(paths.TOKENIZER)
        src_dir = paths.CHECKPOINTS[r.source]
        artifacts.require(src_dir / "meta.json", r.source)
        model, src_meta = load_model(src_dir, dev.device, "train", tokenizer=tokenizer)
        engine = Engine(model, tokenizer)
        train_task, num_train, val_task = make_tasks(r)
        E, world = r.examples_per_step, dev.world_size
        num_steps = r.num_steps if r.num_steps > 0 else (num_train // E) * r.num_epochs
        if num_steps < 1:
            raise RLConfigError(f"{num_train} train questions make no step of rl.examples_per_step={E}; "
                                f"lower rl.examples_per_step or set rl.num_steps")
        chunks = [min(r.device_batch_size, r.num_samples - i) for i in range(0, r.num_samples, r.device_batch_size)]
        normaliser = len(chunks) * (E // world)
        log.info("RL on %s: %d train questions, %d steps x %d questions x %d samples (%d sequences/step), "
                 "from %s (step %s)", r.task, num_train, num_steps, E, r.num_samples, E * r.num_samples,
                 src_dir, src_meta.get("step"))

        optimizer = model.setup_optimizer(unembedding_lr=r.unembedding_lr, embedding_lr=r.embedding_lr,
                                          matrix_lr=r.matrix_lr, weight_decay=r.weight_decay)
        for group in optimizer.param_groups:
            group["lr"] *= r.init_lr_frac
            group["initial_lr"] = group["lr"]

        # Resume only a run with the same config, starting weights and tokenizer.
        run_id = fingerprint(OmegaConf.to_container(r), cfg.runtime.seed, src_meta["files"]["model.pt"]["sha256"],
                             artifacts.sha256_file(paths.TOKENIZER / "tokenizer.json"))
        resume = Resume(st, run_id)
        state = resume.load(model, optimizer)
        start = 0
        history = {"pass_at_k": [], "reward": []}
        if state is not None:
            start, history = state["step"], state["history"]
            log.info("resuming from step %d (%s)", start, resume.latest())

        assistant_end = tokenizer.encode_special("<|assistant_end|>")
        eval_args = (engine, val_task, r.eval_examples, r.pass_k, r.max_new_tokens, r.top_k or None, dev, dev.autocast)

        def evaluate(step):
            model.eval()
            t0 = time.time()
            passk = pass_at_k(*eval_args)
            history["pass_at_k"].append({"step": step, **passk})
            st.log(passk, step=step, plot="pass_at_k")
            log.info("step %d | %s (%.1f s)", step, ", ".join(f"pass@{k.rsplit('_', 1)[1]}: {v:.4f}" for k, v in passk.items()),
                     time.time() - t0)

        gen_time, gen_samples, step_times = 0.0, 0, []
        for step in range(start, num_steps):
            if step % (r.eval_every if r.eval_every > 0 else num_steps) == 0:
                evaluate(step)
            t_step = time.time()
            rewards, seq_lens, completion_lens, stops = [], [], [], []
            for j in range(dev.rank, E, world):
                example_idx = (step * E + j) % num_train
                conversation = train_task[example_idx]
                prompt = tokenizer.render_for_completion(conversation)
                model.eval()
                seqs, masks, stopped = [], [], []
                t0 = time.time()
                for c, n in enumerate(chunks):
                    seed = hash((step, example_idx, c)) & 0x7FFFFFFF  # ints hash the same in every process
                    with dev.autocast():
                        s, m, d = rollout(engine, prompt, n, r.max_new_tokens, r.temperature, r.top_k or None, seed)
                    seqs += s
                    masks += m
                    stopped += d
                gen_time += time.time() - t0
                gen_samples += len(seqs)
                group_rewards = [float(train_task.reward(conversation, completion_text(tokenizer, s, len(prompt), d)))
                                 for s, d in zip(seqs, stopped)]
                inputs, targets, rew, adv = build_batch(seqs, masks, group_rewards, assistant_end, dev.device)
                model.train()
                row = 0
                for n in chunks:  # one forward/backward per device batch
                    with dev.autocast():
                        loss = pg_loss(model, inputs[row:row + n], targets[row:row + n], adv[row:row + n], normaliser)
                    loss.backward()
                    row += n
                rewards.append(rew.mean().item())
                seq_lens += [len(s) for s in seqs]
                completion_lens += [len(s) - len(prompt) for s in seqs]
                stops += stopped
            stats = {"reward": dev.all_reduce_mean(statistics.fmean(rewards)),
                     "sequence_length": dev.all_reduce_mean(statistics.fmean(seq_lens)),
                     "completion_length": dev.all_reduce_mean(statistics.fmean(completion_lens)),
                     "stopped_frac": dev.all_reduce_mean(statistics.fmean(stops))}
            lrm = 1.0 - step / num_steps
            optimizer_step(optimizer, model, lrm)
            step_times.append(time.time() - t_step)
            history["reward"].append({"step": step, **stats})
            st.log({**stats, "lrm": lrm, "step_time_s": step_times[-1]}, step=step, plot="reward")
            log.info("step %d/%d | reward %.4f | sequence length %.1f | stopped %.2f | %.1f s", step, num_steps,
                     stats["reward"], stats["sequence_length"], stats["stopped_frac"], step_times[-1])
            done = step + 1
            if r.save_every > 0 and done < num_steps and done % r.save_every == 0:
                resume.save(done, model, optimizer, {"history": history, "user_config": OmegaConf.to_container(r)})
                st.flush_plots()
        evaluate(num_steps)

        model.eval()
        save_checkpoint(paths.CHECKPOINTS["rl"], model, None,
                        {"step": num_steps, "source": r.source, "source_step": src_meta.get("step"),
                         "user_config": OmegaConf.to_container(r), "pass_at_k": history["pass_at_k"][-1]},
                        save_rng=False)
        resume.clear()

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
            f"- task: {r.task} ({num_train} train questions, {min(r.eval_examples, len(val_task))} held out); "
            f"started from models/{r.source} (step {src_meta.get('step')})",
            f"- {num_steps} steps x {E} questions x {r.num_samples} samples; temperature {r.temperature}, top-k {r.top_k}, "
            f"max {r.max_new_tokens} new tokens; LR x{r.init_lr_frac} decaying linearly to 0",
            f"- mean reward: first step {_fmt(metrics['reward_first'])}, last step {_fmt(metrics['reward_last'])}, "
            f"over all steps {_fmt(metrics['reward_mean'])}",
            f"- pass@1 / pass@{k} (T=1.0): step {first_pk['step']}: {first_pk['pass_at_1']:.4f} / {first_pk[f'pass_at_{k}']:.4f}"
            f" -> step {last_pk['step']}: {last_pk['pass_at_1']:.4f} / {last_pk[f'pass_at_{k}']:.4f}",
            f"- mean sequence length (prompt + completion): {_fmt(metrics['sequence_length_mean'], 1)} tokens",
            f"- rollout throughput: {_fmt(metrics['rollout_samples_per_s'], 2)} samples/s; median step {_fmt(metrics['step_time_s'], 2)} s; "
            f"world size {world}",
        ])
        st.finish(metrics, report)
    dev.close()


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
