"""benchmarks/sidecar_s3_requests.py runs as documented (tiny sizes) against a real moto_server,
and counts what write_sidecar and feedback-from-xmp's reader ask of S3 on both sides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_counts_requests_on_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "sidecar-s3-requests.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "sidecar_s3_requests.py"),
        "--n", "12", "--threads", "4", "--rounds", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    before, after = rows
    assert before["side"].startswith("before")
    assert after["side"] == "read_if_exists"
    # a key that is not there: HEAD object, HEAD bucket, a one-key listing, then the PUT
    assert before["new_calls"] == {"HeadObject": 12, "HeadBucket": 12, "ListObjectsV2": 12,
                                   "PutObject": 12}  # fmt: skip
    assert after["new_calls"] == {"GetObject": 12, "PutObject": 12}
    assert before["rerun_calls"] == {"HeadObject": 12, "GetObject": 12}
    assert after["rerun_calls"] == {"GetObject": 12}
    # read back (feedback-from-xmp): a HEAD and a GET each, then a GET alone
    assert before["read_calls"] == {"HeadObject": 12, "GetObject": 12}
    assert after["read_calls"] == {"GetObject": 12}
    assert "req/new" in proc.stdout
