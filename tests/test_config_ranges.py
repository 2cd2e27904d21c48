"""Every range check of the config schema (nanopipe.config), each bound from both sides.

RANGES lists every checked key of config.py by hand, with values just inside and just outside its
range; a key the schema checks that the table lacks (or the reverse) fails the coverage test. Each
value goes to the key's own check (the `ok` validate() applies, fast); a sample goes through
validate() itself in tests/test_stage.py. The cross-key checks go through validate(), both sides.
"""
import math

import pytest
from helpers import REPO, make_cfg
from omegaconf import OmegaConf

from nanopipe.config import CHAT_TASKS, Config, ConfigError, _checked_fields, compose_conf, validate

NAN, INF = math.nan, math.inf
TINY = 1e-12


def at_least(n, integer=True):
    inside = [n, n + 1]
    outside = [n - 1] if integer else [n - TINY, NAN, INF, -INF]
    return inside, outside


def at_least_float(n):
    return at_least(n, integer=False)


def positive():
    return [TINY, 1.0, 1e6], [0.0, -TINY, NAN, INF]


def fraction():
    return [0.0, 0.5, 1.0], [-TINY, 1 + 1e-9, NAN, INF]


def beta():
    return [0.0, 0.999999], [1.0, -TINY, NAN, 1.5]


def every_or_off():
    return [-1, 1, 7], [0, -2]


def one_of(*choices):
    return list(choices), ["", "x", choices[0].upper() + "!"]


def minus_one_or_at_least(n):  # "-1 (auto / the base's / all) or >= n"
    return [-1, n, n + 1], [-2] + ([n - 1] if n - 1 != -1 else []) + ([0] if 0 < n - 1 else [])


def nonfinite_tolerance():
    return [0, 1, 5], [-1]


