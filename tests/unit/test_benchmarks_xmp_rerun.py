"""benchmarks/xmp_rerun.py runs as documented (short histories, one repeat), finds the shortcut
and the full merge give the same packet, and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_compares_the_shortcut_with_the_full_merge(tmp_path: Path) -> None:
    out = tmp_path / "xmp-rerun.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "xmp_rerun.py"),
        "--items", "5,40", "--repeats", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MISMATCH" not in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["items"] for r in rows] == [5, 40]
    for row in rows:
        assert row["identical"]
        assert row["rerun_full_s"] > 0
