"""Structured configs: the schema every composed config is validated against.

`conf/` holds the YAML (Hydra groups + experiment presets); `params.yaml` is its
composition, which DVC tracks and every stage reads. Before a stage does any work,
the composed config is merged into these dataclasses, so an unknown key or a value of
the wrong type fails at once with the key's full dotted name.

The schema is also registered in Hydra's ConfigStore (group `schema`) so it can be
used as a defaults-list entry by users who compose in Python with nanopipe imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class RuntimeConfig:
    device: str = MISSING  # auto | cpu | cuda | mps
    dtype: str = MISSING  # auto (bf16 on SM80+, fp32 otherwise) | float32 | bfloat16
    seed: int = MISSING
    threads: int = MISSING  # torch intra-op threads on CPU; 0 = torch's default
    # torchrun: processes per node and nodes; >1 of either makes GPU stages launch via torchrun
    nproc_per_node: int = MISSING
    nnodes: int = MISSING
    rdzv_backend: str = MISSING
    rdzv_endpoint: str = MISSING  # host:port of the rendezvous (node 0); required when nnodes > 1
    rdzv_id: str = MISSING


@dataclass
class TrackingConfig:
    enabled: bool = MISSING
    uri: Optional[str] = MISSING  # None: $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db
    experiment: str = MISSING
    log_artifacts: bool = MISSING


@dataclass
class EmbeddedSourceConfig:
    # Text that ships with every Python install: stdlib .py sources + pydoc topics.
    max_chars: int = MISSING  # total corpus budget (train + val)
    doc_chars: int = MISSING  # long files are split at blank lines into documents of about this size
    include_tests: bool = MISSING  # include Lib/test (large, repetitive)


@dataclass
class DataConfig:
    source: str = MISSING  # embedded | fineweb_edu | url
    # for `url`/`fineweb_edu`: an fsspec URL template with {index} (e.g. https://host/shard_{index:05d}.parquet)
    url_template: str = MISSING
    num_train_shards: int = MISSING  # train shards: indices 0..num_train_shards-1 (val shard excluded)
    val_shard: int = MISSING  # validation shard index, fixed by config (never "last on disk")
    total_shards: int = MISSING  # shards available at the source; val_shard must be < this
    row_group_size: int = MISSING
    seed: int = MISSING  # document shuffle for the embedded source
    workers: int = MISSING  # parallel downloads
    retries: int = MISSING  # attempts per shard
    backoff: float = MISSING  # seconds; doubles each attempt
    timeout: float = MISSING  # seconds per request
    embedded: EmbeddedSourceConfig = field(default_factory=EmbeddedSourceConfig)


@dataclass
class TokenizerConfig:
    vocab_size: int = MISSING
    max_chars: int = MISSING  # characters of training text fed to the trainer
    doc_cap: int = MISSING  # characters taken from each document
    trainer: str = MISSING  # auto | tokenizers | rustbpe
    eval_chars: int = MISSING  # characters of the val shard used by tok_eval


@dataclass
class ModelConfig:
    depth: int = MISSING  # the one dial: width, heads, LRs and batch size derive from it
    aspect_ratio: int = MISSING  # model_dim = depth * aspect_ratio, rounded up to a multiple of head_dim
    head_dim: int = MISSING
    max_seq_len: int = MISSING
    window_pattern: str = MISSING


@dataclass
class PretrainConfig:
    device_batch_size: int = MISSING
    total_batch_size: int = MISSING  # tokens per optimizer step; -1 = auto (Power Lines B ~ D^0.383)
    num_iterations: int = MISSING  # horizon precedence: num_iterations > target_flops > target_param_data_ratio
    target_flops: float = MISSING
    target_param_data_ratio: float = MISSING
    embedding_lr: float = MISSING
    unembedding_lr: float = MISSING
    matrix_lr: float = MISSING
    scalar_lr: float = MISSING
    batch_lr_scaling: bool = MISSING  # scale LRs by sqrt(total_batch_size / 2^19), nanochat's transfer from d12
    weight_decay: float = MISSING
    adam_beta1: float = MISSING
    adam_beta2: float = MISSING
    warmup_ratio: float = MISSING
    warmdown_ratio: float = MISSING
    final_lr_frac: float = MISSING
    eval_every: int = MISSING  # val bpb every N steps (-1: only at the end)
    eval_tokens: int = MISSING
    sample_every: int = MISSING  # -1 disables
    core_metric_every: int = MISSING  # -1 disables (needs the CORE bundle)
    core_metric_max_per_task: int = MISSING
    save_every: int = MISSING  # -1: only at the end
    log_every: int = MISSING  # step metrics to MLflow / plots every N steps
    compile: str = MISSING  # auto (on for CUDA) | true | false
    fp8: bool = MISSING
    fp8_recipe: str = MISSING
    loader_threads: int = MISSING


@dataclass
class BaseEvalConfig:
    eval_tokens: int = MISSING  # tokens for val/train bpb
    device_batch_size: int = MISSING
    core: bool = MISSING
    max_per_task: int = MISSING  # CORE examples per task (-1 = all)
    bundle_url: str = MISSING
    bundle_cache: str = MISSING
    sample_tokens: int = MISSING


@dataclass
class SFTConfig:
    # data: the conversation mixture (nanopipe.train.sft_data.build_mixture)
    mixture: str = MISSING  # full (nanochat's: smoltalk+mmlu+gsm8k+spelling+identity) | embedded (offline)
    identity_path: str = MISSING  # identity conversations (JSONL); "" = the set shipped in nanopipe.tasks
    identity_epochs: int = MISSING  # copies of the identity set in the train mixture
    gsm8k_epochs: int = MISSING  # copies of GSM8K train (full mixture only)
    simple_spelling_examples: int = MISSING  # SimpleSpelling rows
    spelling_bee_examples: int = MISSING  # SpellingBee rows
    arithmetic_examples: int = MISSING  # synthetic arithmetic rows (0 = none)
    val_examples: int = MISSING  # embedded mixture: rows of each synthetic task's test split for val loss
    dataset_dir: str = MISSING  # local copies of the remote datasets (pre-filled cache); "" = the hub
    # batch and horizon
    max_seq_len: int = MISSING  # row length; -1: the base model's sequence_len
    device_batch_size: int = MISSING
    total_batch_size: int = MISSING  # tokens per optimizer step; -1: the base checkpoint's
    num_iterations: int = MISSING  # > 0: exactly this many steps; -1: one epoch of the mixture
    # optimizer and schedule (progress-based: constant, then warmdown over the last warmdown_ratio)
    embedding_lr: float = MISSING
    unembedding_lr: float = MISSING
    matrix_lr: float = MISSING
    scalar_lr: float = MISSING
    weight_decay: float = MISSING  # Muon groups only (as nanochat)
    init_lr_frac: float = MISSING  # every LR is multiplied by this once at the start
    warmup_ratio: float = MISSING
    warmdown_ratio: float = MISSING
    final_lr_frac: float = MISSING
    # evaluation, checkpoints, logging
    eval_every: int = MISSING  # val loss every N steps (<= 0: only at the end)
    eval_tokens: int = MISSING
    save_every: int = MISSING  # resume checkpoint every N steps (-1: none)
    log_every: int = MISSING
    compile: str = MISSING  # auto (on for CUDA) | true | false
    sample_tokens: int = MISSING  # max tokens of each greedy probe reply after training (0: no probes)


@dataclass
class RLConfig:
    source: str = MISSING  # checkpoint to start from: sft | base (models/<source>)
    task: str = MISSING  # gsm8k (openai/gsm8k main) | arithmetic (embedded, offline)
    train_examples: int = MISSING  # train questions used; -1 = the whole train split (arithmetic: 1000 generated)
    arithmetic_max_steps: int = MISSING  # arithmetic task: at most this many operations per problem (1 = easiest)
    num_epochs: int = MISSING
    num_steps: int = MISSING  # -1: num_epochs passes over the train questions
    examples_per_step: int = MISSING  # questions per optimizer step, all ranks (divisible by the world size)
    num_samples: int = MISSING  # completions per question: the group whose mean reward is the baseline
    device_batch_size: int = MISSING  # sequences per generate call and per forward/backward pass
    max_new_tokens: int = MISSING
    temperature: float = MISSING  # training rollouts (pass@k evals always sample at 1.0)
    top_k: int = MISSING  # 0 = off
    embedding_lr: float = MISSING
    unembedding_lr: float = MISSING
    matrix_lr: float = MISSING
    weight_decay: float = MISSING  # reaches the Muon groups only (as nanochat)
    init_lr_frac: float = MISSING  # LRs start at this fraction and decay linearly to 0
    eval_every: int = MISSING  # pass@k every N steps, plus the start and the end; -1: start and end only
    eval_examples: int = MISSING  # held-out questions for pass@k
    pass_k: int = MISSING  # samples per held-out question: pass@1..pass@pass_k
    save_every: int = MISSING  # in-progress checkpoint (models/resume/rl) every N steps; -1: none
    dataset_dir: str = MISSING  # local copies of the remote datasets; "" = the hub / its cache


@dataclass
class ChatEvalConfig:
    sources: list[str] = MISSING  # checkpoints to evaluate (sft, rl, base); a missing one is skipped with a note
    # ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee (ChatCORE's six), Arithmetic (offline GSM8K stand-in)
    tasks: list[str] = MISSING
    max_problems: int = MISSING  # per task; -1 = all
    batch_size: int = MISSING  # categorical tasks: problems per forward pass
    num_samples: int = MISSING  # generative tasks: a problem passes if any sample does
    max_new_tokens: int = MISSING
    temperature: float = MISSING  # 0 = greedy
    top_k: int = MISSING
    dataset_dir: str = MISSING  # local copies of the remote datasets; "" = the hub / its cache


@dataclass
class ServeConfig:
    source: str = MISSING  # auto = newest of rl/sft/base | rl | sft | base
    host: str = MISSING
    port: int = MISSING
    workers: int = MISSING  # 0: one per GPU, one on CPU
    max_batch: int = MISSING  # sequences decoded together per worker
    temperature: float = MISSING
    top_k: int = MISSING
    max_tokens: int = MISSING
    api_key: str = MISSING  # bearer token; $NANOPIPE_API_KEY also works


@dataclass
class ReportConfig:
    # Cost estimate: a stage costs wall hours x max(world size, gpus_per_node) x gpu_hourly_rate on GPUs
    # (a node is billed whole), wall hours x cpu_hourly_rate on a CPU machine.
    gpu_hourly_rate: float = MISSING  # USD per GPU-hour (nanochat: H100 3.00, A100 1.79, V100 0.55)
    cpu_hourly_rate: float = MISSING  # USD per machine-hour of a CPU-only run
    gpus_per_node: int = MISSING  # -1: the GPUs torch.cuda sees where the report runs; 0: price as CPU


@dataclass
class Config:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    base_eval: BaseEvalConfig = field(default_factory=BaseEvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    chat_eval: ChatEvalConfig = field(default_factory=ChatEvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


ConfigStore.instance().store(group="schema", name="config", node=Config)


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type."""