RANGES = {
    # runtime
    "runtime.device": one_of("auto", "cpu", "cuda", "mps"),
    "runtime.dtype": one_of("auto", "float32", "bfloat16", "fp32", "bf16", "float16", "fp16"),
    "runtime.threads": at_least(0),
    "runtime.nproc_per_node": at_least(1),
    "runtime.nnodes": at_least(1),
    "runtime.launcher": one_of("auto", "slurm", "torchrun"),
    "runtime.rdzv_backend": one_of("static", "c10d"),
    "runtime.progress_interval": at_least_float(0),
    # data
    "data.source": one_of("embedded", "fineweb_edu", "url"),
    "data.num_train_shards": at_least(1),
    "data.val_shard": at_least(0),
    "data.total_shards": at_least(2),
    "data.row_group_size": at_least(1),
    "data.workers": at_least(1),
    "data.retries": at_least(1),
    "data.backoff": at_least_float(0),
    "data.timeout": positive(),
    "data.embedded.max_chars": at_least(1),
    "data.embedded.doc_chars": at_least(1),
    # tokenizer
    "tokenizer.vocab_size": ([265, 266, 65536], [264, 0, -1]),
    "tokenizer.max_chars": at_least(1),
    "tokenizer.doc_cap": at_least(1),
    "tokenizer.trainer": one_of("auto", "tokenizers", "rustbpe"),
    "tokenizer.eval_chars": at_least(1),
    # model
    "model.depth": at_least(1),
    "model.aspect_ratio": at_least(1),
    "model.head_dim": at_least(1),
    "model.max_seq_len": at_least(8),
    "model.window_pattern": (["S", "L", "SSSL", "LLLL"], ["", "X", "SLX", "s", "S L"]),
    # pretrain
    "pretrain.device_batch_size": at_least(1),
    "pretrain.total_batch_size": minus_one_or_at_least(1),
    "pretrain.target_flops": ([-1.0, 0.0, 1e18], [NAN, INF, -INF]),
    "pretrain.target_param_data_ratio": ([-1.0, TINY, 8.25], [0.0, -0.5, -2.0, NAN, INF]),  # -1: no ratio horizon
    "pretrain.embedding_lr": positive(),
    "pretrain.unembedding_lr": positive(),
    "pretrain.matrix_lr": positive(),
    "pretrain.scalar_lr": positive(),
    "pretrain.weight_decay": at_least_float(0),
    "pretrain.adam_beta1": beta(),
    "pretrain.adam_beta2": beta(),
    "pretrain.warmup_ratio": fraction(),
    "pretrain.warmdown_ratio": fraction(),
    "pretrain.final_lr_frac": fraction(),
    "pretrain.eval_tokens": at_least(1),
    "pretrain.keep_checkpoints": ([-1, 0, 1, 5], [-2]),
    "pretrain.log_every": at_least(1),
    "pretrain.max_nonfinite_steps": nonfinite_tolerance(),
    "pretrain.compile": one_of("auto", "true", "false"),
    "pretrain.fp8_recipe": one_of("tensorwise", "rowwise"),
    "pretrain.loader_threads": at_least(1),
    # base_eval
    "base_eval.eval_tokens": at_least(1),
    "base_eval.device_batch_size": at_least(1),
    "base_eval.sample_tokens": at_least(0),
    "base_eval.step": ([-1, 0, 100], [-2]),
    # sft
    "sft.mixture": one_of("full", "embedded"),
    "sft.identity_epochs": at_least(0),
    "sft.gsm8k_epochs": at_least(0),
    "sft.simple_spelling_examples": at_least(0),
    "sft.spelling_bee_examples": at_least(0),
    "sft.arithmetic_examples": at_least(0),
    "sft.val_examples": at_least(1),
    "sft.max_seq_len": minus_one_or_at_least(8),
    "sft.device_batch_size": at_least(1),
    "sft.total_batch_size": minus_one_or_at_least(1),
    "sft.num_iterations": every_or_off(),
    "sft.embedding_lr": positive(),
    "sft.unembedding_lr": positive(),
    "sft.matrix_lr": positive(),
    "sft.scalar_lr": positive(),
    "sft.weight_decay": at_least_float(0),
    "sft.init_lr_frac": ([TINY, 0.5, 1.0], [0.0, -TINY, 1 + 1e-9, NAN, INF]),
    "sft.warmup_ratio": fraction(),
    "sft.warmdown_ratio": fraction(),
    "sft.final_lr_frac": fraction(),
    "sft.eval_tokens": at_least(1),
    "sft.keep_checkpoints": ([-1, 0, 1], [-2]),
    "sft.log_every": at_least(1),
    "sft.max_nonfinite_steps": nonfinite_tolerance(),
    "sft.compile": one_of("auto", "true", "false"),
    "sft.sample_tokens": at_least(0),
    # rl
    "rl.source": one_of("sft", "base"),
    "rl.task": one_of("gsm8k", "arithmetic"),
    "rl.train_examples": every_or_off(),
    "rl.arithmetic_max_steps": at_least(1),
    "rl.num_epochs": at_least(1),
    "rl.num_steps": every_or_off(),
    "rl.examples_per_step": at_least(1),
    "rl.num_samples": ([2, 3, 16], [1, 0, -1]),
    "rl.device_batch_size": at_least(1),
    "rl.max_new_tokens": at_least(1),
    "rl.temperature": ([TINY, 1.0, 2.0], [0.0, -TINY, NAN, INF]),
    "rl.top_k": at_least(0),
    "rl.embedding_lr": positive(),
    "rl.unembedding_lr": positive(),
    "rl.matrix_lr": positive(),
    "rl.weight_decay": at_least_float(0),
    "rl.init_lr_frac": ([TINY, 0.05, 1.0], [0.0, -TINY, 1 + 1e-9, NAN, INF]),
    "rl.eval_examples": at_least(1),
    "rl.pass_k": at_least(1),
    "rl.keep_checkpoints": ([-1, 0, 3], [-2]),
    "rl.max_nonfinite_steps": nonfinite_tolerance(),
    # chat_eval
    "chat_eval.sources": ([[], ["base"], ["base", "sft", "rl"]], [["chat"], ["base", "mid"]]),
    "chat_eval.tasks": ([[], ["GSM8K"], list(CHAT_TASKS)], [["BoolQ"], ["GSM8K", "gsm8k"]]),
    "chat_eval.max_problems": every_or_off(),
    "chat_eval.batch_size": at_least(1),
    "chat_eval.num_samples": at_least(1),
    "chat_eval.max_new_tokens": at_least(1),
    "chat_eval.temperature": at_least_float(0),
    "chat_eval.top_k": at_least(0),
    "chat_eval.step": ([-1, 0, 7], [-2]),
    "chat_eval.sandbox": one_of("auto", "bwrap", "in_process"),
    # serve
    "serve.source": one_of("auto", "rl", "sft", "base"),
    "serve.port": ([0, 8000, 65535], [-1, 65536]),
    "serve.workers": at_least(0),
    "serve.max_batch": at_least(1),
    "serve.temperature": at_least_float(0),
    "serve.top_k": at_least(0),
    "serve.max_tokens": at_least(1),
    "serve.step": ([-1, 0, 9], [-2]),
    "serve.cors_origins": ([[], ["*"], ["http://localhost:5173", "https://a.b"]], [["localhost:5173"], ["*", "a.b"]]),
    "serve.model_aliases": ([[], ["gpt-4o"], ["a", "b"]], [[""], ["ok", "  "]]),
    "serve.shutdown_timeout": positive(),
    "serve.max_queue": at_least(1),
    "serve.request_timeout": positive(),
    # export
    "export.source": one_of("base", "sft", "rl"),
    "export.step": ([-1, 0, 3], [-2]),
    # lm_eval
    "lm_eval.tasks": ([["hellaswag"], ["a", "b"]], [[]]),
    "lm_eval.limit": every_or_off(),
    "lm_eval.num_fewshot": ([-1, 0, 5], [-2]),
    "lm_eval.batch_size": at_least(1),
    "lm_eval.dtype": one_of("float32", "bfloat16", "float16"),
    # report
    "report.gpu_hourly_rate": at_least_float(0),
    "report.cpu_hourly_rate": at_least_float(0),
    "report.gpus_per_node": at_least(-1),
}


