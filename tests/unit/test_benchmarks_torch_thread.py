"""benchmarks/torch_thread.py runs as documented (on keeper-tiny, one round) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_measures_every_arrangement(tmp_path: Path) -> None:
    out = tmp_path / "torch-thread.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "torch_thread.py"),
        "--model", "keeper-tiny:random", "--batches", "1", "--threads", "1",
        "--reps", "3", "--rounds", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vs one-thread" in proc.stdout
    record = json.loads(out.read_text())
    assert record["random_weights"] is True
    rows = {(r["batch"], r["mode"]): r for r in record["rows"]}
    modes = ("one-thread", "main-only", "load-main-run-thread")
    assert set(rows) == {(b, m) for b in (1,) for m in modes}
    for b in (1,):
        assert rows[(b, "one-thread")]["vs_one_thread"] == 1.0
        assert all(rows[(b, m)]["median_ms"] > 0 for m in modes)
