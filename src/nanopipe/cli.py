"""`nanopipe <command> [options] [key=value ...]`: every stage, and `compose`.

`nanopipe <stage>` runs `nanopipe.stages.<stage>` (the file named exactly as the stage in dvc.yaml)
through the stage contract (`nanopipe.stage.main`): params.yaml plus Hydra overrides, validated.
Around it, the habits of other command lines (each exits without running the stage):

    nanopipe <stage> --help        what the stage reads and writes (dvc.yaml), its params and their
                                   current values
    nanopipe <stage> --cfg job     the config the stage would run with (params.yaml + overrides), as
                                   Hydra's --cfg job prints it; `--cfg all`: the whole config
    nanopipe serve --port 8001     a few common options, each the same as one override (OPTIONS)

A mistyped override is one line naming the closest valid key or the presets there are, exit code
2 (nanopipe.config.check_overrides), never a Hydra traceback.

`nanopipe compose [overrides...]` rewrites params.yaml from `conf/` exactly as `dvc exp run -S ...`
does (e.g. `nanopipe compose experiment=d12`).

`nanopipe doctor [--check | --repro]` finds a dvc.lock that a killed `dvc repro` left empty or cut
short and restores it from git, so that DVC's run-cache brings outputs back without recomputing.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from nanopipe.stages import NAMES

# Options users type out of habit, each the same as one override. Kept small on purpose: everything
# else is a key=value override (`nanopipe <stage> --help` lists the keys). "*": every stage.
OPTIONS = {
    "*": {"--device": "runtime.device"},
    "serve": {"--port": "serve.port", "--host": "serve.host"},
}

USAGE = f"""usage: nanopipe <command> [options] [key=value ...]

commands:
  {", ".join(NAMES)}
  compose     rewrite params.yaml from conf/ (Hydra overrides allowed, e.g. experiment=d12)
  doctor      check dvc.lock; restore an empty/truncated one from git (--check: report only; --repro: then repro)

Each stage is the file src/nanopipe/stages/<command>.py. Overrides use Hydra's syntax and apply on
top of params.yaml, e.g.
  nanopipe pretrain pretrain.num_iterations=20 runtime.device=cpu

  nanopipe <command> --help      what it reads and writes, its config keys and their current values
  nanopipe <command> --cfg job   print the config it would run with, and exit
  --device X                     = runtime.device=X (every stage)
  --port N / --host H            = serve.port=N / serve.host=H (serve)
"""


def usage_error(command: str, message: str) -> None:
    """A mistyped command line: one line on stderr, exit 2 (as argparse and check_overrides)."""
    print(f"nanopipe {command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def compose(overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    from nanopipe import artifacts
    from nanopipe.config import ConfigError, OverrideError, compose_conf, validate

    try:
        cfg = compose_conf(overrides)
        validate(cfg, source="conf/ composition")
    except OverrideError as e:
        usage_error("compose", str(e))
    except ConfigError as e:
        raise SystemExit(f"nanopipe compose: {e}") from None
    artifacts.write_text("params.yaml", OmegaConf.to_yaml(cfg))
    print("wrote params.yaml")


def stage_options(command: str) -> dict[str, str]:
    return {**OPTIONS["*"], **OPTIONS.get(command, {})}


def translate(command: str, module, argv: list[str]) -> tuple[list[str], list[str]]:
    """(the stage's own options, overrides): OPTIONS become overrides; other options are the stage's
    (its parse_options), or a usage error for a stage that has none."""
    mapped, own, overrides = stage_options(command), [], []
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if name in mapped:
            if not eq:
                if not rest:
                    usage_error(command, f"{name} needs a value ({name} X is {mapped[name]}=X)")
                value = rest.pop(0)
            overrides.append(f"{mapped[name]}={value}")
        elif arg.startswith("-"):
            if not hasattr(module, "parse_options"):
                usage_error(command, f"unknown option {arg}; options: {', '.join(mapped)}, --help, --cfg job; "
                                     "anything else is a key=value override")
            own.append(arg)  # the stage's parser takes it, and its value if it has one
            if not eq and rest and not rest[0].startswith("-") and not is_override(rest[0]):
                own.append(rest.pop(0))
        else:
            overrides.append(arg)
    return own, overrides


def is_override(arg: str) -> bool:
    """`arg` sets a config key or picks a preset (so `--prompt "x=1"` is a prompt, `model.depth=2` an override)."""
    from nanopipe.config import presets, schema_keys

    key, eq, _ = arg.partition("=")
    key = key.lstrip("+~")
    return bool(eq) and (key in schema_keys() or key in presets("conf") or key.split(".")[0] == "hydra")


def dvc_entry(command: str) -> tuple[Path, dict] | None:
    """(the dvc.yaml, the stage's entry) of `command`, looked up from the working directory."""
    import yaml

    for path in [Path("dvc.yaml"), *sorted(Path("stages").glob("*/dvc.yaml"))]:
        if path.is_file():
            stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})
            if command in stages:
                return path, stages[command]
    return None