def validate(cfg: DictConfig | dict[str, Any], source: str = "params.yaml") -> DictConfig:
    """Merge `cfg` into the schema; fail naming the key if it does not fit."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: invalid config key `{key}`: {msg}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{source}: missing config key `{missing[0]}`" + (f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else ""))
    OmegaConf.set_readonly(merged, True)
    _check_values(merged, source)
    return merged


def _check_values(cfg: DictConfig, source: str) -> None:
    """Range checks the type system cannot express."""

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: `{key}` = {OmegaConf.select(cfg, key)!r}: expected {expected}")

    need(cfg.data.source in ("embedded", "fineweb_edu", "url"), "data.source", "one of embedded, fineweb_edu, url")
    need(0 <= cfg.data.val_shard < cfg.data.total_shards, "data.val_shard", f"an index in [0, data.total_shards={cfg.data.total_shards})")
    need(cfg.data.num_train_shards >= 1, "data.num_train_shards", ">= 1")
    need(cfg.data.row_group_size >= 1, "data.row_group_size", ">= 1")
    need(cfg.data.retries >= 1, "data.retries", ">= 1")
    need(cfg.tokenizer.vocab_size >= 256 + 9, "tokenizer.vocab_size", ">= 265 (256 byte tokens + 9 specials)")
    need(cfg.model.depth >= 1, "model.depth", ">= 1")
    need(cfg.model.max_seq_len >= 8, "model.max_seq_len", ">= 8")
    need(set(cfg.model.window_pattern) <= {"S", "L"} and len(cfg.model.window_pattern) > 0, "model.window_pattern", "a non-empty string of S and L")
    need(cfg.runtime.nproc_per_node >= 1, "runtime.nproc_per_node", ">= 1")
    need(cfg.runtime.nnodes >= 1, "runtime.nnodes", ">= 1")
    need(cfg.runtime.nnodes == 1 or bool(cfg.runtime.rdzv_endpoint), "runtime.rdzv_endpoint", "host:port of node 0 when runtime.nnodes > 1")
    need(cfg.runtime.device in ("auto", "cpu", "cuda", "mps"), "runtime.device", "one of auto, cpu, cuda, mps")
