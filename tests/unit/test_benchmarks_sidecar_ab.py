"""benchmarks/sidecar_ab.py runs as documented (a few sidecars, one round): each side's
keeper_core is the one it names, and the JSON holds both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_runs_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    src = ROOT / "packages" / "core" / "src"  # this checkout on both sides: the plumbing only
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "sidecar_ab.py"), "--old-src", str(src),
        "--n", "20", "--rounds", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-run, same choice" in proc.stdout
    record = json.loads(out.read_text())
    for side in ("old", "new"):
        (run,) = record["runs"][side]
        assert run["module"].startswith(str(src))
        assert run["new_ms"] > 0