def _paths(entries) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def stage_help(command: str, module, overrides: list[str]) -> str:
    """What `nanopipe <stage> --help` prints."""
    from omegaconf import OmegaConf

    from nanopipe.config import load_config, select

    doc = (module.__doc__ or "").strip()
    lines = [f"usage: nanopipe {command} [options] [key=value ...]", "", doc, ""]
    entry = dvc_entry(command)
    if entry is None:
        lines.append("not a DVC stage (dvc repro never runs it)")
    else:
        path, st = entry
        deps = _paths(st.get("deps"))
        code = [d for d in deps if d.startswith("src/")]
        data = [d for d in deps if not d.startswith("src/")]
        outs = _paths(st.get("outs")) + _paths(st.get("metrics")) + _paths(st.get("plots"))
        lines += [f"{path}: `{st.get('cmd')}`",
                  f"  reads:  {', '.join(data) or '(no data)'} (+ {len(code)} code files)",
                  f"  writes: {', '.join(outs) or '(nothing)'}"]
    lines += [f"  params: {', '.join(module.PARAMS)}", ""]
    mapped = stage_options(command)
    lines.append("options: " + ", ".join(f"{o} X (= {k}=X)" for o, k in mapped.items()) + ", --cfg job, --help")
    if hasattr(module, "parse_options"):
        lines += ["", f"{command}'s own options:"]
    cfg = load_config(overrides)
    if hasattr(module, "parse_options"):
        parser_help = _parser_help(module, select(cfg, module.PARAMS))
        lines += ["  " + line for line in parser_help.splitlines() if line.strip()]
    lines += ["", "config (params.yaml" + (f" + {' '.join(overrides)}" if overrides else "") + "):",
              OmegaConf.to_yaml(select(cfg, module.PARAMS)).rstrip()]
    return "\n".join(lines)


def _parser_help(module, cfg) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        module.parse_options(["--help"], cfg)
    return buf.getvalue()


def print_cfg(module, overrides: list[str], which: str) -> None:
    from omegaconf import OmegaConf

    from nanopipe.config import load_config, select

    cfg = load_config(overrides)
    print(OmegaConf.to_yaml(cfg if which == "all" else select(cfg, module.PARAMS)), end="")


def run_stage_command(command: str, argv: list[str]) -> None:
    from nanopipe.config import ConfigError, OverrideError, check_overrides, presets

    try:  # a typo is told before the stage's imports (torch: seconds) are paid for
        check_overrides([a for i, a in enumerate(argv) if "=" in a and not a.startswith("-") and not
                         (i and argv[i - 1].startswith("-") and "=" not in argv[i - 1] and not is_override(a))],
                        presets("conf"), composing=False)
    except OverrideError as e:
        usage_error(command, str(e))
    module = importlib.import_module(f"nanopipe.stages.{command}")
    wants_help = any(a in ("-h", "--help") for a in argv)
    argv = [a for a in argv if a not in ("-h", "--help")]
    which = None
    for i, a in enumerate(argv):
        if a == "--cfg" or a.startswith("--cfg="):
            which = a.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i: i + (1 if "=" in a else 2)]
            if which not in ("job", "all"):
                usage_error(command, f"--cfg takes job (the keys {command} reads) or all, got {which or 'nothing'}")
            break
    own, overrides = translate(command, module, argv)
    if wants_help or which:
        try:
            if wants_help:
                print(stage_help(command, module, overrides))
            else:
                print_cfg(module, overrides, which)
        except OverrideError as e:
            usage_error(command, str(e))
        except ConfigError as e:
            raise SystemExit(f"nanopipe {command}: {e}") from None
        return
    from nanopipe import stage

    stage.main(module, own + overrides)


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
    run_stage_command(command, rest)


if __name__ == "__main__":
    main()
