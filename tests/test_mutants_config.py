"""nanopipe.config pinned down: each range helper's expected text and bounds, and the exact ConfigError
of every validate()/select()/load_config() refusal, naming the source, key, value and what was expected
(the documented promise of config.py; the cases mutation testing found unpinned, docs/testing.md)."""
import copy
import math
from pathlib import Path

import pytest
from helpers import REPO
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ReadonlyConfigError

from nanopipe import config as C
from nanopipe.config import ConfigError

NAN, INF = math.nan, math.inf
REGENERATE = "regenerate it with `nanopipe compose` (from conf/) or restore it with `git checkout params.yaml`"


@pytest.fixture(scope="module")
def base():
    """conf/ composed, as a plain dict (data.total_shards 4, source embedded, rl enabled, one node)."""
    cfg = OmegaConf.to_container(C.compose_conf([], conf_dir=REPO / "conf"))
    assert cfg["data"]["total_shards"] == 4 and cfg["data"]["source"] == "embedded"
    assert cfg["rl"]["enabled"] is True and cfg["runtime"]["nnodes"] == 1
    return cfg


def with_(base, **changes):
    cfg = copy.deepcopy(base)
    for key, value in changes.items():
        *path, last = key.split("__")
        node = cfg
        for p in path:
            node = node[p]
        node[last] = value
    return cfg


def error(fn, *args, **kw):
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    return str(e.value)


def check(helper_field):
    return helper_field.metadata["expected"], helper_field.metadata["ok"]


def test_bad_value_and_need():
    assert str(C.bad_value("a.b", 3, "> 0")) == "params.yaml: `a.b` = 3: expected > 0"
    assert str(C.bad_value("k", "x", "e", source="s.yaml")) == "s.yaml: `k` = 'x': expected e"
    assert isinstance(C.bad_value("k", 1, "e"), ConfigError)
    ok = lambda v: True  # noqa: E731
    f = C.need("anything", ok)
    assert f.default == MISSING and f.metadata["expected"] == "anything" and f.metadata["ok"] is ok


# the helpers are called inside the test (not in the parametrize list, which runs at collection) so that
# mutation testing sees their mutants
@pytest.mark.parametrize("helper,args,expected,inside,outside", [
    ("one_of", ("a", "bc"), "one of a, bc", ["a", "bc"], ["", "b", "A"]),
    ("at_least", (2,), ">= 2", [2, 3, 1e300], [1, 1.999, INF, NAN, -INF]),
    ("at_least", (0,), ">= 0", [0, 0.0], [-1e-12, INF, NAN]),
    ("positive", (), "> 0 and finite", [1e-300, 1, 7.5], [0, 0.0, -1e-12, INF, NAN]),
    ("fraction", (), "in [0, 1]", [0, 0.5, 1], [-1e-12, 1 + 1e-9, NAN, INF]),
    ("beta", (), "in [0, 1) (an EMA decay)", [0, 0.9999], [1, -1e-12, NAN, 1.5]),
    ("finite", (), "a finite number (<= 0: off)", [-5.0, 0, 1e18], [NAN, INF, -INF]),
    ("nonfinite_tolerance", (), ">= 0 (0: a non-finite loss stops the stage; N: up to N such steps are skipped)",
     [0, 1, 5], [-1, -0.5]),
    ("every_or_off", (), "-1 (off) or >= 1", [-1, 1, 2], [0, -2, 0.5]),
])
def test_range_helpers(helper, args, expected, inside, outside):
    f = getattr(C, helper)(*args)
    assert f.default == MISSING
    exp, ok = check(f)
    assert exp == expected
    assert [bool(ok(v)) for v in inside] == [True] * len(inside)
    assert [bool(ok(v)) for v in outside] == [False] * len(outside)


@pytest.mark.parametrize("template,per_index", [
    ("https://h/shard_{index:05d}.parquet", True),
    ("{index}", True),
    ("https://h/shard_{{index}}.parquet", False),   # a literal
    ("https://h/fixed.parquet", False),             # no field
    ("https://h/{index}/{split}", False),           # KeyError
    ("https://h/{0}/{index}", False),               # IndexError
    ("https://h/{index", False),                    # ValueError
    ("https://h/{index.real}", True),
    ("https://h/{index.nope}", False),              # AttributeError
])
def test_url_per_index(template, per_index):
    assert C._url_per_index(template) is per_index


