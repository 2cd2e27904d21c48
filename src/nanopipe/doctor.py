"""`nanopipe doctor`: find and heal a damaged dvc.lock (docs/dvc-lock-truncation.md says why).

DVC rewrites dvc.lock in place (open "w", then dump), so a `dvc repro` killed while it updates the
lock file leaves it empty (every `dvc status` / `dvc repro` then fails with "'./dvc.lock' validation
failed") or cut short (it may still parse: DVC then believes the stages it lost never ran and reruns
them). The doctor checks every dvc.lock next to a dvc.yaml of the repo:

- empty, not YAML, not a `schema: '2.0'` mapping of `stages`;
- an entry cut short: a stage without `cmd`, a dep/out without a full md5, paths that differ from
  what dvc.yaml declares for that stage;
- a stage of dvc.yaml whose outputs are all on disk but that the lock does not list.

A broken lock is replaced by the newest committed version that passes the same checks (`git show
<rev>:dvc.lock`); the broken one is kept under .dvc/tmp/doctor/. If git holds no valid version the
broken file is moved aside. Either way DVC's run-cache then brings back, without recomputing, every
stage that had run to completion: `dvc repro` prints "Stage '<name>' is cached - skipping run,
checking out outputs" for those (and "didn't change, skipping" for stages the restored lock
describes). `--repro` runs that `dvc repro` too; `--check` only reports (exit 1 when broken).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

USAGE = """usage: nanopipe doctor [--check | --repro]

  (no option)  check every dvc.lock; restore a broken one from git (or move it aside), then show `dvc status`
  --check      only report; exit 1 when a lock file is broken
  --repro      heal, then run `dvc repro`: stages that completed come back from DVC's run-cache
