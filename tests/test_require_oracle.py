"""`make test` runs the oracle tests or fails: conftest.oracle_import under $VHR_EDGE_REQUIRE_ORACLE."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROBE = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from conftest import oracle_import

oracle_import("vhr_edge_no_such_module")


def test_never_reached():
    pass
"""


def run_probe(tmp_path, require: str | None):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "VHR_EDGE_REQUIRE_ORACLE"}
    if require is not None:
        env["VHR_EDGE_REQUIRE_ORACLE"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_probe.py")], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)


def test_missing_oracle_module_skips_for_a_user(tmp_path):
    for require in (None, "0"):
        r = run_probe(tmp_path, require)
        assert r.returncode in (0, 5) and "1 skipped" in r.stdout, r.stdout + r.stderr  # 5: nothing else ran


def test_missing_oracle_module_fails_under_make_test(tmp_path):
    r = run_probe(tmp_path, "1")
    assert r.returncode != 0 and "skipped" not in r.stdout.splitlines()[-1], r.stdout
    assert "VHR_EDGE_REQUIRE_ORACLE=1 requires the oracle tests" in r.stdout + r.stderr


def test_the_makefile_sets_it():
    make = (TESTS.parent / "Makefile").read_text()
    recipe = make.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "VHR_EDGE_REQUIRE_ORACLE=1" in recipe and "pytest" in recipe
