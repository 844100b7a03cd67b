#!/usr/bin/env python
"""Mutation testing of the core modules with mutmut 3 (not part of the default test run).

    pip install -e '.[dev,mutation]'
    python tools/mutation.py --jobs 16                      # all core files, writes docs/mutation.md + .json
    python tools/mutation.py --files optimizer/budget.py    # one file; the report keeps the other files' rows

mutmut reads its configuration only from ``pyproject.toml`` in the working directory and copies the
project into ``<cwd>/mutants/``.  To give every source file its own test selection (and to let files run
side by side), this script builds one working directory per file under ``build/mutation/<file>/``:

* ``optimizer``, ``runtime``, ``profiling``, ``experiments`` and ``tests`` are symlinks to the repository;
  mutmut copies them into ``mutants/`` and mutates only the one file (``only_mutate``);
* ``pyproject.toml`` is the repository's file with the ``[tool.mutmut]`` table replaced by the per-file
  one (the pytest options, ``-m 'not slow'`` included, carry over unchanged);
* every other top-level entry of the repository (``models``, ``examples``, ``docs``, ...) is symlinked
  into ``mutants/`` so tests that read ``Path(__file__).parents[2] / "models"`` find their data.

mutmut runs each mutant only against the tests that executed the mutated function while it collected
its stats (a first run of the file's whole selection), so a broad selection costs one run, not one per
mutant.  Results are cached in the working directory: a rerun only tests mutants of changed functions
(``--fresh`` starts over).  See docs/mutation.md for the method, the score and the known limitations.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ["optimizer", "runtime", "profiling", "experiments"]
EQUIVALENT_FILE = ROOT / "tools" / "mutation_equivalent.json"  # --equivalents

#: Source file -> the test files that exercise it (direct importers found with ``grep -l``, plus the tests
#: written for the file).  Missing test files are skipped with a warning, so the map may name tests that
#: do not exist yet.  mutmut narrows each mutant down to the tests that actually call the function.
TESTS: dict[str, list[str]] = {
    "optimizer/formulation/constraints.py": [
        "tests/optimizer/test_formulation.py", "tests/optimizer/test_lagrangian_identity.py",
        "tests/optimizer/test_baselines.py", "tests/optimizer/test_prune_curve.py",
        "tests/optimizer/test_time_limits.py",
    ],
    "optimizer/byte_model.py": [
        "tests/optimizer/test_byte_model.py", "tests/optimizer/test_byte_counts_by_hand.py",
        "tests/optimizer/test_byte_model_exact.py", "tests/optimizer/test_formulation.py",
        "tests/optimizer/test_baselines.py", "tests/optimizer/test_llamacpp_mixes.py", "tests/profiling/test_refine.py",
    ],
    "optimizer/formulation/decomposition.py": [
        "tests/optimizer/test_decomposition_parts.py", "tests/optimizer/test_decomposition_exact.py",
        "tests/optimizer/test_formulation.py",
        "tests/optimizer/test_lagrangian_identity.py", "tests/optimizer/test_baselines.py",
        "tests/optimizer/test_cli.py", "tests/optimizer/test_prune_curve.py", "tests/optimizer/test_time_limits.py",
    ],
    "optimizer/formats.py": [
        "tests/optimizer/test_formats_exact.py",
        "tests/optimizer/test_byte_model.py", "tests/runtime/test_quant.py", "tests/optimizer/test_contracts.py",
        "tests/optimizer/test_formulation.py", "tests/optimizer/test_baselines.py", "tests/profiling/test_calibrate.py",
        "tests/profiling/test_cli.py", "tests/profiling/test_run.py",
    ],
    "optimizer/budget.py": [
        "tests/optimizer/test_budget_units.py", "tests/optimizer/test_budget_exact.py",
        "tests/optimizer/test_byte_counts_by_hand.py",
        "tests/optimizer/test_cli.py", "tests/optimizer/test_bounded_input.py", "tests/optimizer/test_formulation.py",
        "tests/optimizer/test_baselines.py", "tests/optimizer/test_llamacpp_mixes.py",
        "tests/optimizer/test_prune_curve.py", "tests/optimizer/test_time_limits.py", "tests/profiling/test_refine.py",
        "tests/profiling/test_run.py", "tests/profiling/test_prune_curve.py",
    ],
    "runtime/quant/intq.py": [
        "tests/runtime/test_intq_golden.py", "tests/runtime/test_intq_exact.py", "tests/runtime/test_quant.py",
        "tests/runtime/test_gptq.py",
    ],
    "runtime/moe.py": [
        "tests/runtime/test_moe.py", "tests/runtime/test_moe_exact.py", "tests/runtime/test_moe_surgery.py",
        "tests/runtime/test_apply.py",
        "tests/runtime/test_export.py", "tests/runtime/test_gptq.py", "tests/profiling/test_run.py",
    ],
    "profiling/stats.py": [
        "tests/profiling/test_stats_hand.py", "tests/profiling/test_stats_exact.py", "tests/profiling/test_run.py",
        "tests/profiling/test_cli.py",
    ],
    "runtime/apply.py": [
        "tests/runtime/test_apply_refusals.py", "tests/runtime/test_moe_surgery.py", "tests/runtime/test_apply.py",
        "tests/runtime/test_load_tied.py", "tests/runtime/test_reliability.py", "tests/runtime/test_gptq.py",
    ],
    # second wave (issue 15): run with --files or --all
    "profiling/calibrate.py": ["tests/profiling/test_calibrate.py"],
    "profiling/prune_curve.py": ["tests/profiling/test_prune_curve.py", "tests/optimizer/test_prune_curve.py"],
    "optimizer/formulation/objectives.py": [
        "tests/optimizer/test_formulation.py", "tests/optimizer/test_lagrangian_identity.py",
        "tests/optimizer/test_cli.py", "tests/optimizer/test_prune_curve.py", "tests/profiling/test_prune_curve.py",
    ],
}
CORE = list(TESTS)[:9]

# mutmut exit code -> our column (mutmut.stats.status_by_exit_code, grouped)
DETECTED = {"killed", "timeout", "segfault"}
#: "not checked": not run yet (an interrupted run, or --mutants); "other": suspicious, interrupted, skipped
COLUMNS = ["killed", "timeout", "segfault", "survived", "no tests", "not checked", "other"]

# Threads for the numeric libraries in every test process: with --jobs mutants running at once, the
# default (one thread per core in each of them) only oversubscribes the machine.
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                 "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


def slug(path: str) -> str:
    return path.replace("/", "__").removesuffix(".py")


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in items) + "]"


def mutmut_table(file: str, tests: list[str], args: argparse.Namespace) -> str:
    return "\n".join([
        "[tool.mutmut]",
        f"source_paths = {toml_list(SOURCE_PACKAGES)}",
        f"only_mutate = {toml_list([file])}",
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}",
        # pytest's cache would be written into the symlinked tests/ otherwise; -p no:randomly is mutmut's own
        f"pytest_add_cli_args = {toml_list(['-p', 'no:cacheprovider'])}",
        # torch is not fork-safe once its thread pools run: fork the mutants from a clean server process
        'process_isolation = "forkserver"',
        f"timeout_multiplier = {float(args.timeout_multiplier)}",
        f"timeout_constant = {float(args.timeout_constant)}",
        "use_git_change_detection = false",
        'on_dependency_change = "ignore"',
        "",
    ])


def strip_table(text: str, name: str) -> str:
    """``text`` without the TOML table ``[name]`` (header up to the next table header)."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if re.match(r"^\s*\[", line):
            skipping = line.strip() == f"[{name}]"
        if not skipping:
            out.append(line)
    return "".join(out).rstrip() + "\n"


def prepare_workdir(file: str, tests: list[str], args: argparse.Namespace) -> Path:
    work = Path(args.workdir).resolve() / slug(file)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in [*SOURCE_PACKAGES, "tests"]:
        link = work / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)
    pyproject = strip_table((ROOT / "pyproject.toml").read_text(), "tool.mutmut")
    pyproject += "\n" + mutmut_table(file, tests, args)
    if not (work / "pyproject.toml").exists() or (work / "pyproject.toml").read_text() != pyproject:
        (work / "pyproject.toml").write_text(pyproject)
    mutants = work / "mutants"
    mutants.mkdir(exist_ok=True)
    skip = {*SOURCE_PACKAGES, "tests", "pyproject.toml", "build", "mutants", "dist"}
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in skip or entry.name.endswith(".egg-info"):
            continue
        link = mutants / entry.name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())
    return work


