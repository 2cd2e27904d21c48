"""CORE metric for base models (nanochat's core_eval.py + evaluate_core from base_eval.py).

The DCLM eval bundle ("DataComp-LM", arXiv 2406.11794) is a directory with
  core.yaml            icl_tasks: [{label, icl_task_type, dataset_uri, num_fewshot: [k], continuation_delimiter?}]
  eval_meta_data.csv   columns "Eval Task", "Random baseline" (a percentage)
  eval_data/<uri>      one JSONL file per task
Three task types are scored by a forward pass, no sampling:
  multiple_choice  {query, choices, gold}: lowest mean loss over the choice tokens wins
  schema           {context_options, continuation, gold}: lowest mean loss over the shared continuation wins
  language_modeling {context, continuation}: correct iff greedy argmax reproduces the continuation exactly
Each task's accuracy is centred by its random baseline rb: (acc - 0.01 rb) / (1 - 0.01 rb);
CORE = the mean centred accuracy. Prompts reproduce upstream's Jinja templates exactly (see the
render_* functions) without depending on Jinja.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from nanopipe.artifacts import atomic_dir
from nanopipe.runtime import Device, Progress, all_reduce, fetch_once, get_dist_info, print0

log = logging.getLogger("nanopipe.core")
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SOURCE_FILE = ".source.json"  # written into a fetched bundle: where it came from


class EvalBundleUnavailable(RuntimeError):
    """The bundle could not be fetched (offline, refused, not found). The stage records CORE as unavailable."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"eval bundle unavailable: cannot fetch {url}: {reason}")

    @property
    def short(self) -> str:
        """One line for a report: what failed (the error's type, not its text) and what to do."""
        what = self.reason.split(":", 1)[0]
        return (f"eval bundle unavailable: cannot fetch {self.url} ({what}); point base_eval.bundle_url at a "
                f"reachable URL or a local copy of eval_bundle.zip")

    def __reduce__(self):  # pickled by fetch_once to reach the other ranks: rebuild from (url, reason)
        return type(self), (self.url, self.reason)


class EvalBundleInvalid(ValueError):
    """The bundle was fetched (or found) but is not a DCLM eval bundle: a real error, not "unavailable"."""


# -----------------------------------------------------------------------------
# The bundle: load + verify, fetch

