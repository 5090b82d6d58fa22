"""Mutation testing of the core modules, one module at a time (``make mutants``).

Runs mutmut on each core module against the fast tests that cover it, in a scratch copy of the
repository under ``.mutmut/<module>/`` (so the run never touches ``src/`` and other people's
edits during a run do not change its result), then prints one table row per module: mutants,
killed, survived, timeout, equivalent, score. Score = killed (incl. timeouts) over the mutants that
are not listed as equivalent in ``tools/mutants_equivalent.txt``.

    python tools/mutants.py                      # every module
    python tools/mutants.py schedules balance    # some modules
    python tools/mutants.py --list               # the modules and their test subsets
    python tools/mutants.py --recheck schedules  # only the survivors, against the current tests
    python tools/mutants.py --report-only        # the table of the last runs again

Score = (killed + timeout) / (mutants - equivalent); "not run" are mutants a run that hit
``--limit`` did not get to (``--recheck`` runs them). A mutant is stopped after
``timeout_multiplier`` x the time of its tests, and a timeout counts as killed.

The survivors of each module (name, diff) are written to ``.mutmut/<module>/survivors.txt``.
The one invariant: a module's row counts only mutants of that module, each run against the
tests mutmut saw calling the mutated function, from the subset named here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutmut"
EQUIVALENT_FILE = Path(__file__).resolve().parent / "mutants_equivalent.txt"

# Tests that time the code under test: mutmut's trampolines slow every call down, so these
# would fail on the clean run or kill mutants for the wrong reason.
NOT_TIMING = "not is_fast"
PIPE_FAST = "not slow"
# test_step_equals_reference is 466 cases of schedule x K x M x remat; a spread of 20 keeps every
# schedule, remat mode and K in play at a fifth of the time.
PIPE_SUBSET = "not step_equals_reference or 4-8-always-0.3 or 2-8-except_last-0.0 or 3-8-never-0.3"


# the pipe tests that cover the item-count reduction: every schedule family once, both remat
# extremes, uneven items, plus the unit tests of the count itself
REDUCTION_SUBSET = (
    "not item_mean_equals or gpipe-always or 1f1b-never or zb-v-except_last or dualpipe-v-never"
)
# the planner's tests without the ones that train (schedule="auto", the trainer, the CLI runs)
PLANNER_FAST = "not trains and not gpipe_train and not trainer and not balance_of_the_wrong"
# the memory model's own tests (hand-computed terms, torch's optimizer state, the joint peak):
# the planner's ranking tests profile a transformer, 10 s a mutant, for little more
MEMORY_SUBSET = "mutants or memory_terms or optimizer_slots or joint_peak"
# the split backward's tests: every kind of layer, one schedule run per remat mode
WGRAD_SUBSET = "not mixed_model or zb-h1 or zb-v-3-6-always or interleaved-zb-4-4-never"


@dataclass
class Module:
    sources: tuple[str, ...]  # the files mutated together (one package's modules, say)
    tests: list[str]
    extra: list[str] = field(default_factory=list)  # pytest -k / -m for the subset
    # mutmut stops a mutant after (its tests' time + 1 s) x this (mutmut's default is 15): an
    # endless loop in a binary search, or a pipe mutant that loses a message and waits for the
    # transport's 300 s timeout, would otherwise cost minutes each
    timeout_multiplier: float = 5.0


def _files(package: str, *names: str) -> tuple[str, ...]:
    return tuple(f"src/gpipe/{package}/{n}.py" for n in names)


MODULES: dict[str, Module] = {
    "schedules": Module(
        _files("schedules", "actions", "codes", "ir", "named", "spec", "validate"),
        [
            "tests/schedules/test_schedules.py",
            "tests/planner/test_catalogue_core.py",
            "tests/schedules/test_schedules.py",
        ],
        ["-k", NOT_TIMING],
    ),
    "zero_bubble": Module(
        _files("schedules", "zero_bubble"),
        [
            "tests/schedules/test_schedules.py",
            "tests/models/test_formulas.py",
            "tests/test_mutants_zero_bubble.py",
        ],
        ["-k", f"{NOT_TIMING} and not trainer"],
    ),
    "dualpipe": Module(
        _files("schedules", "dualpipe"),
        ["tests/schedules/test_schedules.py", "tests/models/test_formulas.py", "tests/test_mutants_dualpipe.py"],
        ["-k", f"{NOT_TIMING} and not trainer"],
    ),
    "microbatch": Module(
        _files("base", "microbatch"),
        [
            "tests/base/test_microbatch.py",
            "tests/planner/test_catalogue_core.py",
            "tests/base/test_microbatch.py",
        ],
    ),
    "balance": Module(
        _files("planner", "balance"),
        ["tests/planner/test_balance.py", "tests/planner/test_catalogue_core.py", "tests/planner/test_balance.py"],
    ),
    "simulate": Module(
        _files("planner", "simulate"),
        [
            "tests/schedules/test_schedules.py",
            "tests/planner/test_catalogue_core.py",
            "tests/planner/test_simulate.py",
        ],
        ["-k", NOT_TIMING],
    ),
    "memory_model": Module(
        _files("planner", "memory_model"),
        ["tests/planner/test_autoplan.py", "tests/planner/test_memory_model.py"],
        ["-k", MEMORY_SUBSET],
    ),
    "autoplan": Module(
        _files("planner", "autoplan"),
        ["tests/planner/test_autoplan.py", "tests/test_mutants_autoplan.py"],
        ["-k", PLANNER_FAST],
    ),
    "rng": Module(_files("stage", "rng"), ["tests/stage/test_rng.py", "tests/stage/test_rng.py"]),
    "remat": Module(
        _files("stage", "remat"),
        ["tests/stage/test_remat.py", "tests/local/test_pipe.py", "tests/local/test_pipe_unusual.py"],
        ["-m", PIPE_FAST, "-k", PIPE_SUBSET],
        timeout_multiplier=3.0,
    ),
    "wgrad": Module(
        _files("stage", "wgrad", "wgrad_kinds"),
        ["tests/stage/test_wgrad.py", "tests/test_mutants_wgrad.py"],
        ["-m", PIPE_FAST, "-k", WGRAD_SUBSET],
        timeout_multiplier=3.0,
    ),
    "stage": Module(
        _files("stage", "stage"),
        ["tests/local/test_pipe.py", "tests/local/test_pipe_unusual.py", "tests/stage/test_stage.py"],
        ["-m", PIPE_FAST, "-k", PIPE_SUBSET],
        timeout_multiplier=3.0,
    ),
    "state": Module(
        _files("state", "folder", "read", "optim", "codec"),
        ["tests/state/test_checkpoint.py", "tests/test_mutants_state.py"],
        ["-k", "not sigkill"],  # a subprocess killed mid-save: seconds per mutant
    ),
    "capture": Module(
        _files("capture", "segment", "verify"),
        [
            "tests/capture/test_capture_errors.py",
            "tests/capture/test_capture_habits.py",
            "tests/capture/test_capture_meta.py",
            "tests/test_mutants_capture.py",
        ],
        ["-m", PIPE_FAST],
        timeout_multiplier=3.0,
    ),
    "reduction": Module(
        _files("core", "reduction"),
        ["tests/core/test_reduction.py", "tests/core/test_reduction_values.py"],
        ["-m", PIPE_FAST, "-k", f"({REDUCTION_SUBSET}) and not distributed and not tuning"],
        timeout_multiplier=3.0,
    ),
    "precision": Module(
        _files("core", "precision"),
        ["tests/core/test_precision.py", "tests/core/test_precision_values.py"],
        ["-k", "not one_rank"],  # two spawned ranks: 20 s per mutant
    ),
    "executor": Module(
        _files("core", "executor"),
        ["tests/local/test_pipe.py", "tests/local/test_pipe_unusual.py", "tests/core/test_executor.py"],
        ["-m", PIPE_FAST, "-k", PIPE_SUBSET],
        timeout_multiplier=3.0,
    ),
    "local": Module(
        _files("local", "workers"),
        ["tests/local/test_pipe.py", "tests/local/test_pipe_unusual.py", "tests/local/test_workers.py"],
        ["-m", PIPE_FAST, "-k", PIPE_SUBSET],
        timeout_multiplier=3.0,
    ),
}

KILLED = {1, 3}
TIMEOUT = {24, -24, 36, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


@dataclass
class Row:
    module: str
    mutants: int = 0
    killed: int = 0
    timeout: int = 0
    survived: int = 0
    no_tests: int = 0
    other: int = 0
    equivalent: int = 0
    cuda_only: int = 0  # of the equivalent ones: differ only on a GPU, which CI lacks
    seconds: float = 0.0
    survivors: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        judged = self.mutants - self.equivalent
        return 100.0 * (self.killed + self.timeout) / judged if judged else 100.0


def load_equivalents() -> dict[str, list[tuple[str, str, str]]]:
    """``module | function | mutated line (stripped) | reason`` per line; ``#`` comments."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    if not EQUIVALENT_FILE.exists():
        return out
    for raw in EQUIVALENT_FILE.read_text().splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        module, function, rest = (part.strip() for part in raw.split(" | ", 2))
        line, reason = (part.strip() for part in rest.rsplit(" | ", 1))  # a line may hold " | "
        out.setdefault(module, []).append((function, line, reason))
    return out


