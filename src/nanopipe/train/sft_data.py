"""SFT data: the conversation mixture and the packing loader (nanochat scripts/chat_sft.py @1ec0a34).

`build_mixture(sft_cfg, split)` returns the TaskMixture the stage trains (split="train") or
validates (split="val") on:
  full      nanochat's mixture: SmolTalk, MMLU auxiliary_train, GSM8K train x gsm8k_epochs, the identity
            set x identity_epochs, SimpleSpelling, SpellingBee (+ Arithmetic if arithmetic_examples > 0);
            val = SmolTalk test + MMLU test[:5200] + GSM8K test[:420]
  embedded  offline: identity x identity_epochs, SimpleSpelling, SpellingBee, Arithmetic;
            val = the test splits of the three synthetic tasks (val_examples rows each)

`sft_batches(...)` packs rendered conversations into rows of max_seq_len + 1 tokens, best fit
first, as nanochat does, with two deliberate differences (docs/decisions.md, D1 and D2):
- supervision comes from the render mask: targets are -1 everywhere except the assistant's
  own tokens (its text, its tool calls, <|assistant_end|>); user turns, tool outputs, BOS and
  padding are never trained on;
- a conversation longer than a row is truncated to the row (and counted), so the packer can
  always place something in an empty row and never stalls; a conversation with nothing to
  learn inside the row is skipped (and counted). Rows that no buffered conversation can fill
  are padded with BOS whose targets are -1.

The loader is deterministic and rank-strided (rank r reads conversations r, r+W, r+2W, ...).
It yields (inputs, targets, state): `state` is a small dict (cursor, epoch, counters and the
dataset indices still in the buffer) from which `sft_batches(..., state=state)` continues with
exactly the next batch; the buffer is rebuilt by re-rendering those indices.
"""
from __future__ import annotations

import logging

import torch

from nanopipe.tasks import GSM8K, IDENTITY_PATH, MMLU, Arithmetic, CustomJSON, SimpleSpelling, SmolTalk, SpellingBee, TaskMixture

log = logging.getLogger("nanopipe.sft")

STATE_VERSION = 1
BUFFER_SIZE = 100  # conversations the best-fit packer chooses from (nanochat)
COUNTERS = ("conversations", "truncated", "skipped", "supervised_tokens", "padding_tokens", "rows")


# -----------------------------------------------------------------------------
# The mixture

def build_mixture(sft, split: str) -> TaskMixture:
    """The train or val TaskMixture for config section `sft` (mixture, sizes, epochs, dataset_dir)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    identity = sft.identity_path or IDENTITY_PATH
    if sft.mixture == "full":
        remote = dict(dataset_dir=sft.dataset_dir or None)
        if split == "val":
            tasks = [SmolTalk(split="test", **remote), MMLU(subset="all", split="test", stop=5200, **remote),
                     GSM8K(subset="main", split="test", stop=420, **remote)]
        else:
            tasks = [SmolTalk(split="train", **remote), MMLU(subset="auxiliary_train", split="train", **remote)]
            tasks += [GSM8K(subset="main", split="train", **remote)] * sft.gsm8k_epochs
            tasks += _embedded_train(sft, identity)
    elif sft.mixture == "embedded":
        tasks = _embedded_train(sft, identity) if split == "train" else _embedded_val(sft)
    else:
        raise ValueError(f"sft.mixture={sft.mixture!r}: expected 'full' (nanochat's: SmolTalk, MMLU, GSM8K, spelling, "
                         "identity) or 'embedded' (offline: identity, spelling, arithmetic)")
    tasks = [t for t in tasks if len(t) > 0]
    mixture = TaskMixture(tasks)
    if len(mixture) == 0:
        raise ValueError(f"the sft {split} mixture ({sft.mixture}) is empty: raise sft.simple_spelling_examples, "
                         "sft.spelling_bee_examples, sft.arithmetic_examples or sft.identity_epochs")
    return mixture


def _embedded_train(sft, identity) -> list:
    # a task listed k times contributes its rows k times (TaskMixture's way of oversampling)
    tasks = [CustomJSON(filepath=identity)] * sft.identity_epochs
    if sft.simple_spelling_examples > 0:
        tasks.append(SimpleSpelling(size=sft.simple_spelling_examples, split="train"))
    if sft.spelling_bee_examples > 0:
        tasks.append(SpellingBee(size=sft.spelling_bee_examples, split="train"))
    if sft.arithmetic_examples > 0:
        tasks.append(Arithmetic(size=sft.arithmetic_examples, split="train"))
    return tasks


def _embedded_val(sft) -> list:
    # the synthetic tasks' test splits come from a disjoint seed stream: held out by construction
    n = sft.val_examples
    tasks = []
    if sft.simple_spelling_examples > 0:
        tasks.append(SimpleSpelling(size=n, split="test"))
    if sft.spelling_bee_examples > 0:
        tasks.append(SpellingBee(size=n, split="test"))
    if sft.arithmetic_examples > 0:
        tasks.append(Arithmetic(size=n, split="test"))
    return tasks


def describe(mixture: TaskMixture) -> dict:
    """Rows per task (summed over repeats), for logs and metrics."""
    out: dict[str, int] = {}
    for task, n in zip(mixture.tasks, mixture.lengths):
        name = type(task).__name__
        out[name] = out.get(name, 0) + n
    return out


# -----------------------------------------------------------------------------
# Packing

def render(tokenizer, conversation, capacity: int) -> tuple[list[int], list[int], bool]:
    """ids, mask and whether the conversation had to be cut to `capacity` tokens."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=capacity + 1)
    if len(ids) > capacity:
        return ids[:capacity], mask[:capacity], True
    return ids, mask, False