def load_eval_bundle(bundle_dir) -> tuple[list[dict], dict[str, float]]:
    """Read and verify a bundle; return (tasks, random_baselines). Tasks carry task_type/num_fewshot/... resolved."""
    bundle_dir = Path(bundle_dir)
    config_path, meta_path, data_dir = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv", bundle_dir / "eval_data"
    missing = [p.name for p in (config_path, meta_path, data_dir) if not p.exists()]
    if missing:
        raise EvalBundleInvalid(f"{bundle_dir}: not an eval bundle, missing {missing} "
                                f"(expected core.yaml, eval_meta_data.csv and eval_data/)")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        icl_tasks = config["icl_tasks"]
        assert isinstance(icl_tasks, list) and icl_tasks
    except Exception as e:
        raise EvalBundleInvalid(f"{config_path}: expected a YAML mapping with a non-empty `icl_tasks` list ({e!r})") from e
    random_baselines = {}
    with open(meta_path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            try:
                random_baselines[row["Eval Task"]] = float(row["Random baseline"])
            except (KeyError, TypeError, ValueError) as e:
                raise EvalBundleInvalid(f"{meta_path}: expected columns 'Eval Task' and 'Random baseline' "
                                        f"(a number), got row {row}") from e
    tasks, problems = [], []
    for i, t in enumerate(icl_tasks):
        try:
            task = {
                "label": t["label"],
                "task_type": t["icl_task_type"],
                "dataset_uri": t["dataset_uri"],
                "num_fewshot": t["num_fewshot"][0],  # a list upstream; only the first entry is used
                "continuation_delimiter": t.get("continuation_delimiter", " "),
            }
        except (KeyError, TypeError, IndexError) as e:
            problems.append(f"icl_tasks[{i}] lacks {e} (needs label, icl_task_type, dataset_uri, num_fewshot: [k])")
            continue
        if task["task_type"] not in TASK_TYPES:
            problems.append(f"{task['label']}: icl_task_type {task['task_type']!r} is not one of {TASK_TYPES}")
        if task["label"] not in random_baselines:
            problems.append(f"{task['label']}: no 'Random baseline' row in eval_meta_data.csv")
        if not (data_dir / task["dataset_uri"]).is_file():
            problems.append(f"{task['label']}: eval_data/{task['dataset_uri']} not found")
        tasks.append(task)
    if problems:
        raise EvalBundleInvalid(f"{bundle_dir}: invalid eval bundle:\n  " + "\n  ".join(problems))
    return tasks, random_baselines


def _download(url: str, dest: Path, timeout: float) -> None:
    import fsspec
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = {}
    if protocol in ("http", "https"):
        import aiohttp  # fsspec's http backend; bound connect/read so that offline fails fast
        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        fs.get_file(path, str(dest))
    except Exception as e:  # any failure to fetch means "unavailable"; content problems are checked after
        raise EvalBundleUnavailable(url, f"{type(e).__name__}: {e}") from e
    if not dest.exists() or dest.stat().st_size == 0:
        raise EvalBundleUnavailable(url, "fetched nothing (empty response)")


def fetch_eval_bundle(url: str, cache_dir, timeout: float = 30.0) -> Path:
    """Return `<cache_dir>/eval_bundle`, fetching and extracting the zip at `url` (any fsspec URL) if needed.

    The directory appears in one rename, verified, with SOURCE_FILE recording url and sha256 of the zip.
    A cached bundle fetched from another url is replaced; one placed by hand (no SOURCE_FILE) is used as is.
    Raises EvalBundleUnavailable when it cannot be fetched (`timeout` bounds connecting and each read)
    and EvalBundleInvalid when what was fetched is not an eval bundle.
    """
    cache_dir = Path(cache_dir)
    bundle_dir = cache_dir / "eval_bundle"
    source = bundle_dir / SOURCE_FILE
    if bundle_dir.is_dir():
        cached_url = json.loads(source.read_text(encoding="utf-8")).get("url") if source.exists() else None
        if cached_url in (url, None):
            load_eval_bundle(bundle_dir)
            if cached_url is None:
                print0(f"Using the eval bundle placed at {bundle_dir} (not fetched by nanopipe; {url} not consulted)")
            return bundle_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".eval_bundle.fetch-", dir=cache_dir) as work:
        zip_path, unzipped = Path(work) / "eval_bundle.zip", Path(work) / "unzipped"
        _download(url, zip_path, timeout)
        if not zipfile.is_zipfile(zip_path):
            raise EvalBundleInvalid(f"{url}: fetched {zip_path.stat().st_size} bytes that are not a zip archive")
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(unzipped)  # zipfile drops absolute and '..' path parts
        # the upstream zip holds a top-level eval_bundle/; accept the files at the top, or one other folder
        candidates = [unzipped / "eval_bundle", unzipped] + sorted(p for p in unzipped.iterdir() if p.is_dir())
        root = next((r for r in candidates if (r / "core.yaml").is_file()), None)
        if root is None:
            raise EvalBundleInvalid(f"{url}: the zip has no core.yaml (at the top or under eval_bundle/)")
        load_eval_bundle(root)
        stamp = {"url": url, "sha256": hashlib.sha256(zip_path.read_bytes()).hexdigest()}
        # the verified directory is the artifact; it appears in one rename (the zip is not kept)
        with atomic_dir(bundle_dir) as out:
            for child in root.iterdir():
                shutil.move(str(child), str(out / child.name))
            (out / SOURCE_FILE).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    print0(f"Placed eval bundle from {url} at {bundle_dir}")
    return bundle_dir


# -----------------------------------------------------------------------------
# Prompt rendering (upstream's Jinja templates, reproduced)
#
# Upstream's templates put each few-shot example on its own line ("...{{ answer }}\n") and
# follow them with the item without a separator; `{{ x }}` renders str(x); `| trim` is str.strip().