def mutant_function(name: str) -> str:
    """``gpipe.schedules.x_gpipe__mutmut_3`` -> ``gpipe``; methods keep ``Class.method``."""
    tail = name.split("__mutmut_")[0].rsplit(".", 1)[-1]
    tail = tail.replace("ǁ", ".").lstrip(".")
    return re.sub(r"^x[_.]", "", tail)


def equivalent(mutant: str, diff: str, equivalents: list[tuple[str, str, str]]) -> str | None:
    """The reason ``mutant`` is listed as equivalent, or ``None``."""
    function, lines = mutant_function(mutant), added_lines(diff)
    return next((r for f, ln, r in equivalents if f == function and ln in lines), None)


def added_lines(diff: str) -> list[str]:
    return [
        ln[1:].strip()
        for ln in diff.splitlines()
        if ln.startswith("+") and not ln.startswith("+++")
    ]


IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")


def prepare(name: str, mod: Module, fresh: bool = True, tests: list[str] | None = None) -> Path:
    """A scratch copy: src/ (fresh runs only), tests/, and a pyproject.toml with this module's
    mutmut config."""
    work = WORK / name
    if fresh:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        shutil.copytree(ROOT / "src", work / "src", ignore=IGNORE)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=IGNORE, dirs_exist_ok=True)
    tests = list(dict.fromkeys(t for t in (tests or mod.tests) if (ROOT / t).exists()))
    config = {
        "source_paths": ["src"],
        "only_mutate": list(mod.sources),
        "pytest_add_cli_args_test_selection": tests,
        # -m "": the slow tests too (pyproject's addopts leave them out); a module's own -m wins
        "pytest_add_cli_args": [
            "-p",
            "no:cacheprovider",
            "--hypothesis-seed=0",
            "-m",
            "",
            *mod.extra,
        ],
        "use_git_change_detection": False,
        "timeout_multiplier": mod.timeout_multiplier,
    }
    text = (ROOT / "pyproject.toml").read_text()
    text += "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
    (work / "pyproject.toml").write_text(text)
    return work


DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
paths = json.loads(sys.stdin.read())
print(json.dumps({n: get_diff_for_mutant(n, path=p) for n, p in paths.items()}))
"""


def source_of(mod: Module, mutant: str) -> str:
    """The file of ``mod.sources`` that ``mutant`` (``gpipe.stage.wgrad.x_f__mutmut_3``) is of."""
    dotted = {
        src.removeprefix("src/").removesuffix(".py").replace("/", "."): src for src in mod.sources
    }
    return dotted[mutant.split("__mutmut_")[0].rpartition(".")[0]]


def mutant_diffs(work: Path, mod: Module, names: list[str]) -> dict[str, str]:
    """Each mutant's diff, from mutmut, in one process."""
    if not names:
        return {}
    out = subprocess.run(
        [sys.executable, "-c", DIFFS],
        cwd=work,
        input=json.dumps({n: source_of(mod, n) for n in names}),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def collect(name: str, mod: Module, work: Path, equivalents: list[tuple[str, str, str]]) -> Row:
    row = Row(name)
    codes = read_codes(mod, work)
    if codes is None:
        return row
    if (work / "seconds").exists():
        row.seconds = float((work / "seconds").read_text())
    report = []
    diffs = mutant_diffs(work, mod, [k for k, c in codes.items() if c not in KILLED | TIMEOUT])
    for mutant, code in sorted(codes.items()):
        row.mutants += 1
        if code in KILLED:
            row.killed += 1
            continue
        if code in TIMEOUT:
            row.timeout += 1
            continue
        diff = diffs.get(mutant, "")
        reason = equivalent(mutant, diff, equivalents)
        if reason is not None:
            row.equivalent += 1
            row.cuda_only += "CUDA" in reason
            report.append(f"## {mutant}: equivalent ({reason})\n{diff}\n")
            continue
        if code in SURVIVED:
            row.survived += 1
        elif code in NO_TESTS:
            row.no_tests += 1
        else:
            row.other += 1
        row.survivors.append(mutant)
        report.append(f"## {mutant}: code {code}\n{diff}\n")
    (work / "survivors.txt").write_text("\n".join(report))
    return row


def meta_path(source: str, work: Path) -> Path:
    return work / "mutants" / (source + ".meta")


def read_codes(mod: Module, work: Path) -> dict[str, int | None] | None:
    """Every mutant of the module's files and its exit code (``None``: not run), or ``None``
    when no run left any."""
    metas = [meta_path(src, work) for src in mod.sources if meta_path(src, work).exists()]
    if not metas:
        return None
    return {k: c for m in metas for k, c in json.loads(m.read_text())["exit_code_by_key"].items()}


def write_codes(mod: Module, work: Path, codes: dict[str, int | None]) -> None:
    """Put ``codes`` back into the meta files of the mutants' own source files."""
    for src in mod.sources:
        path = meta_path(src, work)
        if path.exists():
            data = json.loads(path.read_text())
            data["exit_code_by_key"] = {k: codes[k] for k in data["exit_code_by_key"]}
            path.write_text(json.dumps(data, indent=4))


def run_module(name: str, children: int, limit: int, equivalents: list, recheck: bool) -> Row:
    """Run every mutant of a module; with ``recheck``, only the last run's survivors, against the
    current tests (a survivor can only be killed by added tests; killed ones stay killed), as
    long as the module's source is the one that run mutated."""
    mod = MODULES[name]
    work = WORK / name
    old: dict[str, int | None] = {}
    last = read_codes(mod, work) if recheck else None
    if last is not None:
        changed = [s for s in mod.sources if (ROOT / s).read_bytes() != (work / s).read_bytes()]
        if changed:
            print(f"{name}: {changed[0]} changed since the last run; running all", file=sys.stderr)
        else:
            old = last
    again = sorted(k for k, c in old.items() if c not in KILLED | TIMEOUT)
    if again:  # equivalent ones need no second run
        diffs = mutant_diffs(work, mod, again)
        again = [k for k in again if equivalent(k, diffs.get(k, ""), equivalents) is None]
    if old and not again:
        return collect(name, mod, work, equivalents)
    # a survivor lived through every old test: only this module's new test file can kill it;
    # mutants the last run did not get to need them all
    unfinished = None in old.values()
    # (a module without its own file yet: the whole subset again, never an empty selection,
    # which pytest would read as every test)
    own = [t for t in mod.tests if "test_mutants_" in t and (ROOT / t).exists()]
    narrow = old and own and not unfinished
    work = prepare(name, mod, fresh=not old, tests=own if narrow else None)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    start = time.monotonic()
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *again]
    log = (work / "run.log").open("w")
    try:
        subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"{name}: stopped after {limit} s; partial counts", file=sys.stderr)
    finally:
        log.close()
    if old:  # keep the earlier verdicts of the mutants not run again
        new = read_codes(mod, work) or {}
        write_codes(
            mod,
            work,
            {
                k: (
                    new.get(k)
                    if k in again and (c is None or new.get(k) in KILLED | TIMEOUT)
                    else c
                )
                for k, c in old.items()
            },
        )
    seconds = time.monotonic() - start
    (work / ("recheck_seconds" if old else "seconds")).write_text(f"{seconds:.0f}\n")
    return collect(name, mod, work, equivalents)


