"""benchmarks/first_run_copies.py runs as documented (small sizes, no Ray): find_twins at scale
against the same_key pass with the ends it would read counted (no file opened), and first-run
plans over a library alone, with a copy and with look-alikes, their counts checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "first_run_copies.py")


def test_the_script_measures_find_twins_against_the_plan_without_it(tmp_path: Path) -> None:
    out = tmp_path / "first-run-copies.json"
    cmd = [
        sys.executable, SCRIPT, "--inputs", "20000", "--photos", "12", "--camera", "600x400",
        "--library-photo", "300x200", "--e2e-photo", "300x200", "--no-e2e", "--repeats", "1",
        "--work-dir", str(tmp_path), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["command"].startswith("benchmarks/first_run_copies.py --inputs 20000")
    assert record["image_opens_under_library"] == 0
    assert [r["size_dist"] for r in record["scale"]] == ["uniform", "normal"]
    for r in record["scale"]:
        assert r["inputs"] == 20000
        assert min(r["same_key_s"], r["find_twins_s"]) > 0
        assert abs(r["ends_read_share"] / r["ends_read_share_expected"] - 1) <= r["tolerance"]
    cases = record["plan"]["cases"]
    assert [(c["inputs"], c["twins"], c["whole_reads"]) for c in cases.values()] == [
        (12, 0, 0),
        (24, 12, 24),
        (24, 0, 0),
    ]
    assert record["plan"]["decode_stage_ms_per_photo"] > 0
    assert record["e2e"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("keeper-first-run")]
