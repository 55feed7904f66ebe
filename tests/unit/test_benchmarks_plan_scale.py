"""benchmarks/plan_scale.py runs as documented (two tiny sizes) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_measures_plan_and_summarise_at_each_size(tmp_path: Path) -> None:
    out = tmp_path / "plan-scale.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "plan_scale.py"),
        "--sizes", "200,400", "--cache", str(tmp_path / "cache"), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "200 -> 400 (2x inputs)" in proc.stdout
    record = json.loads(out.read_text())
    assert [r["n"] for r in record["rows"]] == [200, 400]
    for r in record["rows"]:
        assert r["adds_up"]  # in = already + failed before + attempted; none lost
        assert r["image_opens"] == 0  # planning reads no image
        c = r["counts"]
        # 90 % embedded before, 1 % recorded failed (one in ten retryable), 1 in 100 fails now.
        assert c["already_embedded"] == r["n"] * 9 // 10
        assert c["retried"] == r["retried"] >= 1
        assert c["attempted"] == r["todo"] == c["embedded"] + c["failed"]
        for step in ("plan", "summarise", "replan"):
            assert r[step]["s"] > 0
            assert r[step]["peak_mb"] > 0
