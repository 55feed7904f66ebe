"""benchmarks/embed_gpu.py: how N is chosen under a budget, and its CPU mode's JSON and table.

No Ray here: the rows run are CUDA-only (not measured without CUDA) or skipped for the budget,
so the keeper job never starts; the smoke run on local Ray is done by hand (its docstring).
"""

from __future__ import annotations

import json

import pytest
from support import import_benchmark


@pytest.fixture(scope="module")
def eg():
    return import_benchmark("embed_gpu")


@pytest.fixture
def quiet_env(monkeypatch):
    # main() sets these for Ray; monkeypatch restores the test process's environment after.
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "WARNING")
    monkeypatch.delenv("OUT", raising=False)


@pytest.mark.parametrize(
    ("per_image_s", "overhead_s", "left_s", "cap", "expected"),
    [
        (1e-3, 5.0, 1000.0, 100_000, 3584),  # ~4 s of images (4000), in whole batches of 512
        (1e-3, 5.0, 1000.0, 3000, 2560),  # the cap, in whole batches
        (1e-3, 5.0, 20.0, 100_000, 2048),  # cut: 2 x 5 s + 3 N ms within 20 s / MARGIN
        (1e-3, 5.0, 12.0, 100_000, None),  # not even two batches fit
        (0.1, 0.0, 1000.0, 100_000, 1024),  # slow: two batches, though they take over 4 s
        (1e-3, 1.0, 1000.0, 700, 700),  # a cap under two batches: all of it
    ],
)
def test_choose_n(eg, per_image_s, overhead_s, left_s, cap, expected):
    n = eg.choose_n(
        per_image_s=per_image_s,
        overhead_s=overhead_s,
        left_s=left_s,
        steady_s=4.0,
        batch_size=512,
        cap=cap,
    )
    assert n == expected
    if n is not None:  # what it promises: both runs fit
        assert eg.MARGIN * (2 * overhead_s + 3 * n * per_image_s) <= left_s


def test_cpu_mode_reports_cuda_rows_as_not_measured(eg, tmp_path, quiet_env, one_torch_thread):
    out = tmp_path / "embed-gpu.json"
    argv = ["--device", "cpu", "--smoke", "--rows", "gpu-c1-calls2,gpu-c2-calls1"]
    argv += ["--ceiling-s", "0.2", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert eg.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["status"] == "done"
    assert r["ceiling"]["status"] == "measured"
    assert r["ceiling"]["device"] == "cpu"
    assert set(r["ceiling"]["by_batch"]) == {"4", "8"}
    assert r["ceiling"]["images_per_s"] == max(r["ceiling"]["by_batch"].values())
    (size,) = r["sizes"]
    assert size["size"] == "256x192"
    assert size["goal_images_per_s"] is None  # no goal for the smoke size
    assert [row["status"] for row in size["rows"]] == [eg.NO_CUDA, eg.NO_CUDA]
    assert size["rows"][1]["config"]["num_gpus_per_worker"] == 0.5  # as on a GPU, not run
    assert size["corpus"] is None  # nothing ran: nothing generated
    assert not list((tmp_path / "cache").glob("embed-gpu-*"))  # the runs' folder removed too
    import ray

    assert not ray.is_initialized()


def test_budget_skips_and_records(eg, tmp_path, quiet_env, capsys):
    out = tmp_path / "embed-gpu.json"
    argv = ["--device", "cpu", "--smoke", "--budget-s", "12", "--sizes", "256x192,512x384"]
    argv += ["--rows", "tasks-cpu,gpu-c1-calls1", "--cache", str(tmp_path), "--out", str(out)]
    assert eg.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["ceiling"]["status"] == eg.NO_BUDGET
    assert [s["size"] for s in r["sizes"]] == ["256x192", "512x384"]
    for s in r["sizes"]:
        assert [row["status"] for row in s["rows"]] == [eg.NO_BUDGET, eg.NO_CUDA]
        tasks = s["rows"][0]
        assert tasks["config"]["num_gpus_per_worker"] == 0.0  # CPU mode: a CPU model actor
        assert tasks["runs"] == {}
        assert s["corpus"] is None
    assert r["sizes"][1]["goal_images_per_s"] == eg.GOALS["512x384"]
    printed = capsys.readouterr().out
    assert "| tasks-cpu | - | - | - | - | - | - | not measured: budget |" in printed
    assert "### 512x384: goal 15000 img/s" in printed
