"""The process layer every stage stands on: logging, device and dtype choice, torch.distributed
set-up from the torchrun environment (`Device`, made once per stage by the stage contract),
cross-rank reductions (`all_reduce`, the one helper every library uses), seeding, and the GPU
peak-FLOPs table used for MFU.

Follows nanochat's common.py. Differences on purpose:
- distributed runs work on CPU too (gloo), not only CUDA (nccl);
- TF32 is enabled with the call that works (`set_float32_matmul_precision("high")`);
- `compute_dtype` makes the bf16-vs-fp32 choice explicit and overridable.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Logging: configured once per process, by the stage contract (nanopipe.stage.main)

logger = logging.getLogger("nanopipe")


def setup_logging() -> None:
    """One format for every process: `HH:MM:SS [rankN] message` under torchrun, `[nanopipe]` otherwise;
    INFO on rank 0, WARNING elsewhere (ranks > 0 would repeat rank 0's lines)."""
    rank = _env_rank()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EveryLine(f"%(asctime)s [{'rank%d' % rank if 'RANK' in os.environ else 'nanopipe'}] %(message)s",
                                    datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=[handler])
    logging.captureWarnings(True)  # Python warnings in the same format, not warnings' own two-line one
    logging.getLogger("rustbpe").setLevel(logging.WARNING)  # per-merge progress lines


class _EveryLine(logging.Formatter):
    """Every line of a multi-line record (a traceback, a warning with its source line) carries the
    time and tag too, so a log is one format line by line, for grep and for log collectors."""

    def format(self, record):
        text = super().format(record)
        first, *rest = text.split("\n")
        prefix = first[: first.index("] ") + 2] if "] " in first else ""
        return "\n".join([first, *(prefix + line for line in rest)])


def _env_rank() -> int:
    return int(os.environ.get("RANK", 0))


def print0(s="", end="\n", **kwargs) -> None:
    """A line of rank-0 output (rank read from the torchrun env, so it works before init), logged: the
    one log format, on stderr, so that stdout holds only what a command answers (`nanopipe chat
    --prompt ... > out.txt`). Text printed with end="" waits for the rest of its line."""
    if _env_rank() != 0:
        return
    text = "".join(_partial) + str(s) + end
    _partial.clear()
    if not text.endswith("\n"):
        _partial.append(text)
        return
    for line in text[:-1].split("\n"):
        logger.info(line)


_partial: list[str] = []  # print0 text whose line has not ended yet


def log0(message: str, level: int = logging.INFO) -> None:
    """logger.log() on rank 0 only."""
    if _env_rank() == 0:
        logger.log(level, message)


# -----------------------------------------------------------------------------
# Progress in logs that are not a terminal
#
# tqdm draws its bar only on a terminal; under `dvc repro` (stderr a pipe or a file) a long loop
# would say nothing for minutes. Progress logs one status line with an ETA every
# `runtime.progress_interval` seconds (0: off) in the one log format. The stage contract sets the
# interval; the key is not a DVC param of any stage, as how often a stage reports cannot change its
# outputs (docs/decisions.md D17).

PROGRESS_INTERVAL = [30.0]  # seconds; set once per process by nanopipe.stage.main


def set_progress_interval(seconds: float) -> None:
    PROGRESS_INTERVAL[0] = float(seconds)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """`update(done, detail)` in a loop of `total` units: every interval, on rank 0, a line like
    `pretrain: step 120/400 (30%) | loss 3.2104, 1,234 tok/s | elapsed 0:02:00 | ETA 0:04:40`.
    bar=True: the loop has a tqdm bar, so lines are logged only when stderr is not a terminal."""

    def __init__(self, what: str, total: int | None, unit: str = "step", done: int = 0, bar: bool = False):
        self.what, self.total, self.unit, self.done0 = what, total, unit, done
        self.t0 = self.last = time.time()
        interval = PROGRESS_INTERVAL[0]
        self.on = _env_rank() == 0 and interval > 0 and not (bar and sys.stderr.isatty())

    def update(self, done: int, detail: str = "") -> None:
        if not self.on:
            return
        now = time.time()
        if now - self.last < PROGRESS_INTERVAL[0]:
            return
        self.last = now
        elapsed = now - self.t0
        rate = (done - self.done0) / elapsed if elapsed > 0 else 0.0
        if self.total:
            where = f"{self.unit} {done}/{self.total} ({100 * done / self.total:.0f}%)"
            eta = _duration((self.total - done) / rate) if rate > 0 else "unknown (no unit done yet)"
        else:
            where, eta = f"{self.unit} {done}", "unknown (no fixed total)"
        logger.info("%s: %s%s | elapsed %s | ETA %s", self.what, where, f" | {detail}" if detail else "",
                    _duration(elapsed), eta)


def print_banner() -> None:
    banner = r"""
                                        _
  _ __   __ _ _ __   ___  _ __ (_)_ __   ___
 | '_ \ / _` | '_ \ / _ \| '_ \| | '_ \ / _ \
 | | | | (_| | | | | (_) | |_) | | |_) |  __/
 |_| |_|\__,_|_| |_|\___/| .__/|_| .__/ \___|
                         |_|     |_|
"""
    print0(banner)


# -----------------------------------------------------------------------------
# Distributed


def is_ddp_requested() -> bool:
    """torchrun sets all three of these for every worker."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_ddp_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_dist_info() -> tuple[bool, int, int, int]:
    """(ddp, rank, local_rank, world_size); (False, 0, 0, 1) outside torchrun."""
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def autodetect_device_type() -> str:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        device_type = "cuda"
    elif torch.backends.mps.is_available():
        device_type = "mps"
    else:
        device_type = "cpu"
    print0(f"Autodetected device type: {device_type}")
    return device_type


def compute_init(device_type: str = "cuda", seed: int = 42, timeout_s: float = 1800.0):
    """Seed, set precision flags and join the process group when launched by torchrun.

    Returns (ddp, rank, local_rank, world_size, device). nccl on CUDA, gloo on CPU; MPS
    has no multi-process backend and is refused when torchrun asks for one.
    """
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device_type must be one of cuda/mps/cpu, got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_type='cuda' was requested but torch.cuda.is_available() is False "
                           "(CPU-only torch build or no visible GPU); use device_type='cpu'")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device_type='mps' was requested but torch.backends.mps.is_available() is False")

    seed_everything(seed)
    if device_type == "cpu":
        # Tiny gradients and optimizer moments drift into fp32 denormals as training goes on, and
        # x86 handles those in microcode: ~15% of a CPU step at the tiny preset. Flush them to 0.
        torch.set_flush_denormal(True)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "mps":
        raise RuntimeError(f"torchrun launched {world_size} workers but MPS has no distributed backend; "
                           "run a single process or use device_type='cpu'")
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not is_ddp_initialized():
            dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=timeout_s))
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        if not is_ddp_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        dist.barrier()
    else:
        device = torch.device(device_type)
    if rank == 0:
        logger.info(f"Distributed world size: {world_size} (device {device})")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup() -> None:
    """Tear down the process group if we made one (safe to call always)."""
    if is_ddp_initialized():
        dist.destroy_process_group()


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce `t` in place across ranks when a process group is up (a no-op in one process)."""
    if is_ddp_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=_REDUCE_OPS[op])
    return t


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if is_ddp_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return _env_rank() == 0


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (any picklable value): a decision taken once, the same on all ranks."""
    if not (is_ddp_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not (is_ddp_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def is_multi_node() -> bool:
    """Launched by torchrun on several nodes (fewer workers on this node than in the world)."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    return local is not None and world is not None and local != world