@pytest.fixture(scope="module")
def checks():
    """key -> the check validate() applies to it (the schema's fields, walked as validate walks them)."""
    composed = OmegaConf.merge(OmegaConf.structured(Config), compose_conf([], conf_dir=REPO / "conf"))  # not validated
    return {key: f.metadata["ok"] for key, _, f in _checked_fields(Config, composed)}


def test_the_table_lists_every_range_check(checks):
    assert sorted(checks) == sorted(RANGES), (f"checked but not in RANGES: {sorted(set(checks) - set(RANGES))}; "
                                              f"in RANGES but not checked: {sorted(set(RANGES) - set(checks))}")


CASES = [(key, value, True) for key, (inside, _) in RANGES.items() for value in inside] + \
        [(key, value, False) for key, (_, outside) in RANGES.items() for value in outside]


@pytest.mark.parametrize("key, value, accepted", CASES, ids=[f"{k}={v!r}" for k, v, _ in CASES])
def test_each_bound_from_both_sides(checks, key, value, accepted):
    assert bool(checks[key](value)) is accepted


@pytest.fixture(scope="module")
def default():
    return OmegaConf.to_container(make_cfg())


def _with(default, **changes):
    cfg = OmegaConf.create(default)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.mark.parametrize("key, ok, bad, offender", [
    # data.val_shard < data.total_shards
    ("val_shard", {"data.total_shards": 5, "data.val_shard": 4, "data.num_train_shards": 1},
     {"data.total_shards": 5, "data.val_shard": 5, "data.num_train_shards": 1}, "data.val_shard"),
    # data.num_train_shards <= data.total_shards - 1
    ("num_train_shards", {"data.total_shards": 5, "data.num_train_shards": 4, "data.val_shard": 4},
     {"data.total_shards": 5, "data.num_train_shards": 5, "data.val_shard": 4}, "data.num_train_shards"),
    # data.url_template has {index} (and nothing else) unless the source is embedded
    ("url_template", {"data.source": "url", "data.url_template": "https://h/shard_{index:05d}.parquet"},
     {"data.source": "url", "data.url_template": "https://h/shard_{{index}}.parquet"}, "data.url_template"),
    ("url_template_other_field", {"data.source": "embedded", "data.url_template": "https://h/{index}/{split}"},
     {"data.source": "fineweb_edu", "data.url_template": "https://h/{index}/{split}"}, "data.url_template"),
    # export.source=rl needs rl.enabled
    ("export_source", {"rl.enabled": True, "export.source": "rl"},
     {"rl.enabled": False, "export.source": "rl"}, "export.source"),
    # torchrun across nodes needs a rendezvous endpoint
    ("rdzv_endpoint", {"runtime.nnodes": 2, "runtime.launcher": "torchrun", "runtime.rdzv_endpoint": "h:29500"},
     {"runtime.nnodes": 2, "runtime.launcher": "torchrun", "runtime.rdzv_endpoint": ""}, "runtime.rdzv_endpoint"),
    ("rdzv_endpoint_one_node", {"runtime.nnodes": 1, "runtime.launcher": "torchrun", "runtime.rdzv_endpoint": ""},
     {"runtime.nnodes": 2, "runtime.launcher": "torchrun", "runtime.rdzv_endpoint": ""}, "runtime.rdzv_endpoint"),
])
def test_cross_checks_from_both_sides(default, key, ok, bad, offender):
    validate(_with(default, **ok), source="t")
    with pytest.raises(ConfigError, match=rf"t: `{offender}` = .*: expected "):
        validate(_with(default, **bad), source="t")
