"""The config schema: every key's type and allowed range, checked before a stage does any work.

Values and what each key means live in `conf/` (one YAML file per group, a comment per key);
`params.yaml` is their composition, which DVC tracks and every stage reads. This module is the
other half: the type of each key (dataclass fields; OmegaConf rejects unknown keys and wrong types
with the key's dotted name) and its range (`need(...)` next to the field). There is no default
here: a key missing from params.yaml is an error, never a silent value from code.

Every problem is a `ConfigError` naming the file, the key, the value and what was expected;
`nanopipe <stage>` turns it into one clean line. Stages raise it too for checks that need more
than the config (the world size, the model's sequence length).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


class OverrideError(ConfigError):
    """A command-line override names no config key or preset, or is not valid override syntax: a usage
    error (`nanopipe` exits 2, as argparse does), told in one line with the closest valid spelling."""


def bad_value(key: str, value: Any, expected: str, source: str = "params.yaml") -> ConfigError:
    return ConfigError(f"{source}: `{key}` = {value!r}: expected {expected}")


def need(expected: str, ok: Callable[[Any], bool]):
    """A schema field with a range check: `lr: float = need("> 0", lambda v: v > 0)`."""
    return field(default=MISSING, metadata={"expected": expected, "ok": ok})


def one_of(*choices: str):
    return need("one of " + ", ".join(choices), lambda v: v in choices)


def at_least(n: float):
    return need(f">= {n}", lambda v: v >= n and math.isfinite(v))  # False for nan and inf


def positive():
    return need("> 0 and finite", lambda v: v > 0 and math.isfinite(v))


def fraction():
    return need("in [0, 1]", lambda v: 0 <= v <= 1)  # False for nan and inf


def beta():
    return need("in [0, 1) (an EMA decay)", lambda v: 0 <= v < 1)


def finite():
    return need("a finite number (<= 0: off)", lambda v: math.isfinite(v))


def nonfinite_tolerance():
    return need(">= 0 (0: a non-finite loss stops the stage; N: up to N such steps are skipped)", lambda v: v >= 0)


def every_or_off():
    return need("-1 (off) or >= 1", lambda v: v == -1 or v >= 1)


CHAT_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "Arithmetic")


@dataclass
class RuntimeConfig:
    device: str = one_of("auto", "cpu", "cuda", "mps")
    dtype: str = one_of("auto", "float32", "bfloat16", "fp32", "bf16", "float16", "fp16")
    seed: int = MISSING
    threads: int = at_least(0)
    nproc_per_node: int = at_least(1)
    nnodes: int = at_least(1)
    launcher: str = one_of("auto", "slurm", "torchrun")
    rdzv_backend: str = one_of("static", "c10d")
    rdzv_endpoint: str = MISSING
    srun_args: str = MISSING
    progress_interval: float = at_least(0)


@dataclass
class TrackingConfig:
    enabled: bool = MISSING
    uri: Optional[str] = MISSING
    experiment: str = MISSING
    log_artifacts: bool = MISSING


@dataclass
class EmbeddedSourceConfig:
    max_chars: int = at_least(1)
    doc_chars: int = at_least(1)
    include_tests: bool = MISSING


@dataclass
class DataConfig:
    source: str = one_of("embedded", "fineweb_edu", "url")
    url_template: str = MISSING
    num_train_shards: int = at_least(1)
    val_shard: int = at_least(0)
    total_shards: int = at_least(2)
    row_group_size: int = at_least(1)
    seed: int = MISSING
    workers: int = at_least(1)
    retries: int = at_least(1)
    backoff: float = at_least(0)
    timeout: float = positive()
    embedded: EmbeddedSourceConfig = field(default_factory=EmbeddedSourceConfig)


@dataclass
class TokenizerConfig:
    vocab_size: int = need(">= 265 (256 byte tokens + 9 specials)", lambda v: v >= 265)
    max_chars: int = at_least(1)
    doc_cap: int = at_least(1)
    trainer: str = one_of("auto", "tokenizers", "rustbpe")
    eval_chars: int = at_least(1)


@dataclass
class ModelConfig:
    depth: int = at_least(1)
    aspect_ratio: int = at_least(1)
    head_dim: int = at_least(1)
    max_seq_len: int = at_least(8)
    window_pattern: str = need("a non-empty string of S and L", lambda v: len(v) > 0 and set(v) <= {"S", "L"})
    allow_sdpa_window: bool = MISSING


@dataclass
class PretrainConfig:
    device_batch_size: int = at_least(1)
    total_batch_size: int = need("-1 (auto) or >= 1", lambda v: v == -1 or v >= 1)
    num_iterations: int = MISSING
    target_flops: float = finite()
    # -1 disables the data-ratio horizon, as in nanochat (base_train.py @1ec0a34); the transfer from d12
    # then uses D / D_ref = (scaling params) / (d12's), where the ratio cancels. 0 would divide by zero.
    target_param_data_ratio: float = need("-1 (no data-ratio horizon) or > 0 and finite",
                                          lambda v: v == -1 or (v > 0 and math.isfinite(v)))
    embedding_lr: float = positive()
    unembedding_lr: float = positive()
    matrix_lr: float = positive()
    scalar_lr: float = positive()
    batch_lr_scaling: bool = MISSING
    weight_decay: float = at_least(0)
    adam_beta1: float = beta()
    adam_beta2: float = beta()
    warmup_ratio: float = fraction()
    warmdown_ratio: float = fraction()
    final_lr_frac: float = fraction()
    eval_every: int = MISSING
    eval_tokens: int = at_least(1)
    sample_every: int = MISSING
    core_metric_every: int = MISSING
    core_metric_max_per_task: int = MISSING
    save_every: int = MISSING
    keep_checkpoints: int = need("-1 (all), 0 (none) or the newest N >= 1", lambda v: v >= -1)
    log_every: int = at_least(1)
    max_nonfinite_steps: int = nonfinite_tolerance()
    compile: str = one_of("auto", "true", "false")
    fp8: bool = MISSING
    fp8_recipe: str = one_of("tensorwise", "rowwise")
    loader_threads: int = at_least(1)


@dataclass
class BaseEvalConfig:
    eval_tokens: int = at_least(1)
    device_batch_size: int = at_least(1)
    core: bool = MISSING
    max_per_task: int = MISSING
    bundle_url: str = MISSING
    bundle_cache: str = MISSING
    sample_tokens: int = at_least(0)
    step: int = need("-1 (the final checkpoint) or a step the training run kept (>= 0)", lambda v: v >= -1)


@dataclass
class SFTConfig:
    mixture: str = one_of("full", "embedded")
    identity_path: str = MISSING
    identity_epochs: int = at_least(0)
    gsm8k_epochs: int = at_least(0)
    simple_spelling_examples: int = at_least(0)
    spelling_bee_examples: int = at_least(0)
    arithmetic_examples: int = at_least(0)
    val_examples: int = at_least(1)
    dataset_dir: str = MISSING
    max_seq_len: int = need("-1 (the base model's) or >= 8", lambda v: v == -1 or v >= 8)
    device_batch_size: int = at_least(1)
    total_batch_size: int = need("-1 (the base checkpoint's) or >= 1", lambda v: v == -1 or v >= 1)
    num_iterations: int = every_or_off()
    embedding_lr: float = positive()
    unembedding_lr: float = positive()
    matrix_lr: float = positive()
    scalar_lr: float = positive()
    weight_decay: float = at_least(0)
    init_lr_frac: float = need("in (0, 1]", lambda v: 0 < v <= 1)
    warmup_ratio: float = fraction()
    warmdown_ratio: float = fraction()
    final_lr_frac: float = fraction()
    eval_every: int = MISSING
    eval_tokens: int = at_least(1)
    save_every: int = MISSING
    keep_checkpoints: int = need("-1 (all), 0 (none) or the newest N >= 1", lambda v: v >= -1)
    log_every: int = at_least(1)
    max_nonfinite_steps: int = nonfinite_tolerance()
    compile: str = one_of("auto", "true", "false")
    sample_tokens: int = at_least(0)


@dataclass
class RLConfig:
    enabled: bool = MISSING
    source: str = one_of("sft", "base")
    task: str = one_of("gsm8k", "arithmetic")
    train_examples: int = every_or_off()
    arithmetic_max_steps: int = at_least(1)
    num_epochs: int = at_least(1)
    num_steps: int = every_or_off()
    examples_per_step: int = at_least(1)
    num_samples: int = need(">= 2 (the group-mean baseline needs a group)", lambda v: v >= 2)
    device_batch_size: int = at_least(1)
    max_new_tokens: int = at_least(1)
    temperature: float = need("> 0 (on-policy sampling)", lambda v: v > 0 and math.isfinite(v))
    top_k: int = at_least(0)
    embedding_lr: float = positive()
    unembedding_lr: float = positive()
    matrix_lr: float = positive()
    weight_decay: float = at_least(0)
    init_lr_frac: float = need("in (0, 1]", lambda v: 0 < v <= 1)
    eval_every: int = MISSING
    eval_examples: int = at_least(1)
    pass_k: int = at_least(1)
    save_every: int = MISSING
    keep_checkpoints: int = need("-1 (all), 0 (none) or the newest N >= 1", lambda v: v >= -1)
    max_nonfinite_steps: int = nonfinite_tolerance()
    dataset_dir: str = MISSING


@dataclass
class ChatEvalConfig:
    sources: list[str] = need("some of base, sft, rl", lambda v: set(v) <= {"base", "sft", "rl"})
    tasks: list[str] = need("some of " + ", ".join(CHAT_TASKS), lambda v: set(v) <= set(CHAT_TASKS))
    max_problems: int = every_or_off()
    batch_size: int = at_least(1)
    num_samples: int = at_least(1)
    max_new_tokens: int = at_least(1)
    temperature: float = at_least(0)
    top_k: int = at_least(0)
    dataset_dir: str = MISSING
    step: int = need("-1 (the final checkpoint) or a step the training run kept (>= 0)", lambda v: v >= -1)
    sandbox: str = one_of("auto", "bwrap", "in_process")


@dataclass
class ServeConfig:
    source: str = one_of("auto", "rl", "sft", "base")
    host: str = MISSING
    port: int = need("a TCP port in [0, 65535]", lambda v: 0 <= v <= 65535)
    workers: int = at_least(0)
    max_batch: int = at_least(1)
    temperature: float = at_least(0)
    top_k: int = at_least(0)
    max_tokens: int = at_least(1)
    api_key: str = MISSING
    step: int = need("-1 (the final checkpoint) or a step the training run kept (>= 0)", lambda v: v >= -1)
    cors_origins: list[str] = need("a list of origins (scheme://host[:port]) or ['*']",
                                   lambda v: all(o == "*" or "://" in o for o in v))
    model_aliases: list[str] = need("a list of non-empty model names", lambda v: all(a.strip() for a in v))
    shutdown_timeout: float = positive()
    max_queue: int = at_least(1)
    request_timeout: float = positive()


@dataclass
class ExportConfig:
    source: str = one_of("base", "sft", "rl")
    step: int = need("-1 (the final checkpoint) or a step the training run kept (>= 0)", lambda v: v >= -1)
    name: str = MISSING
    verify: bool = MISSING
    log_weights: bool = MISSING


@dataclass
class LmEvalConfig:
    tasks: list[str] = need("a non-empty list of lm-eval task names", lambda v: len(v) > 0)
    include_path: str = MISSING
    limit: int = every_or_off()
    num_fewshot: int = need("-1 (each task's default) or >= 0", lambda v: v >= -1)
    batch_size: int = at_least(1)
    dtype: str = one_of("float32", "bfloat16", "float16")
    apply_chat_template: bool = MISSING


@dataclass
class ReportConfig:
    gpu_hourly_rate: float = at_least(0)
    cpu_hourly_rate: float = at_least(0)
    gpus_per_node: int = at_least(-1)


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
    export: ExportConfig = field(default_factory=ExportConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def _url_per_index(template: str) -> bool:
    """True when `template` renders a different URL for each shard index: an `{index}` field (not the
    literal `{{index}}`) and no other field (the same rule as nanopipe.data.sources.template_problem)."""
    try:
        return template.format(index=0) != template.format(index=1)
    except (KeyError, IndexError, ValueError, AttributeError):
        return False


def _cross_checks(cfg: DictConfig) -> Iterable[tuple[bool, str, str]]:
    """Checks that relate two keys: (ok, key, expected)."""
    yield (cfg.data.val_shard < cfg.data.total_shards, "data.val_shard",
           f"an index in [0, data.total_shards={cfg.data.total_shards})")
    yield (cfg.data.num_train_shards <= cfg.data.total_shards - 1, "data.num_train_shards",
           f"at most data.total_shards - 1 = {cfg.data.total_shards - 1} (one shard is the val shard)")
    yield (cfg.data.source == "embedded" or _url_per_index(cfg.data.url_template), "data.url_template",
           f"an fsspec URL with an {{index}} field and no other (e.g. https://host/shard_{{index:05d}}.parquet) "
           f"for data.source={cfg.data.source}")
    yield (cfg.rl.enabled or cfg.export.source != "rl", "export.source",
           "sft or base when rl.enabled is false (no RL checkpoint is made)")
    yield (cfg.runtime.nnodes == 1 or cfg.runtime.launcher != "torchrun" or bool(cfg.runtime.rdzv_endpoint),
           "runtime.rdzv_endpoint", "host:port of node 0 when runtime.nnodes > 1 with runtime.launcher=torchrun")


# -----------------------------------------------------------------------------
# Validation, loading, composing


def validate(cfg: DictConfig | dict[str, Any], source: str = "params.yaml") -> DictConfig:
    """Merge `cfg` into the schema and check every range; fail naming the key if it does not fit."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{source}: invalid config key `{key}`: {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else ""
        raise ConfigError(f"{source}: missing config key `{missing[0]}`{more}")
    OmegaConf.set_readonly(merged, True)
    for key, value, f in _checked_fields(Config, merged):
        if not f.metadata["ok"](value):
            raise bad_value(key, value, f.metadata["expected"], source)
    for ok, key, expected in _cross_checks(merged):
        if not ok:
            raise bad_value(key, OmegaConf.select(merged, key), expected, source)
    return merged


