"""benchmarks/serve.py --breakdown: Serve's access-log lines joined by request id into per-hop ms.

The lines are copied from a real run of keeper's app on Ray 2.60 (proxy, ingress and encoder logs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support import import_benchmark

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

PROXY = [
    "INFO 2026-12-03 09:16:09,469 proxy 192.0.2.2 d8df5fcd -- GET /healthz 200 38.9ms",
    "INFO 2026-12-03 09:16:09,786 proxy 192.0.2.2 req-a -- POST /v1/embed 200 317.9ms",
    "INFO 2026-12-03 09:16:10,000 proxy 192.0.2.2 req-b -- POST /v1/embed 200 190.1ms",
    "INFO 2026-12-03 09:16:10,200 proxy 192.0.2.2 req-c -- POST /v1/embed 200 180.0ms",
]
INGRESS = [
    "INFO 2026-12-03 09:16:09,780 keeper_KeeperIngress j7mf0h6x req-a -- POST /v1/embed 200 300.0ms",
    "INFO 2026-12-03 09:16:09,990 keeper_KeeperIngress j7mf0h6x req-b -- POST /v1/embed 200 180.0ms",
    "INFO 2026-12-03 09:16:10,190 keeper_KeeperIngress j7mf0h6x req-c -- POST /v1/embed 200 170.0ms",
]
ENCODER = [
    "INFO 2026-12-03 09:16:09,614 keeper_ClipEncoder r0vfdhp9 req-a -- CALL info OK 16.9ms",
    "INFO 2026-12-03 09:16:09,778 keeper_ClipEncoder r0vfdhp9 req-a -- CALL embed_pixels OK 183.2ms",
    "INFO 2026-12-03 09:16:09,980 keeper_ClipEncoder r0vfdhp9 req-b -- CALL embed_pixels OK 150.0ms",
    # req-c's encoder line is missing (e.g. logged after the snapshot): it is left out of the join
]


@pytest.fixture(scope="module")
def sb():
    return import_benchmark("serve")


def write(folder: Path, name: str, lines: list[str]) -> Path:
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_hops_joined_by_request_id(sb, tmp_path):
    write(tmp_path, "proxy_192.0.2.2.log", PROXY)
    write(tmp_path, "replica_keeper_KeeperIngress_j7mf0h6x.log", INGRESS)
    write(tmp_path, "replica_keeper_ClipEncoder_r0vfdhp9.log", ENCODER)
    hops = sb.hop_breakdown(tmp_path, {})
    assert hops["requests"] == 2  # req-a and req-b have all three lines; the info call is not one
    assert hops["median_ms"] == {"proxy": 254.0, "ingress": 240.0, "encoder": 166.6}
    assert hops["proxy_minus_ingress_ms"] == pytest.approx(14.0, abs=0.06)
    assert hops["ingress_minus_encoder_ms"] == pytest.approx(73.4, abs=0.06)


def test_only_lines_after_the_offsets_count(sb, tmp_path):
    files = [
        write(tmp_path, "proxy_192.0.2.2.log", PROXY[:2]),
        write(tmp_path, "replica_keeper_KeeperIngress_j7mf0h6x.log", INGRESS[:1]),
        write(tmp_path, "replica_keeper_ClipEncoder_r0vfdhp9.log", ENCODER[:2]),
    ]
    since = sb.log_offsets(tmp_path)
    assert since == {f: f.stat().st_size for f in files}
    assert sb.hop_breakdown(tmp_path, since) == {"requests": 0}
    for f, more in zip(files, (PROXY[2:3], INGRESS[1:2], ENCODER[2:3]), strict=True):
        with f.open("a") as fh:
            fh.write(more[0] + "\n")
    hops = sb.hop_breakdown(tmp_path, since)
    assert hops["requests"] == 1
    assert hops["median_ms"] == {"proxy": 190.1, "ingress": 180.0, "encoder": 150.0}


# ---------------------------------------------------------------- --device cuda


def test_gpu_config_loses_its_vlm_block_only_without_a_vlm(sb):
    from keeper_serve.local import load_config

    root = BENCH.parent
    config = load_config(root / "clusters" / "serve" / "keeper-gpu.yaml")
    names = [d["name"] for d in config["applications"][0]["deployments"]]
    assert "VlmJudge" in names
    kept = sb.without_unbuilt_vlm(load_config(root / "clusters/serve/keeper-gpu.yaml"), {})
    assert [d["name"] for d in kept["applications"][0]["deployments"]] == names
    dropped = sb.without_unbuilt_vlm(config, {"vlm.source": None})
    assert [d["name"] for d in dropped["applications"][0]["deployments"]] == [
        n for n in names if n != "VlmJudge"
    ]


def test_gpu_goals_are_issue_14s_at_concurrency_64(sb):
    def server(rps, p50, p99):
        row = {"requests_per_s": rps, "p50_ms": p50, "p99_ms": p99, "errors": 0}
        return {"by_concurrency": {"64": {**row, "cpu": {}, "client_cpu_share": 0.1}}}

    report = {"servers": {"naive": server(150.0, 400, 600), "keeper": server(1800.0, 30, 60)}}
    g = sb.goals(report, [1, 64], "cuda")
    assert (g["concurrency"], g["device"]) == (64, "cuda")
    assert [(x["goal"], x["met"]) for x in g["goals"]] == [
        ("keeper / naive req/s >= 10", True),
        ("keeper p99 / p50 <= 3", True),
        ("keeper errors == 0", True),
    ]
    report["servers"]["keeper"] = server(1200.0, 30, 60)  # 8x naive
    assert sb.goals(report, [1, 64], "cuda")["goals"][0]["met"] is False
    cpu = sb.goals(report, [1, 64])  # the CPU goals, at the highest concurrency run
    assert (cpu["concurrency"], cpu["wanted_concurrency"]) == (64, 32)
    assert cpu["goals"][0]["goal"] == "keeper / naive req/s >= 1.5"


def test_cpu_goals_include_issue_14s_ceiling_ratio_and_concurrency_1_gap(sb):
    def row(rps, p50):
        return {"requests_per_s": rps, "p50_ms": p50, "p99_ms": 2 * p50, "errors": 0}

    def server(at_1, at_32):
        by_c = {"1": {**at_1, "cpu": {}, "client_cpu_share": 0.0}}
        by_c["32"] = {**at_32, "cpu": {}, "client_cpu_share": 0.0}
        return {"by_concurrency": by_c}

    offline = {
        key: {"images_per_s": 20.0, "cpu": {"foreign_share": 0.0}}
        for key in (sb.OFFLINE_FORWARD_B1, sb.OFFLINE_FORWARD, sb.OFFLINE_E2E)
    }
    report = {
        "offline": offline,
        "servers": {
            "naive": server(row(10.0, 100), row(12.0, 2500)),
            "keeper": server(row(9.0, 125), row(15.0, 2000)),
        },
    }
    g = {x["goal"]: (x["value"], x["met"]) for x in sb.goals(report, [1, 32])["goals"]}
    assert g["keeper / offline img/s >= 0.8 (#14)"] == (0.75, False)  # 15 / 20
    assert g["keeper / offline img/s >= 0.6"] == (0.75, True)
    assert g["c=1 p50 keeper - naive ms <= 20 (#14)"] == (25, False)
    report["servers"]["keeper"] = server(row(9.0, 115), row(17.0, 2000))
    g = {x["goal"]: (x["value"], x["met"]) for x in sb.goals(report, [1, 32])["goals"]}
    assert g["keeper / offline img/s >= 0.8 (#14)"] == (0.85, True)
    assert g["c=1 p50 keeper - naive ms <= 20 (#14)"] == (15, True)
    assert sb.goals(report, [32])["goals"][3]["value"] is None  # no c=1 run: not measured


def test_device_cuda_without_cuda_stops_before_anything_starts(sb, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine runs it too
    with pytest.raises(SystemExit) as e:
        sb.main(["--device", "cuda", "--cache", str(tmp_path), "--out", str(tmp_path / "o.json")])
    assert e.value.code == 2
    assert "--device cuda: this process sees no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no pool generated, nothing written


def test_replica_memory_finds_replicas_by_title(sb, tmp_path: Path) -> None:
    """A process titled as Ray titles a Serve replica is sampled; others are not."""
    import subprocess
    import time

    hold = (
        "b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(60)"
    )
    procs = [
        subprocess.Popen(["bash", "-c", f'exec -a "{title}" {sys.executable} -c "{hold}"'])
        for title in ("ray::ServeReplica:keeper:FakeEncoder", "ray::NotAReplica:keeper:FakeOther")
    ]
    try:
        mem = sb.ReplicaMemory(interval=0.05)
        deadline = time.monotonic() + 20
        while mem.peak.get("FakeEncoder", 0) < 64 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.05)
        peak = mem.stop()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert "FakeOther" not in peak  # other replicas on this machine (if any) may be in it
    assert 64 <= peak["FakeEncoder"] < 200  # MiB: the buffer and an interpreter
