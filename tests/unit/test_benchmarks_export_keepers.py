"""benchmarks/export_keepers.py runs as documented (tiny sizes): keeper's export beside a plain
copy2 loop on the same files, a row per step, its work folder removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_script(tmp_path: Path, flags: str) -> tuple[dict[str, Any], str]:
    """The script with ``flags`` (and its --out and --work-dir in ``tmp_path``): its record and
    what it printed; a non-zero exit fails the test."""
    out = tmp_path / "record.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "export_keepers.py"), *flags.split()]
    cmd += ["--out", str(out), "--work-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record: dict[str, Any] = json.loads(out.read_text())
    return record, proc.stdout


def test_the_script_compares_keepers_export_with_a_plain_copy(tmp_path: Path) -> None:
    record, stdout = run_script(tmp_path, "--n 4 --mib 0.05 --repeats 1")
    assert (record["n"], record["mib"], record["repeats"]) == (4, 0.05, 1)
    assert [r["step"] for r in record["rows"]] == ["first copy", "re-run", "originals changed"]
    for r in record["rows"]:
        assert r["plain_s"] > 0
        assert r["keeper_s"] > 0
        assert r["keeper_over_plain"] == r["keeper_s"] / r["plain_s"]
    assert "keeper / plain" in stdout
    assert not list(tmp_path.glob("keeper-export-keepers-*"))  # its work folder is removed


def test_the_s3_table_compares_one_thread_with_many(tmp_path: Path) -> None:
    record, stdout = run_script(
        tmp_path, "--n 6 --mib 0.02 --repeats 1 --s3-threads 4 --latency-ms 5"
    )
    rows = record["s3_threads"]
    assert [(r["latency_ms"], r["threads"]) for r in rows] == [(0.0, 4), (5.0, 4)]
    for r in rows:
        assert r["one_s"] > 0
        assert r["threads_s"] > 0
    # 6 exports of 3 storage calls, 5 ms before each: at least 0.09 s one at a time
    assert rows[1]["one_s"] >= 0.09
    assert "from S3 (moto_server) to a local folder" in stdout


def test_the_s3_rerun_table_sets_the_former_export_beside_todays(tmp_path: Path) -> None:
    record, stdout = run_script(tmp_path, "--n 5 --mib 0.02 --repeats 1 --s3-rerun --latency-ms 1")
    former, keeper = record["s3_rerun"]
    assert (former["export"], keeper["export"]) == ("former", "keeper")
    # the former: an existence HEAD, two HEADs and two GETs a copy; today: two HEADs. Both read
    # the folder's record (a HEAD and a GET).
    assert former["requests"] == {"GetObject": 11, "HeadObject": 16}
    assert keeper["requests"] == {"GetObject": 1, "HeadObject": 11}
    assert former["downloaded_bytes"] > 10 * int(0.02 * (1 << 20))
    assert keeper["downloaded_bytes"] < 1000  # the record alone
    # the first export into an empty prefix: the former asked for the bucket after each 404
    assert former["first_requests"]["HeadBucket"] == 6  # the record's and each copy's
    assert keeper["first_requests"].get("HeadBucket", 0) <= 1
    assert former["first_requests"]["PutObject"] == keeper["first_requests"]["PutObject"] == 6
    assert "re-run from S3 to S3" in stdout


def test_the_s3_unpick_table_sets_the_former_removal_beside_todays(tmp_path: Path) -> None:
    record, stdout = run_script(tmp_path, "--n 5 --mib 0.02 --repeats 1 --s3-unpick --latency-ms 1")
    rows = record["s3_unpick"]
    assert [(r["unpick"], r["io_threads"]) for r in rows] == [
        ("former", 1),
        ("ETags, 1 thread", 1),
        ("keeper", 16),
    ]
    # the former: the record (a HEAD and a GET), then a GET a copy; with ETags a HEAD a copy
    assert rows[0]["requests"] == {"DeleteObject": 6, "GetObject": 6, "HeadObject": 1}
    for r in rows[1:]:
        assert r["requests"] == {"DeleteObject": 6, "GetObject": 1, "HeadObject": 6}
        assert r["downloaded_bytes"] < 1000  # the record alone
    assert rows[0]["downloaded_bytes"] > 5 * int(0.02 * (1 << 20))
    assert "taking S3 copies back" in stdout
