"""`make demo`'s job end to end on a small corpus: embed job on Ray, metrics, HTML report, a head
trained with whole base photos held out, promoted through the gate, evaluated on those photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keeper_core import storage
from keeper_core.metrics import series_metrics
from keeper_core.series import read_series_manifest
from keeper_train.jobs import demo, embed

pytestmark = pytest.mark.integration

NAME = "keeper-demo-ranker"


def test_demo_end_to_end(
    ray_cluster: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The demo's embedded store, whatever ran before in this process: mlflow.set_tracking_uri
    # (MLflow 3) also sets MLFLOW_TRACKING_URI, which keeper reads as the user's choice.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # 51 series: three bursts of each of the 17 base photos, so the 4 test photos give 12 series.
    argv = ["--out", str(tmp_path), "--series", "51", "--report-series", "5", "--epochs", "20"]
    assert demo.main([*argv, "--ray-address", ray_cluster]) == 0
    printed = capsys.readouterr().out
    for row in ("sharpness rule", "aesthetic prompts", "random", "keeper embed  OK"):
        assert row in printed
    assert "RANDOM (keeper-tiny:random)" in printed
    assert f"base photos never trained on: {', '.join(demo.DEMO_TEST_PHOTOS)}" in printed

    result = json.loads((tmp_path / "metrics.json").read_text())
    counts = result["embed"]["counts"]
    assert counts["in"] == counts["skipped"] + counts["embedded"] + counts["failed"]
    assert counts["failed"] == 0
    assert result["random_weights"] is True
    assert result["series_scored"] == 51
    # The zero-shot sharpness row is the sharpness column of the table, ranked per series.
    manifest = read_series_manifest(str(tmp_path / "corpus" / "manifest.csv"))
    table = storage.read_parquet(str(Path(result["embed"]["output"]) / embed.EMBEDDINGS))
    rows = manifest.merge(table.to_pandas(), on="image_uri")
    groups = [g for _, g in rows.groupby("series_id", sort=True)]
    expected = series_metrics(
        [g["sharpness"].to_numpy(dtype=np.float64) for g in groups],
        [int(np.argmax(g["is_best"].to_numpy())) for g in groups],
    )
    assert result["metrics"]["sharpness rule"] == pytest.approx(expected.as_dict())

    html = (tmp_path / "report.html").read_text()
    assert html.count("class='series'") == 5
    assert "data:image/jpeg;base64," in html
    assert "meaningless" in html

    # The learning stage: the test series are exactly the bursts of the held-out photos.
    test = pd.read_csv(tmp_path / "test-manifest.csv")
    assert set(test["base_photo"]) == set(demo.DEMO_TEST_PHOTOS)
    assert test["series_id"].nunique() == 12
    learned = result["learned"]
    assert learned["train"]["registered"]["version"] == "1"
    head = learned["train"]["test"]["trained head"]
    assert head["n_series"] == 12
    # Random weights, but the quality features carry the signal: well above chance on photos it
    # never saw (random top-1 here is about 30 %).
    assert head["top1"] >= head["random_top1"] + 0.25
    # No champion yet: promoted because its top-1 surely beats random on those 12 series.
    assert learned["promotion"].startswith("promoted v1: no champion yet")
    assert "beats random" in learned["promotion"]
    assert learned["promotion_outcome"]["gain"]["low"] > 0
    # @champion evaluated on the same series gives the training run's own test numbers.
    evaluated = learned["evaluation"]
    assert evaluated["model"]["version"] == "1"
    assert evaluated["metrics"][f"{NAME} v1"] == pytest.approx(head)
    assert "trained head" in printed
    assert "class='series'" in (tmp_path / "ranker-report.html").read_text()
    assert (tmp_path / "mlflow.db").exists()

    # A second run reuses the embedding table (nothing embedded twice) and registers v2, trained
    # on the same data with the same seed. It finds the same keepers as v1, give or take a
    # series, which the gate does not take for an improvement: rejected, v1 stays champion.
    assert demo.main([*argv, "--ray-address", ray_cluster]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["embed"]["counts"]["embedded"] == 0
    assert again["embed"]["counts"]["skipped"] == counts["in"]
    assert again["learned"]["train"]["registered"]["version"] == "2"
    outcome = again["learned"]["promotion_outcome"]
    assert (outcome["decision"], outcome["champion"]) == ("rejected", "1")
    assert "not surely better" in outcome["reason"]
    assert again["learned"]["evaluation"]["model"]["version"] == "1"

    # `make demo`'s last step: a LoRA fine-tune registered (v3) beside the champion head, one
    # evaluate table with both, the tuned tower exported as a checkpoint keeper's loader takes.
    from keeper_core.embedding import ClipEmbedder
    from keeper_core.finetune import TunedRanker
    from keeper_core.ranker import load_ranker
    from keeper_train.jobs import finetune_demo

    capsys.readouterr()
    tune = ["--out", str(tmp_path), "--epochs", "2", "--ray-address", ray_cluster]
    assert finetune_demo.main(tune) == 0
    printed = capsys.readouterr().out
    assert "lora on keeper-tiny:random" in printed
    assert f"{NAME} v1 (mlp, embedding+quality)" in printed
    assert f"{NAME} v3 (fine-tuned lora, embedding+quality)" in printed
    assert "sharpness rule" in printed
    sidecar = json.loads((tmp_path / "tuned-tower.safetensors.json").read_text())
    assert sidecar["registered_version"] == "3"
    adapters = (tmp_path / "mlartifacts").rglob("ranker/adapter.safetensors")
    tuned = [r for f in adapters if isinstance(r := load_ranker(f.parent), TunedRanker)]
    assert len(tuned) == 1
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), np.uint8)
    checkpoint = tmp_path / "tuned-tower.safetensors"
    merged = ClipEmbedder(f"keeper-tiny:{checkpoint}", device="cpu").embed_pixels(pixels)
    assert np.abs(merged - tuned[0].embed_pixels(pixels)).max() < 1e-5
