"""The layout rules that keep `dvc repro` honest (docs/pipeline.md).

- the import layering (pyproject's [tool.importlinter] contracts), through `lint-imports`;
- every stage's code deps in dvc.yaml are exactly its static import closure minus the foundations
  (computed here with `ast`, nothing imported), plus the package data files that code names;
- every stage's `params:` is its module's PARAMS, and its cmd is `python stages/launch.py <name>`
  (with --torchrun for the stages that compute on a device).
"""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from helpers import require_module

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PKG = SRC / "nanopipe"
DVC_FILES = [REPO / "dvc.yaml", REPO / "stages/serve/dvc.yaml", REPO / "stages/lm_eval/dvc.yaml"]

# Code that cannot change a stage's numbers (docs/pipeline.md says why, file by file). The closure
# still walks through them (stage.py -> runtime.py), they are only left out of the deps.
FOUNDATIONS = {
    "src/nanopipe/__init__.py",
    "src/nanopipe/stages/__init__.py",
    "src/nanopipe/cli.py",
    "src/nanopipe/stage.py",
    "src/nanopipe/config.py",
    "src/nanopipe/tracking.py",
    "src/nanopipe/artifacts.py",
    "src/nanopipe/paths.py",
}
# The stages that compute on a device run through torchrun when the world size asks for it.
TORCHRUN = {"pretrain", "base_eval", "sft", "rl", "chat_eval"}
# A package's lazy-export table (`__getattr__` + importlib): {name: submodule}; see nanopipe/tasks.
LAZY_EXPORTS = "_EXPORTS"


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# ----------------------------------------------------------------------------- the import closure


def module_file(name: str) -> Path | None:
    """The file that defines module `name` (a package's __init__.py), None if it is not nanopipe's."""
    parts = name.split(".")
    if parts[0] != "nanopipe":
        return None
    base = SRC.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def is_package(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "nanopipe" and SRC.joinpath(*parts).is_dir()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@lru_cache(maxsize=None)
def lazy_exports(package: str) -> dict[str, str]:
    """{name: module} of a package whose __init__ resolves names lazily ({} for an ordinary one)."""
    init = module_file(package)
    if init is None or init.name != "__init__.py":
        return {}
    for node in parse(init).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == LAZY_EXPORTS for t in node.targets):
            return {k: f"{package}.{v}" for k, v in ast.literal_eval(node.value).items()}
    return {}


def with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and then c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def whole(name: str) -> list[str]:
    """A module bound as an object: for a lazy package that is every module its table names."""
    return [name, *lazy_exports(name).values()]


def imported_by(path: Path) -> set[str]:
    """Every nanopipe module that any import statement in `path` (at any depth) loads."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                for name in with_parents(alias.name):
                    out.update(whole(name))  # `import a.b` binds `a`: a.b's lazy names are reachable
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.update(with_parents(target))
            lazy = lazy_exports(target)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if alias.name == "*":
                    out.update(whole(target))
                elif module_file(sub) or is_package(sub):
                    out.update(whole(sub))  # a submodule
                elif alias.name in lazy:
                    out.add(lazy[alias.name])  # a lazily exported name: its module
    return {m for m in out if m.split(".")[0] == "nanopipe"}


def dynamic_imports(path: Path) -> list[int]:
    """Lines of importlib.import_module / __import__ calls (invisible to a static closure)."""
    lines = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                lines.append(node.lineno)
    return lines


def data_files() -> list[Path]:
    """The package data: every file under src/nanopipe that is not Python (tool caches aside, and py.typed,
    the PEP 561 marker that type checkers read and no code does)."""
    return sorted(p for p in PKG.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc") and p != PKG / "py.typed"
                  and not any(part == "__pycache__" or part.startswith(".") for part in p.relative_to(PKG).parts))


def named_data(path: Path) -> set[Path]:
    """The package data files a module reads: those under its package whose file name it spells out."""
    strings = {n.value for n in ast.walk(parse(path)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return {d for d in data_files() if d.name in strings and path.parent in d.parents}


def closure(stage: str) -> set[str]:
    """Repo-relative files: the stage module, everything it imports (recursively), the data they name."""
    start = f"nanopipe.stages.{stage}"
    seen: set[str] = set()
    todo = with_parents(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        f = module_file(name)
        if f is not None:
            todo.extend(imported_by(f) - seen)
    files = {module_file(m) for m in seen} - {None}
    files |= {d for f in list(files) for d in named_data(f)}
    return {rel(f) for f in files}


def expected_code_deps(stage: str) -> set[str]:
    return closure(stage) - FOUNDATIONS


# ----------------------------------------------------------------------------- dvc.yaml


def dvc_stages() -> dict[str, dict]:
    stages = {}
    for f in DVC_FILES:
        stages.update(yaml.safe_load(f.read_text())["stages"])
    return stages


def dep_path(dep) -> str:
    return next(iter(dep)) if isinstance(dep, dict) else dep


def code_deps(st: dict) -> set[str]:
    return {dep_path(d) for d in st.get("deps", []) if dep_path(d).startswith("src/")}


def deps_problem(name: str, st: dict) -> str | None:
    """None when the stage's src/ deps follow the rule, else a message naming the missing and extra files."""
    declared, expected = code_deps(st), expected_code_deps(name)
    if declared == expected:
        return None
    missing, extra = sorted(expected - declared), sorted(declared - expected)
    msg = [f"stage {name}: dvc.yaml's src/ deps are not its import closure minus the foundations (docs/pipeline.md)"]
    if missing:
        msg.append("  missing (in the closure, not in deps):\n" + "\n".join(f"    - {m}" for m in missing))
    if extra:
        msg.append("  extra (in deps, not in the closure; directories are not allowed):\n"
                   + "\n".join(f"    - {e}" for e in extra))
    return "\n".join(msg)


