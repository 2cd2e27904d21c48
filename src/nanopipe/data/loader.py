"""Pretraining data loader: BOS-aligned best-fit packing (nanochat's dataloader.py).

Documents stream from parquet shards (a `text` column split into row groups). Rank r of W
reads row groups r, r+W, r+2W, ... of every shard in order, forever (epoch 1, 2, ...). Each
slice of `tokenizer_batch_size` documents is tokenized with BOS prepended, on a background
thread so that parquet reading and tokenizing overlap with packing.

Every row holds T+1 tokens (inputs = row[:-1], targets = row[1:]) and is packed best-fit:
while the row has room, take the LONGEST buffered document that fits entirely; when none
fits, take the SHORTEST one and crop it to fill the row exactly (the rest is discarded).
So every row starts with BOS, there is no padding, and no target is -1.

Why (nanochat nanochat/dataloader.py @1ec0a34): a plain token stream starts rows mid-document,
which never happens at inference; with BOS-aligned rows every token can look back to its
document's start. The price is the cropped tails: about 35% of tokens at T=2048 (best fit
crops less than greedy filling), always the ends of documents, so long documents lose their
tails most. Fine with more data than one epoch needs; not for scarce data with long documents.

Exact resume. Each yielded state_dict records (a) the stream cursor: the next document to
read (epoch, pq_idx, rg_idx, doc_idx) and (b) the doc buffer as references to the documents
it holds ([pq_idx, rg_idx, [row, ...]] runs, in buffer order). Cropped documents leave the
buffer whole, so every buffered document is complete and can be re-read and re-tokenized
(tokenization is deterministic). A loader built with that state rebuilds the same buffer,
continues reading at the cursor and therefore yields exactly the batches an uninterrupted
loader would have. The state is per rank: gather all ranks' states with
`gather_state_dicts` and pass the list back on resume. A state written with another world
size (or nanochat's {pq_idx, rg_idx, epoch}) falls back to an approximate resume: the next
row-group round after the saved cursor, empty buffer, with a printed warning.
"""
from __future__ import annotations

import bisect
import os
import queue
import threading

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from nanopipe.runtime import get_dist_info, print0

STATE_VERSION = 1


# -----------------------------------------------------------------------------
# Document stream

def _read_texts(pf: pq.ParquetFile, path: str, rg_idx: int) -> list:
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path}: parquet shard has no 'text' column (columns: {pf.schema_arrow.names})")
    return pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()


def _document_batches(paths, rank, world_size, batch_size, cursor):
    """Yield (refs, texts, next_cursor) forever, starting at cursor = (epoch, pq_idx, rg_idx, doc_idx).

    refs are (pq_idx, rg_idx, row) of each text; next_cursor is the next document to read.
    """
    epoch, pq_idx, rg_idx, doc_idx = cursor
    while True:
        full_pass = (pq_idx, rg_idx, doc_idx) == (0, rank, 0)
        docs_this_pass = 0
        while pq_idx < len(paths):
            pf = pq.ParquetFile(paths[pq_idx])
            while rg_idx < pf.num_row_groups:
                texts = _read_texts(pf, paths[pq_idx], rg_idx)
                for i in range(doc_idx, len(texts), batch_size):
                    j = min(i + batch_size, len(texts))
                    if j < len(texts):
                        nxt = (epoch, pq_idx, rg_idx, j)
                    elif rg_idx + world_size < pf.num_row_groups:
                        nxt = (epoch, pq_idx, rg_idx + world_size, 0)
                    elif pq_idx + 1 < len(paths):
                        nxt = (epoch, pq_idx + 1, rank, 0)
                    else:
                        nxt = (epoch + 1, 0, rank, 0)
                    docs_this_pass += j - i
                    yield [(pq_idx, rg_idx, r) for r in range(i, j)], texts[i:j], nxt
                rg_idx += world_size
                doc_idx = 0
            pq_idx += 1
            rg_idx = rank
        if full_pass and docs_this_pass == 0:
            raise ValueError(
                f"rank {rank} of {world_size} found no documents in {[str(p) for p in paths]}: rank r reads "
                f"row groups r, r+{world_size}, ... of each shard, and these shards have too few row groups (or no rows)")
        epoch, pq_idx, rg_idx, doc_idx = epoch + 1, 0, rank, 0