def test_validate_returns_a_read_only_config(base):
    cfg = C.validate(base)
    assert OmegaConf.to_container(cfg) == base
    with pytest.raises(ReadonlyConfigError):
        cfg.model.depth = 3


@pytest.mark.parametrize("changes,msg", [
    ({"model__dpeth": 3}, "t: invalid config key `model.dpeth`: Key 'dpeth' not in 'ModelConfig'"),
    ({"model__depth": "deep"},
     "t: invalid config key `model.depth`: Value 'deep' of type 'str' could not be converted to Integer"),
    ({"model": 5}, "t: invalid config key `?`: Merge error: int is not a subclass of ModelConfig. value: 5"),
    ({"data__timeout": 0.0}, "t: `data.timeout` = 0.0: expected > 0 and finite"),
    ({"data__embedded__max_chars": 0}, "t: `data.embedded.max_chars` = 0: expected >= 1"),
    ({"serve__port": 65536}, "t: `serve.port` = 65536: expected a TCP port in [0, 65535]"),
    # the cross-key checks, each just outside
    ({"data__val_shard": 4}, "t: `data.val_shard` = 4: expected an index in [0, data.total_shards=4)"),
    ({"data__num_train_shards": 4},
     "t: `data.num_train_shards` = 4: expected at most data.total_shards - 1 = 3 (one shard is the val shard)"),
    ({"data__source": "url", "data__url_template": "https://h/x.parquet"},
     "t: `data.url_template` = 'https://h/x.parquet': expected an fsspec URL with an {index} field and no other "
     "(e.g. https://host/shard_{index:05d}.parquet) for data.source=url"),
    ({"data__source": "fineweb_edu", "data__url_template": ""},
     "t: `data.url_template` = '': expected an fsspec URL with an {index} field and no other "
     "(e.g. https://host/shard_{index:05d}.parquet) for data.source=fineweb_edu"),
    ({"rl__enabled": False, "export__source": "rl"},
     "t: `export.source` = 'rl': expected sft or base when rl.enabled is false (no RL checkpoint is made)"),
    ({"runtime__nnodes": 2, "runtime__launcher": "torchrun", "runtime__rdzv_endpoint": ""},
     "t: `runtime.rdzv_endpoint` = '': expected host:port of node 0 when runtime.nnodes > 1 with runtime.launcher=torchrun"),
])
def test_validate_errors(base, changes, msg):
    assert error(C.validate, with_(base, **changes), source="t") == msg


@pytest.mark.parametrize("changes", [
    {"data__val_shard": 3, "data__num_train_shards": 3},          # both bounds just inside
    {"data__source": "url", "data__url_template": "https://h/{index}"},
    {"data__source": "embedded", "data__url_template": "https://h/{index}/{split}"},
    {"rl__enabled": False, "export__source": "sft"},
    {"rl__enabled": True, "export__source": "rl"},
    {"runtime__nnodes": 2, "runtime__launcher": "torchrun", "runtime__rdzv_endpoint": "h:29500"},
    {"runtime__nnodes": 2, "runtime__launcher": "slurm", "runtime__rdzv_endpoint": ""},
    {"runtime__nnodes": 1, "runtime__launcher": "torchrun", "runtime__rdzv_endpoint": ""},
])
def test_validate_accepts_just_inside(base, changes):
    C.validate(with_(base, **changes))


def test_validate_default_source_and_missing_keys(base):
    assert error(C.validate, with_(base, data__timeout=-1.0)) == "params.yaml: `data.timeout` = -1.0: expected > 0 and finite"
    one = copy.deepcopy(base)
    del one["pretrain"]["matrix_lr"]
    assert error(C.validate, one) == "params.yaml: missing config key `pretrain.matrix_lr`"
    two = copy.deepcopy(one)
    del two["model"]["depth"]
    assert error(C.validate, two, source="s") == "s: missing config key `model.depth` (and 1 more: ['pretrain.matrix_lr'])"
    many = copy.deepcopy(base)
    for k in ("seed", "threads", "device", "dtype", "launcher", "nnodes", "nproc_per_node"):
        del many["runtime"][k]
    assert error(C.validate, many, source="s") == (
        "s: missing config key `runtime.device` (and 6 more: ['runtime.dtype', 'runtime.launcher', "
        "'runtime.nnodes', 'runtime.nproc_per_node', 'runtime.seed'])")