def render_prompts_mc(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per choice: [fs.query D fs.choices[fs.gold] \\n]* item.query D choice."""
    shots = "".join(f"{ex['query']}{continuation_delimiter}{ex['choices'][ex['gold']]}\n" for ex in fewshot_examples or [])
    return [f"{shots}{item['query']}{continuation_delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per context option: [fs.context_options[fs.gold] D fs.continuation \\n]* option D item.continuation."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{continuation_delimiter}{ex['continuation']}\n"
                    for ex in fewshot_examples or [])
    return [f"{shots}{option}{continuation_delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=None):
    """[prompt without the continuation (then stripped), prompt with it]."""
    shots = "".join(f"{str(ex['context']).strip()}{continuation_delimiter}{ex['continuation']}\n"
                    for ex in fewshot_examples or [])
    without = f"{shots}{str(item['context']).strip()}{continuation_delimiter}"
    return [without.strip(), f"{without}{item['continuation']}"]


# -----------------------------------------------------------------------------
# Tokenising, batching, cropping

def find_common_length(token_sequences, direction="left"):
    """Number of positions, from the left or the right, where all sequences agree."""
    min_len = min(len(seq) for seq in token_sequences)
    indices = range(min_len) if direction == "left" else range(-1, -min_len - 1, -1)
    for i, idx in enumerate(indices):
        token = token_sequences[0][idx]
        if not all(seq[idx] == token for seq in token_sequences):
            return i
    return min_len


def stack_sequences(tokens, pad_token_id):
    """Right-pad to a (len(tokens), max_len) long tensor."""
    input_ids = torch.full((len(tokens), max(len(x) for x in tokens)), pad_token_id, dtype=torch.long)
    for i, x in enumerate(tokens):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return input_ids


def batch_sequences_mc(tokenizer, prompts):
    # the choices are the only difference: score from the end of the common prefix
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    start = find_common_length(tokens, direction="left")
    return tokens, [start] * len(prompts), [len(x) for x in tokens]


def batch_sequences_schema(tokenizer, prompts):
    # the contexts differ and the continuation is shared: score the common suffix
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    suffix = find_common_length(tokens, direction="right")
    ends = [len(x) for x in tokens]
    return tokens, [e - suffix for e in ends], ends


def batch_sequences_lm(tokenizer, prompts):
    tokens_without, tokens_with = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    start, end = len(tokens_without), len(tokens_with)
    if not (start < end and tokens_without == tokens_with[:start]):
        raise ValueError(f"language_modeling: the prompt without the continuation does not tokenize to a strict "
                         f"prefix of the prompt with it ({prompts[0][-40:]!r} vs {prompts[1][-40:]!r})")
    return [tokens_with], [start], [end]


def crop_sequences(tokens, starts, ends, max_seq_len):
    """Keep the last max_seq_len tokens of each sequence and shift its scored span to match."""
    out_t, out_s, out_e = [], [], []
    for t, s, e in zip(tokens, starts, ends):
        crop = max(0, len(t) - max_seq_len)
        if s - crop < 1:  # the token before the span must remain: it predicts the span's first token
            raise ValueError(f"cannot crop a {len(t)}-token prompt to max_seq_len={max_seq_len}: "
                             f"its scored span alone ({e - s} tokens) does not fit")
        out_t.append(t[crop:])
        out_s.append(s - crop)
        out_e.append(e - crop)
    return out_t, out_s, out_e


@torch.no_grad()
def forward_model(model, input_ids):
    """Per-token next-token losses (last column NaN: nothing follows it) and argmax predictions."""
    batch_size, seq_len = input_ids.size()
    logits = model(input_ids).float()
    target_ids = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.view(batch_size * seq_len, -1), target_ids.view(-1),
                             reduction="none").view(batch_size, seq_len)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate_example(idx, model, tokenizer, data, device, task_meta, max_seq_len=None):
    """True when example `idx` of `data` is answered correctly."""
    item = data[idx]
    task_type, num_fewshot = task_meta["task_type"], task_meta["num_fewshot"]
    delimiter = task_meta["continuation_delimiter"]
    fewshot_examples = []
    if num_fewshot > 0:
        rng = random.Random(1234 + idx)  # seeded per example: the same shots on every run and rank
        available = [i for i in range(len(data)) if i != idx]
        fewshot_examples = [data[i] for i in rng.sample(available, num_fewshot)]
    if task_type == "multiple_choice":
        tokens, starts, ends = batch_sequences_mc(tokenizer, render_prompts_mc(item, delimiter, fewshot_examples))
    elif task_type == "schema":
        tokens, starts, ends = batch_sequences_schema(tokenizer, render_prompts_schema(item, delimiter, fewshot_examples))
    elif task_type == "language_modeling":
        tokens, starts, ends = batch_sequences_lm(tokenizer, render_prompts_lm(item, delimiter, fewshot_examples))
    else:
        raise ValueError(f"Unsupported task type: {task_type!r} (expected one of {TASK_TYPES})")
    if max_seq_len is None:
        max_seq_len = getattr(model, "max_seq_len", None)
    if max_seq_len is not None:
        tokens, starts, ends = crop_sequences(tokens, starts, ends, max_seq_len)
    input_ids = stack_sequences(tokens, tokenizer.get_bos_token_id()).to(device)  # BOS pads; padded tail is never scored
    losses, predictions = forward_model(model, input_ids)
    if task_type == "language_modeling":
        si, ei = starts[0], ends[0]
        return bool(torch.all(predictions[0, si - 1:ei - 1] == input_ids[0, si:ei]).item())
    mean_losses = [losses[i, si - 1:ei - 1].mean().item() for i, (si, ei) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(model, tokenizer, data, device, task_meta, max_seq_len=None) -> float:
    """Accuracy over `data`; rank r of W takes examples r, r+W, ... and the counts are all-reduced."""
    _, rank, _, world_size = get_dist_info()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    progress = Progress(f"CORE {task_meta.get('label', '')}".rstrip(), len(data), "example")
    for idx in range(rank, len(data), world_size):
        progress.update(idx)
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task_meta, max_seq_len))
    return all_reduce(correct).mean().item()


def evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=-1, max_seq_len=None) -> dict:
    """Run every task of the bundle; return {"results", "centered_results", "core_metric"}.

    max_per_task > 0 keeps that many examples per task (after the seeded shuffle). max_seq_len crops
    prompts to their last max_seq_len tokens (default: the model's `max_seq_len` attribute, if any).
    """
    tasks, random_baselines = load_eval_bundle(bundle_dir)
    data_dir = Path(bundle_dir) / "eval_data"
    results, centered_results = {}, {}
    for task in tasks:
        t0 = time.time()
        label = task["label"]
        print0(f"Evaluating: {label} ({task['num_fewshot']}-shot, type: {task['task_type']})... ", end="")
        data_path = data_dir / task["dataset_uri"]
        with open(data_path, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
        if not data:
            raise EvalBundleInvalid(f"{data_path}: no examples")
        random.Random(1337).shuffle(data)  # fixed order, so max_per_task takes the same subset every time
        if max_per_task > 0:
            data = data[:max_per_task]
        if task["num_fewshot"] > len(data) - 1:  # upstream would fail in rng.sample; only tiny max_per_task gets here
            print0(f"(only {len(data)} examples: {len(data) - 1}-shot instead of {task['num_fewshot']}-shot) ", end="")
            task = {**task, "num_fewshot": len(data) - 1}
        accuracy = evaluate_task(model, tokenizer, data, device, task, max_seq_len)
        baseline = 0.01 * random_baselines[label]
        results[label] = accuracy
        centered_results[label] = (accuracy - baseline) / (1.0 - baseline)
        print0(f"accuracy: {accuracy:.4f} | centered: {centered_results[label]:.4f} | time: {time.time() - t0:.2f}s")
    core_metric = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric}


def core_or_unavailable(model, tokenizer, dev: Device, bundle_url: str, bundle_cache: str, max_per_task: int) -> dict:
    """CORE results, or {"core_metric": None, "core_unavailable": reason} when the bundle cannot be had
    (offline, say): base_eval and pretrain's periodic CORE then record why and carry on.

    Every rank calls this. Under torch.distributed the bundle is fetched by one rank per node
    (runtime.fetch_once, under the lock <bundle_cache>/.eval_bundle.lock) and the outcome is shared, so
    all ranks evaluate or all record "unavailable" with the same reason: were it decided per rank, a rank
    that gave up would skip the all-reduce of evaluate_task the others wait in, until the NCCL timeout.
    An invalid bundle (EvalBundleInvalid) is raised on every rank, failing the run with its message."""
    try:
        bundle = fetch_once(lambda: fetch_eval_bundle(bundle_url, Path(bundle_cache)),
                            Path(bundle_cache) / ".eval_bundle.lock")
    except EvalBundleUnavailable as e:
        log.warning("CORE unavailable: %s", e)  # the full error in the log; the metrics and report get one clean line
        return {"core_metric": None, "core_unavailable": e.short}
    model.eval()
    with dev.autocast():
        out = evaluate_core(model, tokenizer, dev.device, bundle, max_per_task=max_per_task)
    model.train()
    return out


def format_core_csv(out: dict) -> str:
    """The per-model CSV upstream writes to base_eval/<slug>.csv (Task, Accuracy, Centered; a final CORE row)."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, acc in out["results"].items():
        lines.append(f"{label:<35}, {acc:<10.6f}, {out['centered_results'][label]:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {out['core_metric']:<10.6f}")
    return "\n".join(lines) + "\n"
