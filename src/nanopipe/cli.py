"""`nanopipe <command> [key=value ...]`: every stage, and `compose`.

`nanopipe <stage>` runs `nanopipe.stages.<stage>` (the file named exactly as the stage in dvc.yaml)
through the stage contract (`nanopipe.stage.main`): params.yaml plus Hydra overrides, validated.

`nanopipe compose [overrides...]` rewrites params.yaml from `conf/` exactly as `dvc exp run -S ...`
does (e.g. `nanopipe compose experiment=d12`).

`nanopipe doctor [--check | --repro]` finds a dvc.lock that a killed `dvc repro` left empty or cut
short and restores it from git, so that DVC's run-cache brings outputs back without recomputing.
"""
from __future__ import annotations

import importlib
import sys

from nanopipe.stages import NAMES

USAGE = f"""usage: nanopipe <command> [key=value ...]

commands:
  {", ".join(NAMES)}
  compose     rewrite params.yaml from conf/ (Hydra overrides allowed, e.g. experiment=d12)
  doctor      check dvc.lock; restore an empty/truncated one from git (--check: report only; --repro: then repro)

Each stage is the file src/nanopipe/stages/<command>.py. Overrides use Hydra's syntax and apply on
top of params.yaml, e.g.
  nanopipe pretrain pretrain.num_iterations=20 runtime.device=cpu
"""


def compose(overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    from nanopipe import artifacts
    from nanopipe.config import ConfigError, compose_conf, validate

    cfg = compose_conf(overrides)
    try:
        validate(cfg, source="conf/ composition")
    except ConfigError as e:
        raise SystemExit(f"nanopipe compose: {e}") from None
    artifacts.write_text("params.yaml", OmegaConf.to_yaml(cfg))
    print("wrote params.yaml")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "compose":
        return compose(rest)
    if command == "doctor":
        from nanopipe import doctor

        raise SystemExit(doctor.main(rest))
    if command not in NAMES:
        raise SystemExit(f"nanopipe: unknown command {command!r}\n\n{USAGE}")
    from nanopipe import stage

    stage.main(importlib.import_module(f"nanopipe.stages.{command}"), rest)


if __name__ == "__main__":
    main()
