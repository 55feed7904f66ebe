"""benchmarks/pick_scale.py runs as documented (tiny sizes) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_compares_hash_and_scan_and_times_the_cull(tmp_path: Path) -> None:
    out = tmp_path / "pick-scale.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "pick_scale.py"),
        "--sizes", "600,1500", "--scan-max", "1000", "--hashes", "photos,uniform",
        "--cull", "800", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MISMATCH" not in proc.stderr
    record = json.loads(out.read_text())
    rows = record["rows"]
    # Both ways at 600 rows (with the same marks), the hash search alone above --scan-max.
    assert [(r["hashes"], r["n"], r["search"]) for r in rows] == [
        ("photos", 600, "hash"), ("photos", 600, "scan"), ("photos", 1500, "hash"),
        ("uniform", 600, "hash"), ("uniform", 600, "scan"), ("uniform", 1500, "hash"),
    ]  # fmt: skip
    for r in rows:
        assert r["same_marks"] is (True if r["n"] == 600 else None)
        assert r["near"] == r["n"] // 100  # every planted copy found, nothing else
        assert 0 < r["candidate_pairs"] < r["all_pairs"]
        assert r["search_peak_mb"] >= 0
    cull = record["cull"]
    assert cull["n"] == 800
    assert cull["counts"]["images"] == 800
    assert set(cull["stages"]) == {"group", "rank", "decide"}
    assert record["machine"]["cores"] >= 1
