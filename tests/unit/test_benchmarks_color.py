"""benchmarks/color.py runs as documented (one file a size, one repeat) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_measures_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "color.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "color.py"),
        "--files", "1", "--repeats", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "display_p3" in proc.stdout
    record = json.loads(out.read_text())
    assert [r["size"] for r in record["rows"]] == ["4000x3000", "1600x1200", "512x384"]
    for row in record["rows"]:
        for way in ("full", "draft"):
            assert row[f"{way}/untagged"]["vs_untagged"] == 1.0
            for variant in ("srgb_profile", "display_p3"):
                assert row[f"{way}/{variant}"]["img_per_s"] > 0