def run_file(file: str, children: int, args: argparse.Namespace) -> dict:
    tests = [t for t in TESTS.get(file, []) if (ROOT / t).exists()] if not args.tests else args.tests
    tests = [t for t in tests if t not in (args.skip_tests or [])]
    missing = [t for t in TESTS.get(file, []) if not (ROOT / t).exists()] if not args.tests else []
    if args.report_only:  # read the cache as it is; the test list comes from the previous report
        return {"file": file, "tests": tests, "mutmut_rc": None, "wall_s": 0.0, "children": children,
                "mutants": collect(file, Path(args.workdir).resolve() / slug(file))}
    if missing:
        print(f"[{file}] test files not found, skipped: {' '.join(missing)}", flush=True)
    if not tests:
        raise SystemExit(f"{file}: no test files to run")
    work = prepare_workdir(file, tests, args)
    log = work / "mutmut.log"
    env = {**os.environ, **THREAD_ENV, "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.argv[0] = 'mutmut'; cli()",
           "run", "--max-children", str(children), *(args.mutants or [])]
    print(f"[{file}] mutmut run with {children} children, tests: {' '.join(tests)} (log: {log})", flush=True)
    start = time.monotonic()
    with open(log, "w") as out:
        # its own process group, so that a timeout or Ctrl-C also stops mutmut's fork server and workers
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.file_timeout or None)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as stop:
            stop_group(proc)
            if isinstance(stop, KeyboardInterrupt):
                raise
            rc = "file timeout"
    wall = time.monotonic() - start
    mutants = collect(file, work)
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        print(f"[{file}] mutmut exited with {rc}; end of {log}:\n{tail}", flush=True)
    result = {"file": file, "tests": tests, "mutmut_rc": rc, "wall_s": round(wall, 1), "children": children,
              "mutants": mutants}
    summarize(result, load_equivalents())
    print(f"[{file}] {result['summary']} in {wall:.0f}s", flush=True)
    return result


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT (mutmut saves its results and stops), then SIGKILL what is left of the process group."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def collect(file: str, work: Path) -> list[dict]:
    """Statuses and diffs of all mutants of ``file``, read through mutmut's own code in ``work``."""
    if not (work / "mutants" / (file + ".meta")).exists():
        return []
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_dump", file], cwd=work,
                         capture_output=True, text=True, env={**os.environ, **THREAD_ENV})
    if out.returncode != 0:
        raise RuntimeError(f"reading mutmut results of {file} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def _dump(file: str) -> None:
    """Run inside a working directory: print [{name, status, id, function, line, diff, duration}] as JSON."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    source = Path(file).read_text()
    lines = source.splitlines()
    spans: dict[str, tuple[int, int]] = {}

    def visit(body: list[ast.stmt], prefix: str = "") -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                spans.setdefault(prefix + node.name, (first, node.end_lineno or node.lineno))
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")

    visit(ast.parse(source).body)
    data = SourceFileMutationData(path=Path(file))
    data.load()
    rows = []
    for name, code in data.exit_code_by_key.items():
        func, cls = orig_function_and_class_names_from_key(name)
        qual = f"{cls}.{func}" if cls else func
        diff = get_diff_for_mutant(name, path=Path(file))
        changed = [d for d in diff.splitlines()[2:] if d[:1] in "+-"]
        key = "\n".join(d[0] + d[1:].strip() for d in changed)
        line = None
        start, end = spans.get(qual, (1, len(lines)))
        removed = [d[1:] for d in changed if d.startswith("-")]
        hunk = re.search(r"^@@ -(\d+)", diff, re.M)
        guess = start + (int(hunk.group(1)) - 1 if hunk else 0)
        if removed:
            hits = [i + 1 for i in range(start - 1, min(end, len(lines))) if lines[i].strip() == removed[0].strip()]
            if hits:
                line = min(hits, key=lambda n: abs(n - guess))
        rows.append({
            "name": name,
            "id": f"{file}:{qual}:{hashlib.sha1(key.encode()).hexdigest()[:10]}",
            "function": qual,
            "line": line or start,
            "status": status_by_exit_code[code],
            "exit_code": code,
            "diff": "\n".join(diff.splitlines()[2:]),
        })
    json.dump(rows, sys.stdout)


def load_equivalents() -> dict[str, dict]:
    if not EQUIVALENT_FILE.exists():
        return {}
    entries = json.loads(EQUIVALENT_FILE.read_text())["equivalent"]
    for e in entries:
        if not e.get("reason"):
            raise SystemExit(f"{EQUIVALENT_FILE}: equivalent mutant {e.get('id')} has no reason")
    return {e["id"]: e for e in entries}


def changed_lines(diff: str) -> list[str]:
    return [d for d in diff.splitlines() if d[:1] in "+-"]


def summarize(result: dict, equivalents: dict[str, dict]) -> None:
    counts = dict.fromkeys([*COLUMNS, "equivalent"], 0)
    for m in result["mutants"]:
        m["equivalent"] = m["id"] in equivalents
        if m["equivalent"]:
            m["equivalent_reason"] = equivalents[m["id"]]["reason"]
            counts["equivalent"] += 1
            continue
        counts[m["status"] if m["status"] in COLUMNS else "other"] += 1
    total = len(result["mutants"])
    detected = sum(counts[c] for c in DETECTED)
    denominator = total - counts["equivalent"] - counts["not checked"]  # a partial run scores what it ran
    result["counts"] = {"mutants": total, **counts, "detected": detected}
    result["score"] = round(detected / denominator, 4) if denominator else None
    result["summary"] = (f"{total} mutants, {detected} detected, {counts['survived']} survived, "
                         f"{counts['no tests']} without tests, {counts['equivalent']} equivalent, "
                         f"{counts['not checked']} not checked: score "
                         + (f"{100 * result['score']:.1f}%" if result["score"] is not None else "n/a"))


def write_report(results: dict[str, dict], md: Path, js: Path, args: argparse.Namespace) -> None:
    equivalents = load_equivalents()
    for r in results.values():
        summarize(r, equivalents)
    order = [f for f in TESTS if f in results] + sorted(f for f in results if f not in TESTS)
    for r in results.values():  # the JSON keeps the context lines of the undetected mutants only
        for m in r["mutants"]:
            if m["status"] in DETECTED | {"not checked"}:
                m["diff"] = "\n".join(changed_lines(m["diff"]))
    js.write_text(json.dumps({"tool": "mutmut", "results": [results[f] for f in order]}, indent=1) + "\n")
    rows = []
    for f in order:
        r, c = results[f], results[f]["counts"]
        score = f"{100 * r['score']:.1f}%" if r["score"] is not None else "n/a"
        if c["not checked"]:
            score += " (partial)"
        rows.append(f"| `{f}` | {c['mutants']} | {c['killed']} | {c['timeout'] + c['segfault']} | {c['survived']} "
                    f"| {c['no tests']} | {c['not checked'] or ''} | {c['other'] or ''} | {c['equivalent']} "
                    f"| **{score}** | {r.get('date', '')} "
                    f"| {r['wall_s']:.0f} s / {r['children']} |")
    out = [
        "<!-- generated by tools/mutation.py: the table and the lists below are rewritten on every run -->",
        "## Latest scores",
        "",
        "score = (killed + timeout/crash) / (mutants - equivalent - not checked). *No tests*: no selected test "
        "runs the mutated function (counted as not detected). *Not checked*: not run (a partial run). "
        "The test files each file ran are listed under *Surviving mutants*.",
        "",
        "| file | mutants | killed | timeout/crash | survived | no tests | not checked | other | equivalent | score "
        "| date | wall / jobs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        "## Surviving mutants",
        "",
        "Mutants that no test detected and that are not listed as equivalent (`tools/mutation_equivalent.json`). "
        "Each is a missing assertion, or an equivalent mutant to add to the list with its reason.",
        "",
    ]
    for f in order:
        alive = [m for m in results[f]["mutants"]
                 if not m["equivalent"] and m["status"] not in DETECTED | {"not checked"}]
        out.append(f"### `{f}` ({len(alive)})")
        out.append("")
        out += [f"Tests: {' '.join(results[f]['tests'])}", ""]
        for m in sorted(alive, key=lambda m: (m["line"], m["name"])):
            out += [f"- `{f}:{m['line']}` {m['status']}, `{m['function']}`, id `{m['id']}` (mutmut `{m['name']}`)",
                    "", "  ```diff", *("  " + d for d in changed_lines(m["diff"])), "  ```", ""]
        if not alive:
            out += ["none", ""]
    out += ["## Equivalent mutants", "",
            "Listed in `tools/mutation_equivalent.json` by id (`file:function:hash of the changed lines`); "
            "excluded from the score.", ""]
    listed = [(f, m) for f in order for m in results[f]["mutants"] if m["equivalent"]]
    for f, m in listed:
        out += [f"- `{f}:{m['line']}` `{m['id']}`: {m['equivalent_reason']}", "",
                "  ```diff", *("  " + d for d in changed_lines(m["diff"])), "  ```", ""]
    known = {m["id"] for _, m in listed}
    stale = [e for e in equivalents.values() if e["id"].split(":")[0] in results and e["id"] not in known]
    for e in stale:
        out += [f"- stale entry (no such mutant any more): `{e['id']}`", ""]
    if not listed and not stale:
        out += ["none", ""]
    generated = "\n".join(out).rstrip() + "\n"
    marker = "<!-- generated by tools/mutation.py"
    head = md.read_text().split(marker)[0] if md.exists() else "# Mutation testing\n\n"
    md.write_text(head.rstrip() + "\n\n" + generated)


def main() -> None:
    global EQUIVALENT_FILE
    if len(sys.argv) == 3 and sys.argv[1] == "_dump":
        _dump(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="+", help=f"source files (default: the nine core files: {' '.join(CORE)})")
    p.add_argument("--all", action="store_true", help="every file of the test map (core and second wave)")
    p.add_argument("--tests", nargs="+", help="override the test selection (for a quick trial of one file)")
    p.add_argument("--skip-tests", nargs="+", metavar="TEST_FILE",
                   help="leave these test files out of every selection (e.g. tests/optimizer/test_time_limits.py on a "
                   "machine without the CBC / CP-SAT backends); the report lists each file's selection")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                   help="mutants tested at once, in all (default: the number of cores)")
    p.add_argument("--parallel-files", type=int, default=1,
                   help="files run side by side, sharing --jobs (their stats runs overlap; default 1)")
    p.add_argument("--mutants", nargs="+", metavar="NAME",
                   help="(re)test only these mutmut mutant names or globs, e.g. 'optimizer.budget.x_parse_bytes*'")
    p.add_argument("--timeout-multiplier", type=float, default=10.0,
                   help="per-mutant wall timeout = (time of its tests in the stats run + constant) * multiplier")
    p.add_argument("--timeout-constant", type=float, default=5.0, help="seconds, see --timeout-multiplier")
    p.add_argument("--file-timeout", type=float, default=0, help="stop a file's mutmut run after this many seconds")
    p.add_argument("--workdir", default=str(ROOT / "build" / "mutation"), help="mutmut working directories (cached)")
    p.add_argument("--fresh", action="store_true", help="delete the cached working directories first")
    p.add_argument("--report-only", action="store_true", help="do not run mutmut, rebuild the report from the cache")
    p.add_argument("--out", default=str(ROOT / "docs" / "mutation.md"), help="markdown report")
    p.add_argument("--json", default=None, help="raw results (default: the --out path with .json)")
    p.add_argument("--equivalents", default=str(EQUIVALENT_FILE), help="list of equivalent mutants (JSON)")
    args = p.parse_args()
    EQUIVALENT_FILE = Path(args.equivalents)
    try:
        import mutmut  # noqa: F401
    except ImportError:
        raise SystemExit("mutmut is not installed: pip install -e '.[mutation]'")
    files = args.files or (list(TESTS) if args.all else CORE)
    for f in files:
        if not (ROOT / f).is_file():
            raise SystemExit(f"no such file: {f}")
    md = Path(args.out)
    js = Path(args.json) if args.json else md.with_suffix(".json")
    previous = {}
    if js.exists():
        previous = {r["file"]: r for r in json.loads(js.read_text()).get("results", [])}
    k = max(1, min(args.parallel_files, len(files)))
    children = max(1, args.jobs // k)
    start = time.monotonic()
    with ThreadPoolExecutor(k) as pool:
        done = list(pool.map(lambda f: run_file(f, children, args), files))
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    for r in done:
        r["date"] = today
        if args.report_only and r["file"] in previous:  # the run that made the cached results
            r.update({k: previous[r["file"]][k] for k in ("date", "tests", "wall_s", "children", "mutmut_rc")
                      if k in previous[r["file"]]})
        previous[r["file"]] = r
    write_report(previous, md, js, args)
    print(f"wrote {md} and {js} in {time.monotonic() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