def _tokenized_batches(tokenizer, bos, threads, stream, prefetch):
    """Tokenize the stream's text slices; with prefetch > 0 on a background thread, `prefetch` slices ahead."""
    if prefetch <= 0:
        for refs, texts, nxt in stream:
            yield refs, tokenizer.encode(texts, prepend=bos, num_threads=threads), nxt
        return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def produce():
        try:
            for refs, texts, nxt in stream:
                put((refs, tokenizer.encode(texts, prepend=bos, num_threads=threads), nxt))
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    worker = threading.Thread(target=produce, name="nanopipe-loader-tokenize", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5.0)


# -----------------------------------------------------------------------------
# Resume state

def gather_state_dicts(state_dict: dict) -> list[dict]:
    """All ranks' loader states (a collective: every rank must call it). Save the list; pass it back on resume."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, state_dict)
        return out
    return [state_dict]


def _pick_state(resume_state_dict, rank, world_size):
    """Return (exact_state or None, approximate_cursor or None) for this rank."""
    states = resume_state_dict if isinstance(resume_state_dict, (list, tuple)) else [resume_state_dict]
    for s in states:
        if s.get("version") == STATE_VERSION and s.get("rank") == rank and s.get("world_size") == world_size:
            return s, None
    # Approximate: continue from the furthest saved cursor, at the first row group of this rank's stride after it.
    def key(s):
        return (s.get("epoch", 1), s["pq_idx"], s["rg_idx"])
    s = max(states, key=key)
    epoch, pq_idx, rg_idx = key(s)
    # nanochat's rg_idx is the last row group READ; ours is the next one to read (skip it if partly read).
    first = rg_idx + 1 if ("doc_idx" not in s or s["doc_idx"] > 0) else rg_idx
    rg = (first // world_size) * world_size + rank
    if rg < first:
        rg += world_size
    saved = ", ".join(f"rank {x.get('rank', '?')}/{x.get('world_size', '?')}" for x in states)
    print0(f"[loader] WARNING: resume state ({saved}) does not match rank {rank} of {world_size}: "
           f"approximate resume from shard {pq_idx}, row group {rg} (buffered documents are dropped). "
           f"Save gather_state_dicts(...) from the same world size for an exact resume.")
    return None, (epoch, pq_idx, rg, 0)


def _restore_buffer(state, paths, tokenizer, bos, threads):
    """Re-read and re-tokenize the documents a saved buffer held, in buffer order."""
    for k, name in state.get("shards", {}).items():
        k = int(k)
        if k >= len(paths) or os.path.basename(str(paths[k])) != name:
            have = os.path.basename(str(paths[k])) if k < len(paths) else "nothing"
            raise ValueError(f"loader resume state refers to shard {k} = {name!r} but the shard list has {have!r} there; "
                             f"an exact resume needs the same shard list the state was saved with")
    refs, texts, files, groups = [], [], {}, {}
    for pq_idx, rg_idx, rows in state["buffer"]:
        if (pq_idx, rg_idx) not in groups:
            if pq_idx not in files:
                files[pq_idx] = pq.ParquetFile(paths[pq_idx])
            groups[(pq_idx, rg_idx)] = _read_texts(files[pq_idx], paths[pq_idx], rg_idx)
        group = groups[(pq_idx, rg_idx)]
        for r in rows:
            if r >= len(group):
                raise ValueError(f"loader resume state refers to row {r} of row group {rg_idx} of {paths[pq_idx]}, "
                                 f"which has {len(group)} rows: the shard changed since the state was saved")
            refs.append((pq_idx, rg_idx, r))
            texts.append(group[r])
    tokens = tokenizer.encode(texts, prepend=bos, num_threads=threads) if texts else []
    return refs, tokens


# -----------------------------------------------------------------------------
# The loader

def tokenizing_distributed_data_loader_with_state_bos_bestfit(
    tokenizer, B, T, shard_paths,
    tokenizer_threads=4, tokenizer_batch_size=128,
    device="cuda", resume_state_dict=None,
    buffer_size=1000, prefetch=4, rank=None, world_size=None,
):
    """Yield (inputs (B,T), targets (B,T), state_dict) forever from `shard_paths` (train shards, or [val shard]).

    The yielded tensors are views of one persistent buffer, overwritten by the next batch.
    rank/world_size default to the torchrun environment.
    """
    if isinstance(shard_paths, (str, os.PathLike)):
        shard_paths = [shard_paths]
    paths = [str(p) for p in shard_paths]
    if not paths:
        raise ValueError("data loader got no shard paths (expected the train shards, or [the val shard], from the data manifest)")
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: shard not found; it is produced by the `download` stage (run `dvc repro download`)")
    if rank is None or world_size is None:
        _, rank, _, world_size = get_dist_info()
    bos = tokenizer.get_bos_token_id()
    row_capacity = T + 1

    # Doc buffer. `docs` maps an arrival number to (tokens, ref) and keeps arrival order (dicts do);
    # `by_len` holds (len, arrival) sorted, so "longest that fits, earliest on ties" and "shortest,
    # earliest on ties" are two bisects instead of a scan. Same choices as nanochat's linear scan.
    docs: dict[int, tuple[list, tuple]] = {}
    by_len: list[tuple[int, int]] = []
    arrivals = 0

    def push(tokens, ref):
        nonlocal arrivals
        docs[arrivals] = (tokens, ref)
        bisect.insort(by_len, (len(tokens), arrivals))
        arrivals += 1

    cursor = (1, 0, rank, 0)
    if resume_state_dict is not None:
        exact, approx = _pick_state(resume_state_dict, rank, world_size)
        if exact is not None:
            cursor = (exact["epoch"], exact["pq_idx"], exact["rg_idx"], exact["doc_idx"])
            for ref, tokens in zip(*_restore_buffer(exact, paths, tokenizer, bos, tokenizer_threads)):
                push(tokens, ref)
        else:
            cursor = approx
    if cursor[1] >= len(paths):
        raise ValueError(f"loader resume state points at shard {cursor[1]} but only {len(paths)} shards were given")

    stream = _document_batches(paths, rank, world_size, tokenizer_batch_size, cursor)
    batches = _tokenized_batches(tokenizer, bos, tokenizer_threads, stream, prefetch)

    def refill():
        nonlocal cursor
        refs, token_lists, cursor = next(batches)
        for ref, tokens in zip(refs, token_lists):
            push(tokens, ref)

    def state_dict():
        runs = []  # consecutive buffered docs from the same row group share one entry
        for _, (pq_idx, rg_idx, row) in docs.values():
            if runs and runs[-1][0] == pq_idx and runs[-1][1] == rg_idx:
                runs[-1][2].append(row)
            else:
                runs.append([pq_idx, rg_idx, [row]])
        used = {cursor[1]} | {r[0] for r in runs}
        return {
            "version": STATE_VERSION, "rank": rank, "world_size": world_size,
            "epoch": cursor[0], "pq_idx": cursor[1], "rg_idx": cursor[2], "doc_idx": cursor[3],
            "shards": {str(i): os.path.basename(paths[i]) for i in sorted(used) if i < len(paths)},
            "buffer": runs,
        }

    use_cuda = torch.device(device).type == "cuda"
    cpu_buffer = torch.empty(2 * B * T, dtype=torch.long, pin_memory=use_cuda)
    dev_buffer = torch.empty(2 * B * T, dtype=torch.long, device=device)
    cpu_inputs, cpu_targets = cpu_buffer[:B * T].view(B, T), cpu_buffer[B * T:].view(B, T)
    inputs, targets = dev_buffer[:B * T].view(B, T), dev_buffer[B * T:].view(B, T)

    try:
        while True:
            flat = []
            for _ in range(B):
                pos = 0
                while pos < row_capacity:
                    while len(docs) < buffer_size:
                        refill()
                    remaining = row_capacity - pos
                    i = bisect.bisect_right(by_len, (remaining, float("inf")))  # first entry longer than remaining
                    if i > 0:
                        # longest length that fits; among equal lengths the earliest arrival
                        i = bisect.bisect_left(by_len, (by_len[i - 1][0], -1))
                        _, key = by_len.pop(i)
                        tokens = docs.pop(key)[0]
                        flat.extend(tokens)
                        pos += len(tokens)
                    else:
                        # nothing fits: crop the shortest to fill the row exactly (least waste); its
                        # tail is discarded, never carried to the next row
                        _, key = by_len.pop(0)
                        flat.extend(docs.pop(key)[0][:remaining])
                        pos = row_capacity
            rows = torch.tensor(flat, dtype=torch.long).view(B, row_capacity)
            cpu_inputs.copy_(rows[:, :-1])
            cpu_targets.copy_(rows[:, 1:])
            dev_buffer.copy_(cpu_buffer, non_blocking=use_cuda)
            yield inputs, targets, state_dict()
    finally:
        batches.close()


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """The loader above without the state: yields (inputs, targets). Used for validation."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets
