"""Mutation testing of nanopipe's core library, module by module (docs/testing.md).

    python tests/mutation/run.py                       # every module below, in this order
    python tests/mutation/run.py schedules sampling    # some of them
    python tests/mutation/run.py --budget-min 20       # stop starting modules after 20 minutes
    python tests/mutation/run.py --report              # the table from the last runs, running nothing

It drives mutmut 3 (`pip install mutmut`; config in pyproject.toml `[tool.mutmut]`): mutmut copies
src/ and tests/ into mutants/ (gitignored), mutates the files listed there, runs the selected tests
once to learn which tests execute which function, then runs each mutant against only those tests,
in a forked child. Results persist in mutants/ for --report; running a module retests all its mutants
(mutmut reruns every mutant it is named); `rm -rf mutants` starts over. Not part of the default test
run or CI.

A module here is a file and, where only part of it is the core logic, the functions of it that are
mutated (mutmut mutates whole files; the rest is simply not run). Prints, per module:
mutants | killed | survived | timeout | other | score, score = (killed + timeout) / mutants run.
`python -m mutmut show <mutant>` prints a survivor's diff.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = "nanopipe"


def _fns(module: str, *names: str) -> list[str]:
    """mutmut's mutant-name globs for functions ('f') and methods ('Class.method', 'Class.*')."""
    out = []
    for n in names:
        if "." in n:
            cls, meth = n.split(".", 1)
            out.append(f"{module}.x\u01c1{cls}\u01c1{meth}__mutmut_*")
        else:
            out.append(f"{module}.x_{n}__mutmut_*")
    return out


# name -> (source file under src/, mutant-name globs). Order = priority when the budget runs out.
MODULES: dict[str, tuple[str, list[str]]] = {
    "schedules": ("nanopipe/train/schedules.py", ["nanopipe.train.schedules.*"]),
    "sampling": ("nanopipe/inference/engine.py", _fns("nanopipe.inference.engine", "_draw", "sample_next_token")),
    "bpb": ("nanopipe/eval/bpb.py", _fns("nanopipe.eval.bpb", "scored_bytes", "evaluate_bpb", "evaluate_loss_bpb")),
    "config": ("nanopipe/config.py", ["nanopipe.config.*"]),
    "artifacts": ("nanopipe/artifacts.py", ["nanopipe.artifacts.*"]),
    "chat": ("nanopipe/tokenizer/chat.py", _fns("nanopipe.tokenizer.chat", "_messages", "render_conversation",
                                                 "render_for_completion")),
    "schemas": ("nanopipe/serving/schemas.py", ["nanopipe.serving.schemas.*"]),
    "checkpoint": ("nanopipe/model/checkpoint.py", _fns("nanopipe.model.checkpoint", "_HashingWriter.*", "_save_file",
                                                        "read_meta", "_verify_file", "step_dir", "history_steps_in",
                                                        "checkpoint_at", "find_last_step")),
    "optim": ("nanopipe/model/optim.py", _fns("nanopipe.model.optim", "_as", "adamw_step_fused", "muon_step_fused")),
    "loader": ("nanopipe/data/loader.py", _fns("nanopipe.data.loader", "tokenizing_distributed_data_loader_with_state_bos_bestfit",
                                               "_pick_state", "_document_batches")),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout", None: "not run"}


def results(name: str) -> dict[str, int | None]:
    """mutant name -> exit code (None: not run yet) for the module's mutants, from mutmut's meta file."""
    src, globs = MODULES[name]
    meta = ROOT / "mutants" / "src" / (src + ".meta")
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, g) for g in globs)}


def row(name: str) -> dict:
    counts = {"mutants": 0, "killed": 0, "survived": 0, "timeout": 0, "other": 0, "not run": 0}
    survivors = []
    for mutant, code in sorted(results(name).items()):
        status = STATUS.get(code, "other")
        counts["mutants"] += 1
        counts[status] += 1
        if status == "survived":
            survivors.append(mutant)
    run = counts["mutants"] - counts["not run"]
    counts["score"] = f"{100 * (counts['killed'] + counts['timeout']) / run:.1f}%" if run else "-"
    counts["survivors"] = survivors
    return counts


def table(names: list[str], seconds: dict[str, float]) -> str:
    cols = ["mutants", "killed", "survived", "timeout", "other", "not run", "score"]
    lines = ["| module | " + " | ".join(cols) + " | time |", "|" + "---|" * (len(cols) + 2)]
    for n in names:
        r = row(n)
        t = f"{seconds[n]:.0f} s" if n in seconds else "-"
        lines.append(f"| {n} | " + " | ".join(str(r[c]) for c in cols) + f" | {t} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modules", nargs="*", metavar="module", help=f"any of: {', '.join(MODULES)} (default: all)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="start no module after this many minutes (a module started is run to its end)")
    ap.add_argument("--max-children", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--report", action="store_true", help="print the table of the last runs; run nothing")
    ap.add_argument("--survivors", action="store_true", help="list each module's surviving mutants")
    args = ap.parse_args(argv)
    names = args.modules or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    seconds: dict[str, float] = {}
    start = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts mutants/src first itself
    if not args.report:
        for n in names:
            if args.budget_min is not None and time.monotonic() - start > 60 * args.budget_min:
                print(f"[mutation] budget spent: {n} and later modules not run", flush=True)
                break
            t0 = time.monotonic()
            print(f"[mutation] {n}: mutmut run {' '.join(MODULES[n][1])}", flush=True)
            log = ROOT / "mutants" / f"run-{n}.log"
            log.parent.mkdir(exist_ok=True)
            with open(log, "w") as f:
                rc = subprocess.call([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children),
                                      *MODULES[n][1]], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            seconds[n] = time.monotonic() - t0
            if rc != 0 or not any(v is not None for v in results(n).values()):
                tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-15:]
                print(f"[mutation] {n}: mutmut exited {rc}; the end of {log}:", *tail, sep="\n  ", flush=True)
    print(table(names, seconds))
    if args.survivors:
        for n in names:
            for m in row(n)["survivors"]:
                print(f"{n}: survived {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
