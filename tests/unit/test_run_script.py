"""tests/run.sh, what `make test` runs: both halves always run (the unit half beside the
integration half), a failure in either fails the whole, and "no tests collected" (pytest's exit 5)
is a failure, not a pass. Run on a copy of the script around throwaway test folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PASS = "def test_ok():\n    assert True\n"
FAIL = "def test_broken():\n    assert False, 'broken on purpose'\n"


def run(
    tmp_path: Path, unit: str | None, integration: str | None, *args: str, **env: str
) -> tuple[int, str]:
    """tests/run.sh in ``tmp_path`` with one test file per half (None: an empty folder)."""
    tests = tmp_path / "tests"
    for half, body in (("unit", unit), ("integration", integration)):
        (tests / half).mkdir(parents=True)
        if body is not None:
            (tests / half / f"test_{half}_half.py").write_text(body)
    shutil.copy(ROOT / "tests" / "run.sh", tests / "run.sh")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not keeper's config: its addopts
    proc = subprocess.run(
        ["bash", str(tests / "run.sh"), sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("serial", ["0", "1"])
def test_both_halves_pass(tmp_path: Path, serial: str) -> None:
    rc, out = run(tmp_path, PASS, PASS, KEEPER_TEST_SERIAL=serial)
    assert rc == 0, out
    assert out.count("1 passed") == 2, out  # each half ran its one test
    if serial == "0":  # beside: at the lowest priority, whether or not SCHED_IDLE is allowed
        assert "nice -n 19); their report follows" in out, out


@pytest.mark.parametrize(
    ("broken", "serial"), [("unit", "0"), ("integration", "0"), ("integration", "1")]
)
def test_a_failure_in_either_half_fails_and_the_other_half_still_runs(
    tmp_path: Path, broken: str, serial: str
) -> None:
    rc, out = run(
        tmp_path,
        FAIL if broken == "unit" else PASS,
        FAIL if broken == "integration" else PASS,
        KEEPER_TEST_SERIAL=serial,
    )
    assert rc == 1, out
    assert "broken on purpose" in out
    assert "1 passed" in out, out
    assert "1 failed" in out, out


@pytest.mark.parametrize("empty", ["unit", "integration"])
def test_no_tests_collected_is_a_failure(tmp_path: Path, empty: str) -> None:
    rc, out = run(
        tmp_path,
        None if empty == "unit" else PASS,
        None if empty == "integration" else PASS,
    )
    assert rc == 1, out
    assert f"pytest collected no tests in tests/{empty}: a failure" in out
    assert "1 passed" in out  # the other half still ran


@pytest.mark.parametrize("serial", ["0", "1"])
def test_a_mypy_failure_fails_the_run_and_the_tests_still_run(tmp_path: Path, serial: str) -> None:
    """--mypy runs the venv's mypy; here it has nothing to check (no config, no files): exit 2."""
    rc, out = run(tmp_path, PASS, PASS, "--mypy", KEEPER_TEST_SERIAL=serial)
    assert rc == 2, out
    assert "mypy failed (exit 2)" in out
    assert out.count("1 passed") == 2, out