def _checked_fields(schema, node, prefix: str = ""):
    for f in fields(schema):
        value = node[f.name]
        if f.default_factory is not dataclasses.MISSING and is_dataclass(f.default_factory):  # a nested group
            yield from _checked_fields(f.default_factory, value, f"{prefix}{f.name}.")
        elif "ok" in f.metadata:
            yield f"{prefix}{f.name}", value, f


def select(cfg: DictConfig, keys: Iterable[str]) -> DictConfig:
    """A read-only config holding only `keys` (whole sections like `model`, or single keys like
    `runtime.seed`): what a stage declares as its DVC params is all it can read."""
    out, absent = OmegaConf.create({}), object()
    for key in keys:
        value = OmegaConf.select(cfg, key, default=absent, throw_on_missing=True)
        if value is absent:
            raise ConfigError(f"the stage declares the param `{key}`, which the config does not have")
        OmegaConf.update(out, key, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, force_add=True)
    OmegaConf.set_struct(out, True)
    OmegaConf.set_readonly(out, True)
    return out


def schema_keys(schema=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections (`model`) and leaves (`model.depth`) alike."""
    out = []
    for f in fields(schema):
        out.append(prefix + f.name)
        if f.default_factory is not dataclasses.MISSING and is_dataclass(f.default_factory):
            out += schema_keys(f.default_factory, f"{prefix}{f.name}.")
    return out


def presets(conf_dir: str | os.PathLike) -> dict[str, list[str]]:
    """{group: [option, ...]} of a conf/ directory (experiment: cpu, d12, ...)."""
    conf = Path(conf_dir)
    if not conf.is_dir():
        return {}
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(conf.iterdir()) if d.is_dir()}


def check_overrides(overrides: list[str], groups: dict[str, list[str]], composing: bool) -> None:
    """Raise OverrideError for the first override Hydra would reject with a traceback or a vague line:
    bad syntax, a key the schema does not have (naming the closest one), a preset that does not exist
    (listing those that do). `composing`: the overrides compose conf/ (`nanopipe compose`), where
    presets can be picked; otherwise they apply to params.yaml, which has none (a stage)."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    keys = schema_keys()
    parser = OverridesParser.create()
    for line in overrides:
        try:
            (override,) = parser.parse_overrides([line])
        except OverrideParseException as e:
            raise OverrideError(f"cannot parse the override {line!r}: {str(e).splitlines()[0]} "
                                "(Hydra's syntax: key=value, e.g. model.depth=4)") from None
        key = override.key_or_group
        if key in groups and "." not in key and isinstance(override.value(), str):  # model={depth: 3} sets keys
            options, value = groups[key], override.value()
            if value not in options:
                raise OverrideError(f"no preset {key}={value}; available: {', '.join(options)}")
            if not composing:
                raise OverrideError(f"{line} picks a preset, which stages cannot: they read params.yaml. "
                                    f"Run `nanopipe compose {line}` (rewrites params.yaml) first")
            continue
        if key in keys or key.split(".")[0] == "hydra":
            continue
        section = key.rsplit(".", 1)[0] if "." in key else ""
        near = difflib.get_close_matches(key, [k for k in keys if k.startswith(section)] or keys, n=1, cutoff=0.6)
        near = near or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else f" (sections: {', '.join(f.name for f in fields(Config))})"
        raise OverrideError(f"unknown config key {key}{hint}")


def load_config(overrides: list[str], params: str | os.PathLike = "params.yaml") -> DictConfig:
    """params.yaml + Hydra overrides, validated."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    params = Path(params).resolve()
    if not params.exists():
        raise ConfigError(f"{params} not found. Run from the repo root, or create it with `nanopipe compose`.")
    check_overrides(overrides, presets(params.parent / "conf"), composing=False)
    regenerate = "regenerate it with `nanopipe compose` (from conf/) or restore it with `git checkout params.yaml`"
    try:
        params.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{params}: not a text file (byte {e.start} is not UTF-8); {regenerate}") from None
    except OSError as e:
        raise ConfigError(f"{params}: cannot be read ({e.strerror or e})") from None
    try:
        with initialize_config_dir(config_dir=str(params.parent), version_base=None):
            cfg = compose(config_name=params.stem, overrides=overrides)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{params}: not valid YAML{at} ({problem}); {regenerate}") from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{params.name} + overrides {overrides}: {str(e).splitlines()[0]}") from None
    return validate(cfg, source=params.name + (f" + overrides {overrides}" if overrides else ""))


def compose_conf(overrides: list[str], conf_dir: str | os.PathLike = "conf") -> DictConfig:
    """Compose conf/config.yaml with overrides and resolve it, as DVC's Hydra integration does."""
    from hydra import compose, initialize_config_dir

    check_overrides(overrides, presets(conf_dir), composing=True)
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg
