"""Damaged inputs fail in one actionable line, not a traceback (issue 18, item 6)."""
import subprocess
import sys

import pytest
from helpers import REPO, make_cfg, subprocess_env
from omegaconf import OmegaConf

from nanopipe import stage
from nanopipe.data.shards import write_shard
from nanopipe.stages import tok_eval


def test_corrupt_shard_at_tok_eval_names_the_shard_and_its_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(OmegaConf.to_yaml(make_cfg("experiment=smoke", "tracking.enabled=false")))
    shards = tmp_path / "data/shards"
    for i in range(2):
        write_shard(shards / f"shard_{i:05d}.parquet", [f"doc {i} {j} " * 30 for j in range(40)], 8)
    (shards / "manifest.json").write_text('{"val_shard": "shard_00001.parquet", "shards": ['
                                          '{"name": "shard_00000.parquet", "split": "train"}, '
                                          '{"name": "shard_00001.parquet", "split": "val"}]}')
    bad = shards / "shard_00001.parquet"
    bad.write_bytes(bad.read_bytes()[:-64] + b"\0" * 64)  # the footer overwritten: pyarrow's ArrowInvalid
    monkeypatch.setattr(tok_eval, "load_tokenizer", lambda path: object())
    with pytest.raises(SystemExit) as e:
        stage.main(tok_eval, [])
    msg = str(e.value)
    assert "\n" not in msg and "data/shards/shard_00001.parquet" in msg and "dvc repro -f download" in msg, msg


@pytest.mark.parametrize("text,expected", [
    ("- data\n- runtime\n", "expected a mapping of config sections"),
    ("runtime:\n  - 1\n", "expected `runtime` to be a mapping"),
    ("data: {a: 1\n", "not valid YAML"),
])
def test_launcher_on_a_malformed_params_yaml_says_so_in_one_line(tmp_path, text, expected):
    (tmp_path / "params.yaml").write_text(text)
    p = subprocess.run([sys.executable, str(REPO / "stages/launch.py"), "download"], cwd=tmp_path,
                       env=subprocess_env(), capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("params.yaml: ") and expected in lines[0], p.stderr
    assert "nanopipe compose" in lines[0]
