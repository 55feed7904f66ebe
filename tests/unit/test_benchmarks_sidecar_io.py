"""benchmarks/sidecar_io.py runs as documented (tiny sizes), on a local folder and a real
moto_server, and records that threads wrote and read exactly what one at a time did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_compares_one_thread_with_many_on_every_store(tmp_path: Path) -> None:
    out = tmp_path / "sidecar-io.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "sidecar_io.py"),
        "--n", "40", "--threads", "8", "--latency-ms", "5", "--pair-every", "8",
        "--bad-every", "10", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MISMATCH" not in proc.stderr
    record = json.loads(out.read_text())
    assert (record["n"], record["threads"], record["latency_ms"]) == (40, 8, 5.0)
    assert record["identical"] is True
    rows = record["rows"]
    assert [(r["store"], r["step"]) for r in rows] == [
        ("local", "write"), ("local", "read"),
        ("local + simulated latency", "write"), ("local + simulated latency", "read"),
        ("s3 (moto)", "write"), ("s3 (moto)", "read"),
        ("s3 (moto) + simulated latency", "write"), ("s3 (moto) + simulated latency", "read"),
    ]  # fmt: skip
    for r in rows:
        assert r["identical"] is True
        assert r["sequential_s"] > 0
        assert r["threaded_s"] > 0
        assert r["speedup"] > 0
        assert r["simulated_latency_ms"] == (5.0 if "simulated" in r["store"] else 0.0)
        assert r["sidecars"] == 40
        if r["step"] == "write":  # 5 RAW+JPEG pairs share a sidecar; every 10th is not XMP
            res = r["results"]
            assert (res["written"], res["skipped"], len(res["failed"])) == (36, 5, 4)
        else:
            assert r["results"] == {"read": 36, "missing": 0, "ratings": 36, "unreadable": 4}
    # 5 ms before each request, one at a time: a write is 36 new sidecars of 2 (a GET that finds
    # none, the PUT) and 4 bad ones of 1 (the GET), 0.38 s; a read is 40 GETs, 0.2 s
    slow = [r for r in rows if "simulated" in r["store"]]
    assert all(r["sequential_s"] >= (0.38 if r["step"] == "write" else 0.2) for r in slow)
    assert "s3 (moto) + simulated latency" in proc.stdout


def test_the_local_store_alone_repeated(tmp_path: Path) -> None:
    out = tmp_path / "sidecar-io-local.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "sidecar_io.py"), "--n", "12", "--threads", "4",
        "--latency-ms", "1", "--stores", "local", "--rounds", "2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["store"] for r in rows] == ["local"] * 2 + ["local + simulated latency"] * 2 + [
        "local"
    ] * 2 + ["local + simulated latency"] * 2
    assert all(r["identical"] for r in rows)
    bad = subprocess.run([*cmd[:2], "--stores", "gcs"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "--stores: local and/or s3" in bad.stderr
