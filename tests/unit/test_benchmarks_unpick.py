"""benchmarks/unpick.py runs as documented (tiny sizes): pick's write and the unpick job on the
same files, both modes, its own checks passed (JPEGs back to their bytes, merged sidecars
holding their fields), a row per mode and threads value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_times_unpick_against_the_write_it_undoes(tmp_path: Path) -> None:
    out = tmp_path / "unpick.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "unpick.py"),
        "--jpegs", "3", "--megapixels", "0.3", "--sidecars", "12", "--threads", "1,4",
        "--repeats", "1", "--out", str(out), "--work-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["problems"] == []
    rows = [(r["mode"], r["threads"], r["photos"]) for r in record["rows"]]
    assert rows == [("embed", 1, 3), ("beside", 1, 12), ("embed", 4, 3), ("beside", 4, 12)]
    for r in record["rows"]:
        assert r["unpick_over_write"] == r["unpick_s"] / r["write_s"]
        # embed: every JPEG's segment removed; beside: 3 merged sidecars cleaned, 9 deleted
        want = (0, 3) if r["mode"] == "embed" else (3, 9)
        assert (r["cleaned"], r["deleted"]) == want
    assert "unpick / write" in proc.stdout
    assert not list(tmp_path.glob("keeper-unpick-*"))  # its work folder is removed
