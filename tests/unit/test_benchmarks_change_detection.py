"""benchmarks/change_detection.py runs as documented (tiny sizes): the stamped listing beside the
plain one, file_ids beside sha256 and decode, and plan on an unchanged library, after every JPEG
was saved with new XMP, and after that; its work folder removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_compares_change_detection_with_what_embed_did_before(tmp_path: Path) -> None:
    out = tmp_path / "change-detection.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "change_detection.py"),
        "--files", "200", "--folders", "10", "--photos", "6",
        "--camera", "480x320", "--library-photo", "160x120", "--repeats", "1",
        "--out", str(out), "--work-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["machine"]["cores"] >= 1
    assert record["cpu_count"] >= 1
    assert {"python", "platform"} <= record["machine"].keys()

    listing = record["listing"]
    assert (listing["files"], listing["folders"]) == (200, 10)
    assert listing["list_files_s"] > 0
    assert listing["list_stamped_s"] > 0
    assert listing["stamped_over_plain"] == listing["list_stamped_s"] / listing["list_files_s"]
    assert listing["extrapolated_1m_list_stamped_s"] > 0
    assert listing["gc_off"]["stamped_over_plain"] > 0
    assert listing["os_stat_us_per_file"] > 0

    assert [r["format"] for r in record["ids"]] == ["jpeg", "png"]
    for r in record["ids"]:
        assert (r["width"], r["height"]) == (480, 320)
        assert r["sha256_ms"] > 0
        assert r["file_ids_ms"] > 0
        assert r["decode_ms"] > 0
        assert r["decode_stage_ms"] > 0
        assert r["file_ids_over_sha256"] > 0
        assert {"added_share_of_decode", "added_share_of_decode_stage"} <= r.keys()

    plan = record["plan"]
    assert (plan["photos"], plan["width"], plan["height"]) == (6, 160, 120)
    runs = [r["run"] for r in plan["rows"]]
    assert runs == [
        "unchanged",
        "every JPEG saved with new XMP",
        "the run after",
        "every JPEG moved to another folder",
        "new JPEGs of sizes the table holds: ends compared",
        "the same, each read whole (before the check)",
        "every JPEG copied to another folder",
    ]
    assert plan["rows"][5]["over_ends_compared"] > 0
    for r in plan["rows"]:
        assert r["s"] > 0
        assert r["over_unchanged"] > 0
    assert plan["rows"][1]["read_mb_per_s"] > 0
    assert plan["rows"][3]["ms_per_photo"] > 0
    assert plan["rows"][3]["decode_stage_ms_per_photo"] > 0
    assert "to decode it again" in proc.stdout

    assert "stamped / plain" in proc.stdout
    assert "/ unchanged" in proc.stdout
    assert not list(tmp_path.glob("keeper-change-detection-*"))  # its work folder is removed