def die_with_parent() -> None:
    """Under torchrun, end this worker when its agent dies. torchrun starts workers in sessions of their
    own, so a kill -9 of the agent (or of `dvc repro` above it) would leave them training, holding the
    GPUs and writing beside the rerun. Linux's PR_SET_PDEATHSIG; elsewhere a no-op."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the agent died before the call took effect
        os._exit(1)


def node_name() -> str:
    """This node, as messages name it: the host, and the torchrun node (group) rank when there is one."""
    import socket

    group = os.environ.get("GROUP_RANK")
    return socket.gethostname() + (f" (node rank {group})" if group is not None else "")


def check_shared_workdir(workdir) -> None:
    """A multi-node stage reads its inputs from, and rank 0 writes its outputs to, one working directory:
    every node must see it (a shared filesystem), else ranks elsewhere would read stale or missing files
    and the run would hang or mix states. Rank 0 writes a token file there; every rank must read it back.
    A no-op on one node (torchrun's LOCAL_WORLD_SIZE equals WORLD_SIZE)."""
    import pathlib
    import uuid

    if not (is_ddp_initialized() and is_multi_node()):
        return
    name = broadcast_from_rank0(f".nanopipe-shared-{uuid.uuid4().hex[:12]}")
    token = pathlib.Path(workdir).resolve() / name  # each rank looks in its own working directory
    if is_rank0():
        token.write_text(name)
    dist.barrier()
    seen = token.exists() and token.read_text() == name
    views = gather_objects((seen, node_name()))
    dist.barrier()
    if is_rank0():
        token.unlink(missing_ok=True)
    blind = sorted({node for ok, node in views if not ok})
    if blind:
        raise RuntimeError(f"{', '.join(blind)} cannot see the working directory {token.parent} that node rank 0 "
                           f"writes to (it wrote {name} there; they do not find it in theirs): a multi-node run needs the "
                           "checkout on a shared filesystem, mounted at the same path on every node "
                           "(README, \"Scale out\")")


@dataclass
class Device:
    """This process's place in the run: rank, world size, device, matmul dtype, peak FLOP/s."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    peak_flops: float

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast_ctx(self.device, self.dtype)

    def sync(self) -> None:
        synchronize(self.device)

    def max_memory_mib(self) -> float:
        if self.device.type == "cpu":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)
        return get_max_memory(self.device) / 2**20

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.ddp:
            return list(values)
        return all_reduce(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def all_reduce_max(self, value: float) -> float:
        if not self.ddp:
            return value
        return all_reduce(torch.tensor(value, dtype=torch.float64, device=self.device), "max").item()

    def all_reduce_mean(self, value: float) -> float:
        return self.all_reduce_sum([value])[0] / self.world_size

    def close(self) -> None:
        compute_cleanup()


def setup_device(device: str, dtype: str, seed: int, threads: int) -> Device:
    """The runtime.* settings made real: seed, device, process group (under torchrun), dtype."""
    device_type = autodetect_device_type() if device == "auto" else device
    if device_type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    ddp, rank, local_rank, world_size, dev = compute_init(device_type, seed=seed)
    peak = get_peak_flops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else float("inf")
    return Device(ddp, rank, local_rank, world_size, dev, compute_dtype(dev, dtype), peak)


# -----------------------------------------------------------------------------
# Seeding, dtype, device-aware small helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if installed) and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2**32))
    except ImportError:
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls run
    ~2x fp32. Elsewhere bf16 is emulated and slower than fp32. Linux only (reads /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def compute_dtype(device, override: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype matmuls run in. auto: bf16 on CUDA SM80+ (Ampere and newer) and on CPUs with
    native bf16 (AVX512-BF16/AMX), fp32 elsewhere (MPS, older GPUs and CPUs). Weights, optimizer
    state and the residual stream stay fp32 either way (autocast). `override` ('bfloat16',
    'float32', ...) wins when given."""
    if override is not None and override != "auto":
        if isinstance(override, torch.dtype):
            return override
        if override not in _DTYPES:
            raise ValueError(f"unknown dtype override {override!r}; expected one of {sorted(_DTYPES)} or 'auto'")
        return _DTYPES[override]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def autocast_ctx(device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA, bf16 autocast on CPU; a no-op for fp32 (and on MPS)."""
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.amp.autocast(device_type="cuda", dtype=dtype)
    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.amp.autocast(device_type="cpu", dtype=dtype)
    return contextlib.nullcontext()


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def get_max_memory(device) -> int:
    """Peak bytes allocated on the accelerator; 0 where torch cannot tell (CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    return 0


# -----------------------------------------------------------------------------
# Peak FLOPs (BF16 dense) for MFU. First entry whose substrings all occur wins.

_PEAK_FLOPS = [
    (["gb200"], 2.5e15),
    (["grace blackwell"], 2.5e15),
    (["b200"], 2.25e15),
    (["b100"], 1.8e15),
    (["h200", "nvl"], 836e12),
    (["h200", "pcie"], 836e12),
    (["h200"], 989e12),
    (["h100", "nvl"], 835e12),
    (["h100", "pcie"], 756e12),
    (["h100"], 989e12),
    (["h800", "nvl"], 989e12),
    (["h800"], 756e12),
    (["a100"], 312e12),
    (["a800"], 312e12),
    (["a40"], 149.7e12),
    (["a30"], 165e12),
    (["l40s"], 362e12),
    (["l40-s"], 362e12),
    (["l40 s"], 362e12),
    (["l4"], 121e12),
    (["mi355"], 2.5e15),
    (["mi325"], 1.3074e15),
    (["mi300x"], 1.3074e15),
    (["mi300a"], 980.6e12),
    (["mi250x"], 383e12),
    (["mi250"], 362.1e12),
    (["5090"], 209.5e12),
    (["4090"], 165.2e12),
    (["3090"], 71e12),
]


def get_peak_flops(device_name: str) -> float:
    """BF16 dense peak FLOP/s for a GPU name (case-insensitive); inf plus a warning when
    unknown, so MFU reads 0% instead of a made-up number."""
    name = device_name.lower()
    if "data center gpu max 1550" in name:
        # Intel Ponte Vecchio: 512 flops/clock/EU at 1.3 GHz.
        return 512 * torch.xpu.get_device_properties().max_compute_units * 1300e6
    for patterns, flops in _PEAK_FLOPS:
        if all(p in name for p in patterns):
            return flops
    logger.warning(f"Peak flops undefined for {device_name!r}, MFU will show as 0%")
    return float("inf")


# -----------------------------------------------------------------------------
# Fetch once per node, decide once for every rank (issue 14)
#
# nanochat fetches shared files with a file lock and nothing else: every rank calls
# download_file_with_lock (nanochat nanochat/common.py @1ec0a34), the lock holder downloads and the
# others block, then find the file (nanochat scripts/base_eval.py @1ec0a34 fetches the CORE bundle so). A
# failure there is a crash, so the ranks never disagree for long. nanopipe instead records an
# unfetchable bundle or dataset as "unavailable" and carries on, and then the ranks must agree: a
# rank that records "unavailable" skips collectives (the all-reduce of evaluate_task) that a rank
# whose fetch worked enters, and both wait until the NCCL timeout. So here the outcome of the
# fetch is decided once and shared, and every rank leaves with the same value-or-exception.

class FetchFailed(RuntimeError):
    """Stands in, on every rank, for an exception of `fetch_once`'s function that cannot cross
    process boundaries (does not survive pickling): same text, one type on all ranks."""


def _portable(exc: Exception) -> Exception:
    """`exc` if a pickled copy of it comes back with the same type and text, else a FetchFailed with its text.

    Checked by a round trip here, before it is sent: a copy that failed to unpickle would raise on the
    receiving ranks only, and they would part ways with the sender."""
    import pickle
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:  # noqa: BLE001, S110 -- any failure to pickle or unpickle means: send the text instead
        pass
    return FetchFailed(f"{type(exc).__name__}: {exc}")


def _fetch_locked(fn, lock_path: str, lock_timeout_s: float):
    """(fn()'s value, None), or (None, the exception it raised), with `lock_path` held around the call."""
    from filelock import FileLock, Timeout
    try:
        os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
        try:
            # flock(2) underneath: released by the kernel if the holder dies, so never stale
            with FileLock(lock_path, timeout=lock_timeout_s):
                return fn(), None
        except Timeout:
            raise TimeoutError(f"waited {lock_timeout_s:.0f} s for the lock {lock_path}: another process (another "
                               f"job sharing this cache?) holds it while it fetches into the same place") from None
    except Exception as e:  # becomes this rank's outcome, shared with every rank, never raised past a collective
        return None, e


def _agree(failure: Exception | None, rank0_only: bool = False) -> None:
    """Share the failures (rank 0's alone, or every rank's) and raise the first one, by rank, on every
    rank; return on every rank when there was none. A collective: every rank calls it."""
    rank = dist.get_rank()
    sent = None if failure is None else _portable(failure)
    failures = {0: broadcast_from_rank0(sent)} if rank0_only else dict(enumerate(gather_objects(sent)))
    first = next((r for r in sorted(failures) if failures[r] is not None), None)
    if first is None:
        return
    if first == rank:  # the rank it happened on raises its own exception (with its traceback)
        if sent is failure:
            raise failure
        raise sent from failure
    exc = failures[first]
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(f"(raised on rank {first}; fetch_once raised it on every rank so that all take the same branch)")
    raise exc


def fetch_once(fn, lock_path, lock_timeout_s: float = 1200.0):
    """Call `fn()` -- fetch or build something into a cache on local disk and return it -- so that ONE
    process per node does the work and every rank leaves with the same outcome.

    One process (no process group, or world size 1): a plain `fn()`, no lock.

    Under torch.distributed this is a collective: every rank must call it, in the same order.
      1. Global rank 0 calls `fn()` first, so that with a cache on a shared filesystem the other nodes
         just hit it. If it raised, every rank raises that exception now and nobody else calls `fn`.
      2. Then local rank 0 (torchrun's LOCAL_RANK) of every other node calls it: it fills that node's
         cache, or finds rank 0's. Where LOCAL_RANK is unset, each rank counts as local rank 0 of its
         own node (still safe: the lock keeps ranks sharing a cache from fetching at once).
      3. Then all the other ranks call it: they read what their node's local rank 0 left.
    Each call holds the file lock `lock_path` (which should sit next to the cache), so that two jobs
    sharing a cache on one node, or nodes sharing it on a filesystem, never fetch into it at once.
    After each of the three steps the failures are shared (broadcast, then all-gather of a small
    object; values never travel, each rank keeps its own): if any rank's `fn()` raised, EVERY rank
    raises the exception of the lowest such rank, with the same type and text (one that cannot be
    pickled becomes `FetchFailed` with its text, on every rank). So callers catch exactly as they
    would around a plain `fn()`, and all ranks take the same branch.

    Bounded: an exception in `fn` (or a lock not acquired within `lock_timeout_s`, a TimeoutError) is
    an outcome that is shared, never raised past a collective the other ranks are in. `fn` must bound
    its own time (fetch_eval_bundle has a timeout); while it runs the other ranks wait in a collective,
    whose limit is the process group's timeout (runtime.compute_init's timeout_s, 30 min): keep
    `lock_timeout_s` below it so a lock that is never released fails with this message, not theirs.
    KeyboardInterrupt and SystemExit are not caught: the process ends and torchrun stops the others.
    """
    if not (is_ddp_initialized() and dist.get_world_size() > 1):
        return fn()
    lock_path = os.fspath(lock_path)
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    value, failure = _fetch_locked(fn, lock_path, lock_timeout_s) if rank == 0 else (None, None)
    _agree(failure, rank0_only=True)
    if local_rank == 0 and rank != 0:
        value, failure = _fetch_locked(fn, lock_path, lock_timeout_s)
    _agree(failure)
    if local_rank != 0:
        value, failure = _fetch_locked(fn, lock_path, lock_timeout_s)
    _agree(failure)
    return value
