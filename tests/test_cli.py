"""The `nanopipe` command line as users type it, run as a real subprocess: --help and --cfg job per
stage, the habit options (--port, --host, --device), and mistyped overrides told in one clean line
(exit code 2, no traceback)."""
import shutil
import sys

import pytest
import yaml
from helpers import REPO, run

NANOPIPE = [sys.executable, "-m", "nanopipe.cli"]


def nanopipe(*args, cwd=REPO):
    return run([*NANOPIPE, *args], cwd, check=False, timeout=300)


def test_stage_help_says_what_it_reads_writes_and_its_current_config():
    p = nanopipe("pretrain", "--help")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    out = p.stdout
    assert out.startswith("usage: nanopipe pretrain [options] [key=value ...]\n")
    assert "  reads:  data/shards, models/tokenizer (+ " in out
    assert "  writes: models/base, metrics/sections/pretrain.md, metrics/pretrain.json" in out
    assert "  params: model, pretrain, base_eval.bundle_url" in out
    assert "--device X (= runtime.device=X)" in out
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    config = yaml.safe_load(out.split("config (params.yaml):\n", 1)[1])
    assert config["model"] == params["model"] and config["pretrain"] == params["pretrain"]
    assert set(config) == {"model", "pretrain", "base_eval", "runtime"}  # what it reads, nothing else
    # chat is not a DVC stage, and shows its own options too
    chat = nanopipe("chat", "-h")
    assert chat.returncode == 0 and "not a DVC stage" in chat.stdout and "--seed SEED" in chat.stdout


@pytest.mark.slow  # two CLI runs that load the stage (torch): ~20 s on a busy 2-core machine
def test_cfg_job_prints_the_composed_config_with_habit_options():
    p = nanopipe("serve", "--port", "8001", "--host=0.0.0.0", "--cfg", "job", "serve.max_batch=3")
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    assert set(cfg) == {"serve", "runtime"}
    assert (cfg["serve"]["port"], cfg["serve"]["host"], cfg["serve"]["max_batch"]) == (8001, "0.0.0.0", 3)
    p = nanopipe("pretrain", "--device", "cpu", "model.depth=3", "--cfg=all")
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    assert cfg["model"]["depth"] == 3 and cfg["runtime"]["device"] == "cpu" and "serve" in cfg  # all: every section


@pytest.mark.parametrize("args, line", [
    (["pretrain", "model.dept=3"], "nanopipe pretrain: unknown config key model.dept (did you mean model.depth?)"),
    (["sft", "runtime.seeed=1"], "nanopipe sft: unknown config key runtime.seeed (did you mean runtime.seed?)"),
    (["pretrain", "experiment=nope"], "nanopipe pretrain: no preset experiment=nope; available: cpu, d12, smoke, "
                                      "speedrun, tiny"),
    (["pretrain", "experiment=tiny"], "nanopipe pretrain: experiment=tiny picks a preset, which stages cannot: they "
                                      "read params.yaml. Run `nanopipe compose experiment=tiny` (rewrites params.yaml) first"),
    (["pretrain", "model.depth=[1"], "nanopipe pretrain: cannot parse the override 'model.depth=[1': no viable "
                                     "alternative at input '[1' (Hydra's syntax: key=value, e.g. model.depth=4)"),
    (["pretrain", "--bogus"], "nanopipe pretrain: unknown option --bogus; options: --device, --help, --cfg job; "
                              "anything else is a key=value override"),
    (["serve", "--port"], "nanopipe serve: --port needs a value (--port X is serve.port=X)"),
    (["pretrain", "--cfg", "hydra"], "nanopipe pretrain: --cfg takes job (the keys pretrain reads) or all, got hydra"),
    (["pretrain", "--cfg", "job", "model.dept=3"], "nanopipe pretrain: unknown config key model.dept "
                                                   "(did you mean model.depth?)"),
])
def test_mistyped_command_lines_are_one_clean_line_exit_2(args, line):
    p = nanopipe(*args)
    assert (p.returncode, p.stdout, p.stderr) == (2, "", line + "\n")


def test_compose_refuses_unknown_presets_and_keys_cleanly(tmp_path):
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    for args, line in [(["experiment=nope"], "nanopipe compose: no preset experiment=nope; available: cpu, d12, "
                                             "smoke, speedrun, tiny"),
                       (["model.dept=3"], "nanopipe compose: unknown config key model.dept (did you mean model.depth?)")]:
        p = nanopipe("compose", *args, cwd=tmp_path)
        assert (p.returncode, p.stdout, p.stderr) == (2, "", line + "\n")
        assert not (tmp_path / "params.yaml").exists()
    p = nanopipe("compose", "experiment=tiny", cwd=tmp_path)
    assert p.returncode == 0 and (tmp_path / "params.yaml").exists()


def test_option_values_and_overrides_are_told_apart(monkeypatch):
    """A stage's own option takes the next word as its value unless that word sets a config key: a
    prompt may hold '='; habit options become overrides."""
    from nanopipe.cli import translate
    from nanopipe.stages import chat, serve

    monkeypatch.chdir(REPO)  # presets are read from conf/
    assert translate("chat", chat, ["--prompt", "x=1 or y?", "--seed", "3", "serve.top_k=5", "--device", "cpu"]) == \
        (["--prompt", "x=1 or y?", "--seed", "3"], ["serve.top_k=5", "runtime.device=cpu"])
    assert translate("chat", chat, ["-p", "hi", "serve.source=sft"]) == (["-p", "hi"], ["serve.source=sft"])
    assert translate("serve", serve, ["--port=8001", "--host", "0.0.0.0"]) == ([], ["serve.port=8001", "serve.host=0.0.0.0"])