"""
MD5 = re.compile(r"^[0-9a-f]{32}(\.dir)?$")


def _out_paths(stage: dict) -> list[str]:
    """The output paths dvc.yaml declares for a stage (outs, metrics, plots)."""
    found = []
    for key in ("outs", "metrics", "plots"):
        for item in stage.get(key) or []:
            found.append(next(iter(item)) if isinstance(item, dict) else str(item))
    return found


def _dep_paths(stage: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else str(d) for d in stage.get("deps") or []]


def declared_stages(dvc_yaml: Path) -> dict[str, dict]:
    """{stage: {"outs": [...], "deps": [...]}} of a dvc.yaml, paths relative to its directory."""
    data = yaml.safe_load(dvc_yaml.read_text()) or {}
    out = {}
    for name, stage in (data.get("stages") or {}).items():
        if isinstance(stage, dict) and "foreach" not in stage and "matrix" not in stage:
            out[name] = {"outs": _out_paths(stage), "deps": _dep_paths(stage)}
    return out


def lock_problems(text: str, declared: dict[str, dict], root: Path | None = None) -> tuple[list[str], list[str]]:
    """(structural problems, missing stages) of a dvc.lock's text against its dvc.yaml's stages.

    Missing stages (outputs all present under `root` but no lock entry) are reported apart: a lock
    can lack them without being damaged (a stage run outside DVC).
    """
    if not text.strip():
        return ["is empty"], []
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        return [f"is not valid YAML{where} ({getattr(e, 'problem', None) or type(e).__name__})"], []
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        return [f"is not a mapping with `stages` (found {type(data).__name__})"], []
    problems = []
    if str(data.get("schema")) != "2.0":
        problems.append(f"has schema {data.get('schema')!r}, expected '2.0'")
    for name, entry in data["stages"].items():
        if not isinstance(entry, dict) or not entry.get("cmd"):
            problems.append(f"stage {name!r}: no `cmd` (entry cut short)")
            continue
        for kind in ("deps", "outs"):
            items = entry.get(kind) or []
            for item in items:
                if not isinstance(item, dict) or "path" not in item:
                    problems.append(f"stage {name!r}: a {kind} entry without `path`")
                elif not MD5.match(str(item.get("md5", ""))):
                    problems.append(f"stage {name!r}: {item['path']} has no full md5 ({item.get('md5')!r})")
            if name in declared:
                want = set(declared[name][kind])
                have = {str(i.get("path")) for i in items if isinstance(i, dict)}
                if want != have:
                    diff = sorted(want ^ have)
                    problems.append(f"stage {name!r}: {kind} differ from dvc.yaml ({', '.join(diff[:3])})")
    missing = []
    if root is not None:
        for name, spec in declared.items():
            outs = spec["outs"]
            if name not in data["stages"] and outs and all((root / p).exists() for p in outs):
                missing.append(name)
    return problems, missing


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def committed_lock(repo: Path, rel: str, declared: dict[str, dict]) -> tuple[str, str] | None:
    """(revision, text) of the newest commit whose `rel` passes the checks, or None."""
    revs = _git(["log", "--format=%H", "--", rel], repo)
    for rev in revs.stdout.split() if revs.returncode == 0 else []:
        shown = _git(["show", f"{rev}:{rel}"], repo)
        if shown.returncode == 0 and not lock_problems(shown.stdout, declared)[0]:
            return rev, shown.stdout
    return None


def _replace(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.doctor-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _keep_aside(repo: Path, lock: Path) -> Path:
    aside = repo / ".dvc" / "tmp" / "doctor" / f"{lock.relative_to(repo).as_posix().replace('/', '__')}.{time.strftime('%Y%m%d-%H%M%S')}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(lock, aside)
    return aside


def lock_files(repo: Path) -> list[tuple[Path, Path]]:
    """[(dvc.yaml, dvc.lock)] for every dvc.yaml git knows of (and the root one)."""
    listed = _git(["ls-files", "--cached", "--others", "--exclude-standard", "--", "dvc.yaml", "*/dvc.yaml"], repo)
    found = {repo / "dvc.yaml"} if (repo / "dvc.yaml").exists() else set()
    found |= {repo / p for p in listed.stdout.split()} if listed.returncode == 0 else set()
    return [(y, y.with_name("dvc.lock")) for y in sorted(found) if y.exists()]


def heal(repo: Path, check_only: bool = False) -> int:
    """Check (and unless `check_only`, heal) every lock; return how many remain broken."""
    broken = 0
    for dvc_yaml, lock in lock_files(repo):
        rel = lock.relative_to(repo).as_posix()
        if not lock.exists():
            continue  # never reproduced: nothing to heal
        declared = declared_stages(dvc_yaml)
        problems, missing = lock_problems(lock.read_text(errors="replace"), declared, dvc_yaml.parent)
        if not problems and not missing:
            print(f"doctor: {rel}: ok")
            continue
        for p in problems:
            print(f"doctor: {rel}: {p}")
        if missing:
            print(f"doctor: {rel}: lists no entry for {', '.join(missing)}, whose outputs are present")
        good = committed_lock(repo, rel, declared)
        if missing and not problems:
            have = set((yaml.safe_load(good[1]) or {}).get("stages", {})) if good else set()
            if not set(missing) & have:  # git knows no more than the workspace: nothing to restore
                print(f"doctor: {rel}: `dvc repro` records them (from the run-cache when they ran under DVC) "
                      f"or `dvc commit {' '.join(missing)}` accepts the outputs on disk")
                continue
        if check_only:
            broken += 1
            continue
        aside = _keep_aside(repo, lock)
        if good:
            _replace(lock, good[1])
            print(f"doctor: {rel}: restored from commit {good[0][:10]} (the damaged file is kept as {aside.relative_to(repo)})")
        else:
            print(f"doctor: {rel}: no valid version in git; moved aside to {aside.relative_to(repo)} "
                  "(DVC now treats its stages as never run)")
    return broken


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    unknown = [a for a in argv if a not in ("--check", "--repro")]
    if unknown or len(argv) > 1:
        print(f"nanopipe doctor: unexpected {' '.join(unknown or argv)}\n\n{USAGE}", file=sys.stderr)
        return 2
    top = _git(["rev-parse", "--show-toplevel"], Path.cwd())
    repo = Path(top.stdout.strip()) if top.returncode == 0 else Path.cwd()
    if "--check" in argv:
        return 1 if heal(repo, check_only=True) else 0
    heal(repo)
    if "--repro" in argv:
        print("doctor: + dvc repro (stages that ran to completion come back from the run-cache)", flush=True)
        return subprocess.run(["dvc", "repro"], cwd=repo, check=False).returncode
    status = subprocess.run(["dvc", "status"], cwd=repo, capture_output=True, text=True, check=False)
    if status.returncode != 0:
        print(f"doctor: `dvc status` still fails:\n{status.stdout}{status.stderr}", file=sys.stderr)
        return 1
    if "up to date" in status.stdout:
        print("doctor: dvc status: data and pipelines are up to date")
    else:
        changed = [line.rstrip(":") for line in status.stdout.splitlines() if line and not line[0].isspace()]
        print(f"doctor: dvc status: changed (or never run): {', '.join(changed)}")
        print("doctor: `dvc repro` (or `nanopipe doctor --repro`) takes each stage that ran to completion from DVC's "
              "run-cache (\"is cached - skipping run\") and reruns the rest; DVC keeps no run-cache entry for a stage "
              "with an uncached output that is not a metric or plot (docs/dvc-lock-truncation.md)")
    return 0
