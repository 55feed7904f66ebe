"""benchmarks/prune_scale.py runs as documented (a tiny table): find_gone, held_elsewhere,
check_prune over its limit, remove and _copy_candidates measured against check_changes over the
same table, its counts as the table was built, no image opened, its work folder removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keeper_train import table

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "prune_scale.py")
STEPS = [
    "check_changes",
    "find_gone_none",
    "gone_sets",
    "held_elsewhere_none",
    "find_gone_some",
    "held_elsewhere_some",
    "held_elsewhere_some_one",
    "check_prune_over",
    "copy_candidates",
]


@pytest.mark.parametrize(
    ("layout", "size_dist"), [("scattered", "uniform"), ("clustered", "normal")]
)
def test_the_script_measures_prune_against_check_changes(
    tmp_path: Path, layout: str, size_dist: str
) -> None:
    out = tmp_path / "prune-scale.json"
    cmd = [
        sys.executable, SCRIPT, "--rows", "5000", "--gone", "0.01", "--repeats", "1",
        "--layout", layout, "--size-dist", size_dist, "--new", "3000", "--copies", "40",
        "--out", str(out), "--work-dir", str(tmp_path),
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
    assert (c["size_dist"], c["new"], c["copies"]) == (size_dist, 3000, 40)

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
    assert r["load"]["embedded_parts_read_one_at_a_time_s"] > 0  # beside it, as before
    assert r["load"]["embedded_parts_read_threads"] == table._IO_THREADS

    rm = r["remove"]
    assert (rm["rows_removed"], rm["parts"]) == (50, 6)
    assert rm["parts_rewritten"] == r["parts_holding_gone_rows"] >= 1
    assert rm["parts_deleted"] == 0
    assert rm["s"] > 0
    assert rm["one_thread_s"] > 0  # the same remove, one part at a time, beside it
    assert rm["one_thread_over_threads"] == pytest.approx(rm["one_thread_s"] / rm["s"])
    assert rm["rewrite_threads"] == table.REWRITE_THREADS
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

    # (g): the copies' sizes are in the map but for those more than 4 rows share; the new
    # inputs in it are counted (checked against the table's sizes in the script)
    g = r["copies"]
    assert (g["new"], g["copies"], g["copy_size_rows"]) == (3000, 40, 4)
    assert g["copies_in_map"] + g["copies_over_limit"] == 40
    assert g["copies_in_map"] >= 1
    assert 1 <= g["map_sizes"] <= g["map_rows"] <= 4 * g["map_sizes"]
    assert g["new_in_map"] + g["new_size_of_no_row"] + g["new_size_over_limit"] == 3000
    assert g["new_in_map_share"] == pytest.approx(g["new_in_map"] / 3000)
    assert (g["new_in_map_mb"] > 0) == (g["new_in_map"] > 0)
    if size_dist == "uniform":  # 5,000 rows over 11 M sizes: none shared by 5
        assert g["new_size_over_limit"] == g["copies_over_limit"] == 0
    assert list(r["copies_in_memory"]) == ["uniform", "normal"]
    for m in r["copies_in_memory"].values():
        assert (m["rows"], m["new"]) == (5000, 3000)
        assert m["new_in_map_share"] == pytest.approx(m["new_in_map"] / 3000)
        assert 0 < m["expected_share"] < 0.01  # 5,000 rows: a few in a thousand
    # bunched sizes are shared more often
    mem = r["copies_in_memory"]
    assert mem["normal"]["expected_share"] > mem["uniform"]["expected_share"]

    assert "(a) check_changes" in proc.stdout
    assert "(g) _copy_candidates, 3,000 new + 40 copies" in proc.stdout
    assert "(g) with no table" in proc.stdout
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


def test_more_copies_than_rows_are_refused(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        SCRIPT,
        "--rows",
        "1000",
        "--copies",
        "1001",
        "--out",
        str(tmp_path / "x"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--copies between 0 and --rows" in proc.stderr
    assert not (tmp_path / "x").exists()
