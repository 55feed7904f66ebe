"""`make demo`'s job end to end on a small corpus: embed job on Ray, metrics, HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keeper_train.jobs import demo

pytestmark = pytest.mark.integration


def test_demo_end_to_end(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path), "--series", "30", "--report-series", "5", "--epochs", "5"]
    assert demo.main([*argv, "--ray-address", ray_cluster]) == 0
    printed = capsys.readouterr().out
    for row in ("sharpness rule", "aesthetic prompts", "random", "keeper embed  OK"):
        assert row in printed
    assert "RANDOM (keeper-tiny:random)" in printed

    result = json.loads((tmp_path / "metrics.json").read_text())
    counts = result["embed"]["counts"]
    assert counts["in"] == counts["skipped"] + counts["embedded"] + counts["failed"]
    assert counts["failed"] == 0
    assert result["random_weights"] is True
    assert result["series_scored"] == 30
    sharp = result["metrics"]["sharpness rule"]
    assert sharp["n_series"] == 30
    assert 0.0 <= sharp["top1"] <= sharp["top2"] <= sharp["top3"] <= 1.0

    html = (tmp_path / "report.html").read_text()
    assert html.count("class='series'") == 5
    assert "data:image/jpeg;base64," in html
    assert "meaningless" in html

    # The learning stage: trained on Ray Train, registered, promoted, evaluated on test series.
    learned = result["learned"]
    assert learned["train"]["registered"]["version"] == "1"
    assert learned["promotion"].startswith("promoted v1")
    assert learned["evaluation"]["model"]["version"] == "1"
    assert "trained head" in printed
    assert "class='series'" in (tmp_path / "ranker-report.html").read_text()
    assert (tmp_path / "mlflow.db").exists()

    # A second run reuses the embedding table (nothing embedded twice) and registers v2, which
    # the gate judges against the v1 champion.
    assert demo.main([*argv, "--ray-address", ray_cluster]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["embed"]["counts"]["embedded"] == 0
    assert again["embed"]["counts"]["skipped"] == counts["in"]
    assert again["learned"]["train"]["registered"]["version"] == "2"
    assert again["learned"]["promotion"].split()[:2] in (["promoted", "v2:"], ["rejected", "v2:"])