def table(rows: list[Row]) -> str:
    head = (
        "| module | mutants | killed | timeout | survived | no tests | not run "
        "| equivalent (CUDA-only) | score | time |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r.module} | {r.mutants} | {r.killed} | {r.timeout} | {r.survived} | "
            f"{r.no_tests} | {r.other} | {r.equivalent} ({r.cuda_only}) | {r.score:.1f}% | "
            f"{r.seconds:.0f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--limit", type=int, default=1800, help="seconds per module")
    parser.add_argument("--target", type=float, default=90.0, help="fail below this score")
    parser.add_argument("--list", action="store_true")
    parser.add_argument(
        "--recheck", action="store_true", help="run only the last run's survivors, current tests"
    )
    parser.add_argument("--report-only", action="store_true", help="re-read .mutmut/, run nothing")
    args = parser.parse_args(argv)
    if args.list:
        for name, mod in MODULES.items():
            print(f"{name:12} {' '.join(mod.sources)}\n{'':12} {' '.join(mod.tests + mod.extra)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown modules {unknown}; known: {', '.join(MODULES)}")
    equivalents = load_equivalents()
    rows = []
    for name in args.modules or list(MODULES):
        if args.report_only:
            row = collect(name, MODULES[name], WORK / name, equivalents.get(name, []))
        else:
            row = run_module(
                name, args.children, args.limit, equivalents.get(name, []), args.recheck
            )
        rows.append(row)
        print(f"{name}: {row.score:.1f}% ({row.seconds:.0f} s)", file=sys.stderr, flush=True)
    print(table(rows))
    for r in rows:
        if r.survivors:
            print(
                f"{r.module}: {len(r.survivors)} survivors, diffs in .mutmut/{r.module}/survivors.txt"
            )
    return 0 if all(r.score >= args.target for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
