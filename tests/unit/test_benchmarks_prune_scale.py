"""benchmarks/prune_scale.py runs as documented (a tiny table): find_gone, held_elsewhere,
check_prune over its limit and remove measured against check_changes over the same table, its
counts as the table was built, no image opened, its work folder removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "prune_scale.py")
STEPS = [
    "check_changes",
    "find_gone_none",
    "gone_sets",
    "held_elsewhere_none",
    "find_gone_some",
    "held_elsewhere_some",
    "check_prune_over",
]


@pytest.mark.parametrize("layout", ["scattered", "clustered"])
def test_the_script_measures_prune_against_check_changes(tmp_path: Path, layout: str) -> None:
    out = tmp_path / "prune-scale.json"
    cmd = [
        sys.executable, SCRIPT, "--rows", "5000", "--gone", "0.01", "--repeats", "1",
        "--layout", layout, "--out", str(out), "--work-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["command"].startswith("benchmarks/prune_scale.py --rows 5000")
    assert record["machine"]["cores"] >= 1
    assert len(record["load_avg_before"]) == len(record["load_avg_after"]) == 3
    assert record["image_opens"] == 0  # no image is read

    c = record["config"]
    # 50 gone, 25 of them moved: 4,975 photos in 5 parts, then the 25 moved rows in a part
    assert (c["rows"], c["gone_rows"], c["moved_rows"], c["layout"]) == (5000, 50, 25, layout)
    assert (c["rows_per_part"], c["parts"], c["repeats"], c["dim"]) == (1024, 6, 1, 0)

    r = record["result"]
    assert list(r["steps"]) == STEPS
    for step in r["steps"].values():
        assert step["s"] > 0
        assert len(step["trials_s"]) == 1
        assert step["us_per_row"] == pytest.approx(step["s"] / 5000 * 1e6)
        assert step["over_check_changes"] == pytest.approx(
            step["s"] / r["steps"]["check_changes"]["s"]
        )
    assert r["steps"]["check_changes"]["over_check_changes"] == 1.0
    assert r["load"]["embedded_parts_read_s"] > 0

    rm = r["remove"]
    assert (rm["rows_removed"], rm["parts"]) == (50, 6)
    assert rm["parts_rewritten"] == r["parts_holding_gone_rows"] >= 1
    assert rm["parts_deleted"] == 0
    assert rm["s"] > 0
    if layout == "clustered":  # 50 rows in a row: one part, or two
        assert r["parts_holding_gone_rows"] <= 2
    # held_elsewhere reads the ids of the parts holding gone rows, and of their moved rows'
    assert r["parts_holding_gone_rows"] < r["held_elsewhere_parts_read"] <= 6
    st, t = r["steps"], r["totals"]
    # every plan: find_gone and set(keys); held_elsewhere is not called then
    assert t["every_plan_adds_s"] == pytest.approx(st["find_gone_none"]["s"] + st["gone_sets"]["s"])
    assert t["with_gone_adds_s"] == pytest.approx(st["find_gone_some"]["s"] + st["gone_sets"]["s"])
    assert t["with_prune_adds_s"] == pytest.approx(t["with_gone_adds_s"] + rm["s"])
    assert t["with_prune_over_limit_adds_s"] == pytest.approx(
        t["with_prune_adds_s"] + st["check_prune_over"]["s"]
    )
    assert t["every_plan_adds_over_check_changes"] == pytest.approx(
        t["every_plan_adds_s"] / st["check_changes"]["s"]
    )
    # check_prune: over its limit with all 50 gone rows, within it less the 25 held elsewhere
    cp = r["check_prune"]
    assert (cp["lost_rows"], cp["held_elsewhere_rows"], cp["under"]) == (50, 25, 5000)
    assert 25 <= cp["max_prune_fraction"] * 5000 < 50
    assert cp["refused_at_max_prune_fraction"] * 5000 < 25

    assert "(a) check_changes" in proc.stdout
    assert "(e) remove, once" in proc.stdout
    assert "(d) held_elsewhere (only a prune over max_prune_fraction)" in proc.stdout
    assert "(f) check_prune over its limit" in proc.stdout
    assert "every plan of a listed folder now adds (b)" in proc.stdout
    assert not list(tmp_path.glob("keeper-prune-scale-*"))  # its work folder is removed


def test_too_few_gone_rows_are_refused(tmp_path: Path) -> None:
    cmd = [sys.executable, SCRIPT, "--rows", "100", "--gone", "0.001", "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--gone" in proc.stderr
    assert not (tmp_path / "x").exists()