def test_checked_fields_walks_nested_groups():
    merged = OmegaConf.merge(OmegaConf.structured(C.Config), OmegaConf.to_container(C.compose_conf([], REPO / "conf")))
    keys = {key: (value, f.name) for key, value, f in C._checked_fields(C.Config, merged)}
    assert keys["data.embedded.max_chars"][1] == "max_chars" and keys["model.depth"][1] == "depth"
    assert keys["model.depth"][0] == merged.model.depth
    assert "runtime.seed" not in keys and "data.embedded" not in keys and "data" not in keys
    assert all(k.count(".") in (1, 2) for k in keys)


def test_select(base):
    cfg = C.validate(base)
    out = C.select(cfg, ["model", "runtime.seed", "data.embedded.max_chars"])
    assert OmegaConf.to_container(out) == {"model": base["model"], "runtime": {"seed": base["runtime"]["seed"]},
                                           "data": {"embedded": {"max_chars": base["data"]["embedded"]["max_chars"]}}}
    with pytest.raises(ReadonlyConfigError):
        out.model.depth = 1
    assert OmegaConf.is_struct(out) and OmegaConf.is_readonly(out)
    with pytest.raises(Exception):  # struct: no new keys, not even read
        out.pretrain
    assert error(C.select, cfg, ["model", "model.nope"]) == \
        "the stage declares the param `model.nope`, which the config does not have"
    with pytest.raises(MissingMandatoryValue):
        C.select(OmegaConf.create({"a": "???"}), ["a"])
    assert C.select(OmegaConf.create({"a": None}), ["a"]).a is None


@pytest.fixture
def params(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((REPO / "params.yaml").read_text())
    return p


def test_load_config_default_and_overrides(params, base):
    assert OmegaConf.to_container(C.load_config([], params)) == base
    assert C.load_config(["model.depth=3"], str(params)).model.depth == 3
    assert error(C.load_config, ["data.val_shard=99"], params) == \
        "params.yaml + overrides ['data.val_shard=99']: `data.val_shard` = 99: expected an index in [0, data.total_shards=4)"
    # a mistyped key is a usage error (OverrideError: exit 2) naming the closest key, before Hydra sees it
    assert error(C.load_config, ["model.dpeth=3"], params) == "unknown config key model.dpeth (did you mean model.depth?)"
    with pytest.raises(C.OverrideError):
        C.load_config(["model.dpeth=3"], params)


def test_load_config_bad_files(tmp_path):
    p = tmp_path / "params.yaml"
    assert error(C.load_config, [], p) == f"{p} not found. Run from the repo root, or create it with `nanopipe compose`."
    p.write_bytes(b"a: \xff\n")
    assert error(C.load_config, [], p) == f"{p}: not a text file (byte 3 is not UTF-8); {REGENERATE}"
    p.write_text("a: b: c\n")
    assert error(C.load_config, [], p) == \
        f"{p}: not valid YAML at line 1, column 5 (mapping values are not allowed here); {REGENERATE}"
    p.write_text("a: 1\nb: [1, 2\n")
    assert error(C.load_config, [], p) == \
        f"{p}: not valid YAML at line 3, column 1 (expected ',' or ']', but got '<stream end>'); {REGENERATE}"
    d = tmp_path / "dir.yaml"
    d.mkdir()
    assert error(C.load_config, [], d) == f"{d}: cannot be read (Is a directory)"
    assert error(C.load_config, [], Path("no/such/params.yaml")) == \
        f"{Path('no/such/params.yaml').resolve()} not found. Run from the repo root, or create it with `nanopipe compose`."


def test_load_config_reads_params_yaml_of_the_working_directory(params, base, monkeypatch):
    monkeypatch.chdir(params.parent)
    assert OmegaConf.to_container(C.load_config([])) == base


def test_load_config_names_the_file_alone_without_overrides(params):
    params.write_text(params.read_text().replace("val_shard: 3\n", "val_shard: 99\n", 1))
    assert error(C.load_config, [], params) == \
        "params.yaml: `data.val_shard` = 99: expected an index in [0, data.total_shards=4)"


def test_compose_conf_reads_conf_of_the_working_directory(base, monkeypatch):
    monkeypatch.chdir(REPO)
    assert OmegaConf.to_container(C.compose_conf([])) == base
