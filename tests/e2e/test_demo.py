"""`make demo`'s job, end to end on a small corpus: metrics, report, counts that add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keeper_core import demo


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--out", str(tmp_path), "--series", "12", "--report-series", "5"]) == 0
    printed = capsys.readouterr().out
    for row in ("sharpness rule", "aesthetic prompts", "random"):
        assert row in printed
    assert "RANDOM (keeper-tiny:random)" in printed

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["random_weights"] is True
    assert summary["images_in"] == summary["images_done"] + summary["images_failed"]
    assert summary["images_failed"] == 0
    sharp = summary["metrics"]["sharpness rule"]
    assert sharp["n_series"] == 12
    assert 0.0 <= sharp["top1"] <= sharp["top2"] <= sharp["top3"] <= 1.0

    html = (tmp_path / "report.html").read_text()
    assert html.count("class='series'") == 5
    assert "data:image/jpeg;base64," in html
    assert "meaningless" in html


def test_demo_records_bad_images(tmp_path: Path) -> None:
    manifest = Path(
        demo.generate_corpus(tmp_path / "corpus", n_series=3, seed=1, min_shots=3, max_shots=3)
    )
    first_image = manifest.read_text().splitlines()[1].split(",")[1]
    Path(first_image).write_bytes(b"not an image at all")
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--manifest", str(manifest)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["images_in"] == 9
    assert summary["images_failed"] == 1
    assert "not_image" in summary["errors"][first_image]
    # The damaged series still has two shots; it is scored only if its keeper survived.
    assert summary["metrics"]["sharpness rule"]["n_series"] in (2, 3)