def fresh_state(rank: int, world_size: int) -> dict:
    return {"version": STATE_VERSION, "rank": rank, "world_size": world_size, "cursor": rank, "epoch": 1,
            "consumed": rank, "it": 0, "buffer": [], **{k: 0 for k in COUNTERS}}


def sft_batches(dataset, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                device="cpu", state: dict | list | None = None, buffer_size: int = BUFFER_SIZE):
    """Infinite generator of (inputs, targets, state), inputs/targets (B, seq_len) int64.

    state: what a previous run yielded (this rank's dict, or the list of every rank's dicts);
    the generator continues with the batch after it. A state saved with another world size
    gives an approximate resume (see `pick_state`). `state["consumed"] / len(dataset)` is this
    rank's estimate of the fraction of the epoch consumed (all ranks together)."""
    capacity = seq_len + 1
    n = len(dataset)
    if n == 0:
        raise ValueError("sft_batches: the dataset is empty")
    bos = tokenizer.get_bos_token_id()
    st = pick_state(state, rank, world_size) if state is not None else fresh_state(rank, world_size)
    if st["cursor"] >= n:  # only after an approximate resume
        st["cursor"] %= n
        st["epoch"] += 1
    # buffer entries: (dataset index, ids, mask); rebuilt from indices on resume (already counted)
    buffer = [(i, *render(tokenizer, dataset[i], capacity)[:2]) for i in st["buffer"]]

    def refill():
        skipped_in_a_row = 0
        while len(buffer) < buffer_size:
            index = st["cursor"]
            ids, mask, cut = render(tokenizer, dataset[index], capacity)
            st["cursor"] += world_size
            if st["cursor"] >= n:
                st["cursor"] %= n
                st["epoch"] += 1
            st["truncated"] += cut
            if not any(mask[1:]):  # nothing supervised inside the row (e.g. a user turn longer than a row)
                st["skipped"] += 1
                st["consumed"] += world_size
                skipped_in_a_row += 1
                if skipped_in_a_row > n // world_size + 1:
                    raise ValueError(f"no conversation of the dataset has an assistant token within the first "
                                     f"{capacity} tokens: nothing to train on (raise sft.max_seq_len?)")
                continue
            skipped_in_a_row = 0
            buffer.append((index, ids, mask))

    while True:
        rows, masks = [], []
        for _ in range(batch_size):
            row, row_mask = [], []
            while len(row) < capacity:
                refill()
                remaining = capacity - len(row)
                best, best_len = -1, 0
                for i, (_, ids, _) in enumerate(buffer):  # the longest conversation that fits; first wins ties
                    if best_len < len(ids) <= remaining:
                        best, best_len = i, len(ids)
                if best < 0:
                    break  # nothing fits: pad (an empty row always takes one, since every entry <= capacity)
                _, ids, mask = buffer.pop(best)
                row += ids
                row_mask += mask
                st["consumed"] += world_size
                st["conversations"] += 1
            pad = capacity - len(row)
            rows.append(row + [bos] * pad)
            masks.append(row_mask + [0] * pad)
            st["padding_tokens"] += pad
        st["it"] += 1
        st["rows"] += batch_size
        use_cuda = torch.device(device).type == "cuda"
        rows_t = torch.tensor(rows, dtype=torch.long, pin_memory=use_cuda)
        mask_t = torch.tensor(masks, dtype=torch.bool)
        inputs = rows_t[:, :-1]
        # the target at position t is token t+1; it is trained on only where token t+1 is the assistant's
        targets = rows_t[:, 1:].masked_fill(~mask_t[:, 1:], -1)
        st["supervised_tokens"] += int(mask_t[:, 1:].sum())
        st["buffer"] = [index for index, _, _ in buffer]
        yield (inputs.to(device, non_blocking=use_cuda), targets.to(device, non_blocking=use_cuda), dict(st))


def pick_state(state, rank: int, world_size: int, quiet: bool = False) -> dict:
    """This rank's saved state (a copy), or an approximate one when the world size changed."""
    states = state if isinstance(state, (list, tuple)) else [state]
    for s in states:
        if s.get("version") == STATE_VERSION and s.get("rank") == rank and s.get("world_size") == world_size:
            return {**s, "buffer": list(s["buffer"])}
    # Approximate: continue after the least advanced saved rank; its buffered conversations are dropped.
    s = min(states, key=lambda s: (s["epoch"], s["consumed"]))
    cursor = (s["cursor"] // world_size) * world_size + rank
    saved = ", ".join(f"rank {x.get('rank', '?')}/{x.get('world_size', '?')}" for x in states)
    (log.debug if quiet else log.warning)(
        "sft loader: resume state (%s) does not match rank %d of %d: approximate resume from conversation %d, "
        "epoch %d (buffered conversations are dropped)", saved, rank, world_size, cursor, s["epoch"])
    fresh = fresh_state(rank, world_size)
    # counters are per rank and summed at the end: carry rank 0's share once, so totals stay about right
    counters = {k: sum(x.get(k, 0) for x in states) if rank == 0 else 0 for k in COUNTERS}
    return {**fresh, **counters, "cursor": cursor, "epoch": s["epoch"], "consumed": s["consumed"] - s["rank"] + rank,
            "it": s["it"]}
