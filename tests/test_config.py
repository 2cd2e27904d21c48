"""Hydra composition, params.yaml, and structured-config validation."""
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, make_cfg
from omegaconf import OmegaConf

from nanopipe.config import ConfigError, compose_conf, validate


def test_committed_params_equal_composed_default():
    composed = OmegaConf.to_container(compose_conf([], conf_dir=REPO / "conf"))
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert composed == committed, "params.yaml is stale: run `nanopipe compose` and commit it"


@pytest.mark.parametrize("preset", ["tiny", "smoke", "cpu", "d12", "speedrun"])
def test_presets_compose_and_validate(preset):
    cfg = make_cfg(f"experiment={preset}")
    assert cfg.model.depth >= 1
    if preset in ("cpu", "d12", "speedrun"):
        assert cfg.data.source == "fineweb_edu" and cfg.data.val_shard == 1822
    if preset == "speedrun":
        assert (cfg.model.depth, cfg.pretrain.target_param_data_ratio, cfg.pretrain.fp8, cfg.runtime.nproc_per_node) == (26, 8.25, True, 8)


def test_unknown_key_is_named():
    cfg = OmegaConf.to_container(compose_conf([], conf_dir=REPO / "conf"))
    cfg["model"]["dpeth"] = 3
    with pytest.raises(ConfigError, match=r"`model\.dpeth`"):
        validate(cfg)


def test_bad_type_is_named():
    cfg = OmegaConf.to_container(compose_conf([], conf_dir=REPO / "conf"))
    cfg["model"]["depth"] = "deep"
    with pytest.raises(ConfigError, match=r"`model\.depth`.*deep"):
        validate(cfg)


def test_missing_key_is_named():
    cfg = OmegaConf.to_container(compose_conf([], conf_dir=REPO / "conf"))
    del cfg["pretrain"]["matrix_lr"]
    with pytest.raises(ConfigError, match=r"`pretrain\.matrix_lr`"):
        validate(cfg)


def test_range_check_names_key():
    with pytest.raises(ConfigError, match=r"`data\.val_shard`"):
        make_cfg("data.val_shard=99")


def test_cli_reports_bad_override_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    p = subprocess.run([sys.executable, "-m", "nanopipe.cli", "download", "model.depth=zero"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert p.returncode != 0
    assert "model.depth" in p.stderr and "zero" in p.stderr
    assert not (tmp_path / "data").exists()
