"""benchmarks/gpu/icc_check.py (the device's colour check) runs and passes on CPU tensors here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_icc_check_passes_on_the_cpu() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu" / "icc_check.py"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    assert all(line.endswith(": ok") for line in lines)
    assert "P3 JPEG converted 1, delegated {}" in lines[-1]
