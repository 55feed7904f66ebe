"""benchmarks/asgi_middleware.py runs as documented (a short run) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_times_each_middleware_and_checks_it_saw_every_request(tmp_path: Path) -> None:
    out = tmp_path / "asgi.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "asgi_middleware.py"),
        "--requests", "50", "--repeats", "2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| plain ASGI (keeper's) |" in proc.stdout
    record = json.loads(out.read_text())
    assert set(record["us_per_request"]) == {"none", "base", "asgi"}
    assert all(len(v) == 2 and min(v) > 0 for v in record["seconds"].values())
    saved = record["us_per_request"]["base"] - record["us_per_request"]["asgi"]
    assert record["saved_us_per_request"] == saved
