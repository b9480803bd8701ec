#!/usr/bin/env python3
"""Apply each deliberate bug of mutants.py to a temporary copy of the repo, run its tests, and
print which were caught. Not part of CI (minutes, not seconds); docs/testing.md has its last result.

    .venv/bin/python tests/mutations/run.py                 # every curated mutant
    .venv/bin/python tests/mutations/run.py --only fold-undo-half,outlier-dropped-in-hook
    .venv/bin/python tests/mutations/run.py --list
    .venv/bin/python tests/mutations/run.py --keep          # leave the copy for a look
    .venv/bin/python tests/mutations/run.py --mutmut        # mutmut on MUTMUT_MODULES instead

How it runs (the fastest correct way found): the repo's tracked and untracked-not-ignored files
are copied once into a temporary folder (models/ is linked, never written). A sitecustomize.py
put first on PYTHONPATH removes scikit-build-core's editable finder (which otherwise sends every
`import vhr_edge` to the original checkout, ahead of PYTHONPATH), so pytest and every
`python -m vhr_edge.cli` child it starts import the copy. Python mutants use the already built
native extension, copied in. C++ mutants rebuild it in the copy with CMake + Ninja (configured
once, no LTO; later rebuilds only recompile the mutated file and relink) against the same
llama-cpp-python. Each mutant is applied as an exact search/replace pair that must match once
(a mutant whose search text no longer occurs is reported "stale", not silently skipped), its
test files run with `pytest -x`, and the file is restored. A baseline run of all the listed
tests on the unmutated copy comes first: a failing baseline stops the run.
Exit status: 0 when every applicable mutant was caught, 1 otherwise.

--mutmut runs mutmut (pip install mutmut, 3.x) on the pure-Python core (MUTMUT_MODULES) in the
same kind of copy, with a setup.cfg [mutmut] section written there (the repo's pyproject.toml
stays as it is), and prints its counts: mutmut mutates every operator, constant and string, so
its score includes equivalent mutants and message wording; the curated list above is the goal
(every mutant caught), mutmut's survivors are a list to read.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mutants import MUTANTS, Mutant  # noqa: E402

REPO = HERE.parent.parent
SITECUSTOMIZE = '''\
# written by tests/mutations/run.py: import vhr_edge from this copy, not the editable checkout
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
'''


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def repo_files() -> list[str]:
    out = sh(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True).stdout
    return [f for f in out.split("\0") if f]


class Copy:
    def __init__(self, root: Path, python: str):
        self.root = root
        self.repo = root / "repo"
        self.site = root / "site"
        self.build = root / "build"
        self.python = python
        self.engine_so: Path | None = None
        self.pristine_so: Path | None = None
        self.configured = False

    def make(self) -> None:
        for f in repo_files():
            if f.startswith("models/") or not (REPO / f).is_file():
                continue
            dst = self.repo / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst)
        if (REPO / "models").is_dir():
            (self.repo / "models").symlink_to(REPO / "models")
        self.site.mkdir(parents=True, exist_ok=True)
        (self.site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        so = sh([self.python, "-c", "import vhr_edge._engine as e; print(e.__file__)"], cwd=REPO, check=True)
        src = Path(so.stdout.strip())
        self.engine_so = self.repo / "vhr_edge" / src.name
        self.pristine_so = self.root / src.name
        shutil.copy2(src, self.pristine_so)
        shutil.copy2(src, self.engine_so)
        check = sh([self.python, "-c", "import vhr_edge, vhr_edge._engine as e; print(vhr_edge.__file__, e.__file__)"],
                   cwd=self.root, env=self.env())
        if str(self.repo) not in check.stdout or check.stdout.count(str(self.repo)) != 2:
            raise SystemExit(f"the copy is not what Python imports: {check.stdout}{check.stderr}")

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
        env["PYTHONPATH"] = os.pathsep.join([str(self.site), str(self.repo)])
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["VHR_EDGE_REQUIRE_ORACLE"] = os.environ.get("VHR_EDGE_REQUIRE_ORACLE", "1")
        return env

    def rebuild(self) -> tuple[bool, str]:
        """Build the extension from the copy's native/ (incremental after the first time)."""
        if not self.configured:
            pyb = sh([self.python, "-m", "pybind11", "--cmakedir"], check=True).stdout.strip()
            r = sh(["cmake", "-S", str(self.repo), "-B", str(self.build), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={self.python}", f"-Dpybind11_DIR={pyb}",
                    "-DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF"])
            if r.returncode:
                return False, r.stdout[-2000:] + r.stderr[-2000:]
            self.configured = True
        r = sh(["cmake", "--build", str(self.build), "-j", str(os.cpu_count() or 2)])
        if r.returncode:
            return False, (r.stdout + r.stderr)[-3000:]
        shutil.copy2(next(self.build.glob("_engine*.so")), self.engine_so)
        return True, ""

    def restore_so(self) -> None:
        shutil.copy2(self.pristine_so, self.engine_so)

    def pytest(self, tests: list[str], timeout: float) -> tuple[int, str, float]:
        t0 = time.monotonic()
        cmd = [self.python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
        try:
            r = subprocess.run(cmd, cwd=self.repo, env=self.env(), text=True, capture_output=True, timeout=timeout)
            return r.returncode, r.stdout + r.stderr, time.monotonic() - t0
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return -1, out, time.monotonic() - t0


def apply(copy: Copy, m: Mutant) -> str | None:
    """Write the mutated file into the copy; None when the search text is not there exactly once."""
    original = (REPO / m.file).read_text()
    n = original.count(m.search)
    if n != 1:
        return None
    mutated = original.replace(m.search, m.replace, 1)
    if m.file.endswith(".py"):
        compile(mutated, m.file, "exec")  # a mutant must be a program, not a syntax error
    (copy.repo / m.file).write_text(mutated)
    return original


MUTMUT_MODULES = ("vhr_edge/eval/chair.py", "vhr_edge/profile_rule.py")
MUTMUT_TESTS = ("tests/test_eval_chair.py", "tests/test_eval_run.py", "tests/test_calibrate.py",
                "tests/test_calibrate_bootstrap.py", "tests/test_eval_values.py::test_chair_summary_by_hand")


def run_mutmut(copy: Copy, max_children: int) -> int:
    import json

    exe = Path(copy.python).parent / "mutmut"
    if not exe.exists():
        print(f"mutmut is not installed for {copy.python}: pip install 'mutmut>=3.8'")
        return 2
    lines = ["[mutmut]", "source_paths=", "    vhr_edge", "only_mutate="]
    lines += [f"    {m}" for m in MUTMUT_MODULES]
    lines += ["pytest_add_cli_args_test_selection="] + [f"    {t}" for t in MUTMUT_TESTS]
    lines += ["pytest_add_cli_args=", "    -p", "    no:cacheprovider", ""]
    (copy.repo / "setup.cfg").write_text("\n".join(lines))
    t0 = time.monotonic()
    r = subprocess.run([str(exe), "run", "--max-children", str(max_children)], cwd=copy.repo, env=copy.env(),
                       text=True, capture_output=True)
    if r.returncode:
        print((r.stdout + r.stderr)[-4000:])
        return r.returncode
    sh([str(exe), "export-cicd-stats"], cwd=copy.repo, env=copy.env(), check=True)
    stats = json.loads((copy.repo / "mutants" / "mutmut-cicd-stats.json").read_text())
    survivors = sh([str(exe), "results"], cwd=copy.repo, env=copy.env()).stdout
    print(survivors)
    covered = stats["total"] - stats["no_tests"] - stats["skipped"]
    print(f"mutmut on {', '.join(MUTMUT_MODULES)} ({time.monotonic() - t0:.0f} s): "
          + ", ".join(f"{k} {v}" for k, v in stats.items() if v))
    print(f"killed {stats['killed'] + stats['timeout']} of {covered} mutants that tests reach "
          f"({100 * (stats['killed'] + stats['timeout']) / max(1, covered):.1f}%)")
    return 0


def first_failure(output: str) -> str:
    for pat in (r"^FAILED (\S+)", r"^ERROR (\S+)"):
        hit = re.search(pat, output, re.M)
        if hit:
            return hit.group(1)
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the listed tests")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant's tests (timeout = caught)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--mutmut", action="store_true", help="run mutmut on MUTMUT_MODULES instead of the curated list")
    ap.add_argument("--max-children", type=int, default=2, help="mutmut's parallel workers")
    args = ap.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        want = args.only.split(",")
        unknown = set(want) - {m.id for m in MUTANTS}
        if unknown:
            ap.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
        mutants = [m for m in MUTANTS if m.id in want]
    if args.list:
        for m in mutants:
            print(f"{m.id:<28} {m.file:<28} {m.what}")
        return 0

    root = Path(tempfile.mkdtemp(prefix="vhr-mutants-"))
    copy = Copy(root, args.python)
    t_start = time.monotonic()
    try:
        copy.make()
        if args.mutmut:
            return run_mutmut(copy, args.max_children)
        if not args.no_baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            print(f"baseline: {len(tests)} test files on the unmutated copy ...", flush=True)
            rc, out, secs = copy.pytest(tests, args.timeout * 2)
            if rc != 0:
                print(out[-4000:])
                print(f"baseline FAILED (exit {rc}, {secs:.0f} s): fix the tests before judging mutants")
                return 2
            print(f"baseline passed in {secs:.0f} s", flush=True)
        rows = []
        for m in mutants:
            try:
                original = apply(copy, m)
            except SyntaxError as e:
                rows.append((m, "invalid", 0.0, f"the mutated file does not compile: {e}"))
                print(f"{m.id:<28} invalid (the mutated file does not compile: {e})", flush=True)
                continue
            if original is None:
                rows.append((m, "stale", 0.0, "search text not found exactly once"))
                print(f"{m.id:<28} stale (search text not found exactly once in {m.file})", flush=True)
                continue
            try:
                cpp = m.file.startswith("native/")
                if cpp:
                    ok, log = copy.rebuild()
                    if not ok:
                        rows.append((m, "build-error", 0.0, log.strip().splitlines()[-1] if log.strip() else ""))
                        print(f"{m.id:<28} build error\n{log}", flush=True)
                        continue
                rc, out, secs = copy.pytest(m.tests, args.timeout)
            finally:
                (copy.repo / m.file).write_text(original)
                if m.file.startswith("native/"):
                    copy.restore_so()
            if rc in (1, 2):
                status, note = "caught", first_failure(out)
            elif rc == -1:
                status, note = "caught", "timeout"
            elif rc == 0:
                status, note = "MISSED", ""
            else:
                status, note = "error", f"pytest exit {rc}: " + out.strip().splitlines()[-1] if out.strip() else ""
            rows.append((m, status, secs, note))
            print(f"{m.id:<28} {status:<7} {secs:6.1f} s  {note}", flush=True)
    finally:
        if args.keep:
            print(f"copy kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    applicable = [r for r in rows if r[1] not in ("stale", "invalid")]
    caught = [r for r in rows if r[1] == "caught"]
    print()
    print(f"{'mutant':<28} {'file':<28} {'status':<7} {'s':>6}  caught by / what")
    for m, status, secs, note in rows:
        print(f"{m.id:<28} {m.file:<28} {status:<7} {secs:6.1f}  {note or m.what}")
    print(f"\ncaught {len(caught)} of {len(applicable)} mutants"
          f" ({len(rows) - len(applicable)} stale or invalid) in {time.monotonic() - t_start:.0f} s")
    return 0 if len(caught) == len(applicable) == len(rows) and rows else 1


if __name__ == "__main__":
    sys.exit(main())