STAGES = dvc_stages()
# serve declares no deps, params or outs (a server has nothing to cache): its command brings the model
# up to date with `dvc repro rl` first (docs/pipeline.md, "The serve stage"); test_serve_stage checks it.
SERVE_CMD = "dvc repro rl && python stages/launch.py serve"
RULED = sorted(set(STAGES) - {"serve"})


def test_every_stage_module_is_a_dvc_stage():
    from nanopipe.stages import NAMES

    assert set(STAGES) == set(NAMES) - {"chat"}  # chat is interactive, not a DVC stage
    for name in STAGES:
        assert (PKG / "stages" / f"{name}.py").is_file(), f"stage {name}: no src/nanopipe/stages/{name}.py"


@pytest.mark.parametrize("name", RULED)
def test_code_deps_are_the_import_closure(name):
    problem = deps_problem(name, STAGES[name])
    assert problem is None, problem


@pytest.mark.parametrize("name", RULED)
def test_params_are_the_module_params(name):
    module = importlib.import_module(f"nanopipe.stages.{name}")
    declared = list(STAGES[name].get("params", []))
    assert declared == list(module.PARAMS), (
        f"stage {name}: dvc.yaml params {declared} != nanopipe.stages.{name}.PARAMS {list(module.PARAMS)}")


@pytest.mark.parametrize("name", RULED)
def test_cmd_is_the_launcher(name):
    expected = f"python stages/launch.py {name}" + (" --torchrun" if name in TORCHRUN else "")
    assert STAGES[name]["cmd"] == expected


def test_serve_stage():
    """serve: no deps, params or outs, its command the launcher after `dvc repro rl`, and a committed
    dvc.lock that running it rewrites unchanged (so serving leaves the git tree clean)."""
    serve = STAGES["serve"]
    assert serve["cmd"] == SERVE_CMD
    assert set(serve) == {"wdir", "cmd", "always_changed"}, f"serve declares {sorted(serve)}"
    lock = yaml.safe_load((REPO / "stages/serve/dvc.lock").read_text())
    assert lock == {"schema": "2.0", "stages": {"serve": {"cmd": SERVE_CMD}}}


def test_closure_sees_every_import():
    """The rule is static: a dynamic import it cannot follow must be a lazy-export table it does follow."""
    for name in STAGES:
        for f in closure(name):
            path = REPO / f
            if path.suffix != ".py":
                continue
            lines = dynamic_imports(path)
            assert not lines or lazy_exports(module_name(path)), (
                f"{f}:{lines}: a dynamic import the deps rule cannot follow (use a static import, "
                f"or a {LAZY_EXPORTS} table in a package __init__)")


def test_imported_packages_have_an_init():
    """A directory of modules without __init__.py is a namespace package: lint-imports (grimp) skips it."""
    for name in STAGES:
        for f in closure(name):
            if f.endswith(".py"):
                for parent in (REPO / f).parents:
                    if parent == PKG.parent:
                        break
                    assert (parent / "__init__.py").is_file(), f"{rel(parent)}/ has modules but no __init__.py ({f})"


def test_every_data_file_is_read_by_some_module():
    """Package data the rule would miss: a file no module names (dead, or read in a way the rule cannot see)."""
    modules = [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]
    named = set().union(*(named_data(m) for m in modules))
    assert set(data_files()) <= named, sorted(rel(d) for d in set(data_files()) - named)


def test_foundations_exist():
    for f in FOUNDATIONS:
        assert (REPO / f).is_file(), f"FOUNDATIONS names {f}, which does not exist"


# ----------------------------------------------------------------------------- the layering


def test_import_contracts():
    require_module("importlinter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(SRC), os.environ.get("PYTHONPATH")] if p)}
    p = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
                        "--no-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
