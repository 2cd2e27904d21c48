"""`nanopipe <stage> [hydra overrides...]`: the entry point of every stage.

The config a stage sees is `params.yaml` (the composition of `conf/` that DVC tracks),
loaded through Hydra's compose API so ordinary Hydra overrides apply on top
(`nanopipe pretrain pretrain.num_iterations=10`), then validated against the
structured schema in `nanopipe.config` before any work starts.

`nanopipe compose [overrides...]` rewrites params.yaml from `conf/` exactly as
`dvc exp run -S ...` does (e.g. `nanopipe compose experiment=d12`).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# stage name -> "module:function"; the function takes the validated config.
STAGES = {
    "download": "nanopipe.data.download:main",
    "tokenizer": "nanopipe.tokenizer.stages:fit_main",
    "tok_eval": "nanopipe.tokenizer.stages:eval_main",
    "pretrain": "nanopipe.train.pretrain:main",
    "base_eval": "nanopipe.eval.base_eval:main",
    "sft": "nanopipe.train.sft:main",
    "rl": "nanopipe.train.rl:main",
    "chat_eval": "nanopipe.eval.chat_eval:main",
    "report": "nanopipe.report:main",
    "serve": "nanopipe.serve.stage:serve_main",
    "chat": "nanopipe.serve.stage:chat_main",
}

USAGE = f"""usage: nanopipe <command> [key=value ...]

commands:
  {", ".join(STAGES)}
  compose     rewrite params.yaml from conf/ (Hydra overrides allowed, e.g. experiment=d12)

Overrides use Hydra's syntax and apply on top of params.yaml, e.g.
  nanopipe pretrain pretrain.num_iterations=20 runtime.device=cpu
"""


def compose_conf(overrides: list[str], conf_dir: str | os.PathLike = "conf"):
    """Compose conf/config.yaml with overrides and resolve it, as DVC's hydra integration does."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def load_config(overrides: list[str], params: str | os.PathLike = "params.yaml"):
    """params.yaml + Hydra overrides, validated."""
    from hydra import compose, initialize_config_dir

    from nanopipe.config import validate

    params = Path(params).resolve()
    if not params.exists():
        raise SystemExit(f"nanopipe: {params} not found. Run from the repo root, or create it with `nanopipe compose`.")
    with initialize_config_dir(config_dir=str(params.parent), version_base=None):
        cfg = compose(config_name=params.stem, overrides=overrides)
    return validate(cfg, source=params.name + (f" + overrides {overrides}" if overrides else ""))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "compose":
        from omegaconf import OmegaConf

        from nanopipe import artifacts
        from nanopipe.config import validate

        cfg = compose_conf(rest)
        validate(cfg, source="conf/ composition")
        artifacts.write_text("params.yaml", OmegaConf.to_yaml(cfg))
        print("wrote params.yaml")
        return
    if command not in STAGES:
        raise SystemExit(f"nanopipe: unknown command {command!r}\n\n{USAGE}")

    from nanopipe.config import ConfigError
    from nanopipe.stage import setup_logging

    setup_logging()
    # Options of the command itself (e.g. `chat --prompt "hi"`) come before the overrides.
    options = []  # `--name value` / `--name=value` pairs, all before the overrides
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        options.append(opt)
        if "=" not in opt and rest:
            options.append(rest.pop(0))
    if options and command not in ("chat",):
        raise SystemExit(f"nanopipe {command}: takes no options ({' '.join(options)}); configure it with key=value overrides")
    try:
        cfg = load_config(rest)
    except ConfigError as e:
        raise SystemExit(f"nanopipe {command}: {e}") from None
    module, func = STAGES[command].split(":")
    fn = getattr(importlib.import_module(module), func)
    fn(cfg, *([options] if options else []))


if __name__ == "__main__":
    main()
