"""`make demo` end to end, its five steps in the Makefile's order on one small corpus: the embed job
on Ray, metrics and HTML report, a head trained with whole base photos held out, promoted through
the gate and evaluated on those photos; that champion served over HTTP; a camera library culled
with it; a LoRA fine-tune registered beside it; one /v1/select with a tiny VLM.

Steps 2 and 5 join the session's Ray and Serve (as they join a running one), step 3 its Ray: each
starts its own local Ray under `make demo`, which is the only difference."""

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
    shared_serve: int,
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

    # Step 2: the champion served over HTTP (here on the session's Serve, which the demo joins
    # as it would a running one), /v1/rank on the held-out series and /v1/score/aesthetic.
    from keeper_serve import demo as serve_demo
    from keeper_train.jobs import pick_demo

    capsys.readouterr()
    assert serve_demo.main(["--out", str(tmp_path), "--port", str(shared_serve)]) == 0
    printed = capsys.readouterr().out
    served = json.loads((tmp_path / "serve-demo.json").read_text())
    assert oct((tmp_path / "serve-demo-token").stat().st_mode & 0o777) == "0o600"
    model = served["rank"]["model"]
    assert (model["name"], model["version"], model["alias"]) == (NAME, "1", "champion")
    assert served["models"]["clip"]["random_weights"] is True
    test_series = set(test["series_id"].astype(str))
    ranked = served["rank"]["series"]
    assert len(ranked) == 4
    assert {s["id"] for s in ranked} <= test_series  # the held-out series, not trained on
    for s in ranked:
        assert 0 <= s["keeper_index"] < len(s["probabilities"])
        assert sum(s["probabilities"]) == pytest.approx(1, abs=1e-4)
    hits = sum(s["keeper_index"] == served["true_keepers"][s["id"]] for s in ranked)
    assert f"picked the true keeper in {hits} of 4 series" in printed
    assert len(served["aesthetic"]["scores"]) == len(
        test[test["series_id"].astype(str) == ranked[0]["id"]]
    )
    assert "model weights are RANDOM (keeper-tiny:random)" in printed

    # Step 3: a camera library (capture times, no labels) culled with that champion: every file
    # accounted for, the file that is not a photo listed as failed, not lost.
    assert pick_demo.main(["--out", str(tmp_path), "--bursts", "12"]) == 0
    printed = capsys.readouterr().out
    picked = json.loads((tmp_path / "picks" / "_SUMMARY.json").read_text())
    assert picked["status"] == "ok"
    assert picked["ranker"].startswith(f"{NAME} v1")
    culled = picked["counts"]
    assert culled["in"] == culled["picked"] + culled["failed"], culled
    assert (culled["failed"], culled["lost"]) == (1, 0), culled
    failed = pd.read_csv(tmp_path / "picks" / "failed.csv")
    assert [Path(u).name for u in failed["image_uri"]] == ["NOTES.jpg"]
    assert "keeper pick  OK" in printed
    assert "truth     (the generator's, never shown to keeper pick)" in printed
    assert (tmp_path / "picks" / "index.html").exists()

    # Step 4: a LoRA fine-tune registered (v2) beside the champion head, one evaluate table with
    # both, the tuned tower exported as a checkpoint keeper's loader takes.
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
    assert f"{NAME} v2 (fine-tuned lora, embedding+quality)" in printed
    assert "sharpness rule" in printed
    sidecar = json.loads((tmp_path / "tuned-tower.safetensors.json").read_text())
    assert sidecar["registered_version"] == "2"
    adapters = (tmp_path / "mlartifacts").rglob("ranker/adapter.safetensors")
    tuned = [r for f in adapters if isinstance(r := load_ranker(f.parent), TunedRanker)]
    assert len(tuned) == 1
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), np.uint8)
    checkpoint = tmp_path / "tuned-tower.safetensors"
    merged = ClipEmbedder(f"keeper-tiny:{checkpoint}", device="cpu").embed_pixels(pixels)
    assert np.abs(merged - tuned[0].embed_pixels(pixels)).max() < 1e-5

    # Step 5: one /v1/select over HTTP with a tiny random VLM, every stage accounted for.
    from keeper_serve import select_demo

    argv5 = ["--out", str(tmp_path), "--candidates", "10", "--top-n", "4", "--top-k", "2"]
    assert select_demo.main([*argv5, "--port", str(shared_serve)]) == 0
    printed = capsys.readouterr().out
    answer = json.loads((tmp_path / "select-demo.json").read_text())["answer"]
    assert answer["cost"] == {"candidates": 10, "vlm_calls": answer["cost"]["vlm_calls"],
                              "ms": answer["cost"]["ms"]}  # fmt: skip
    assert 1 <= answer["cost"]["vlm_calls"] <= 4
    for stage in answer["stages"]:
        assert stage["n_in"] == stage["n_kept"] + stage["n_dropped"]
        assert f"{stage['name']:<11} {stage['n_in']:>4} {stage['n_kept']:>5}" in printed
    assert len(answer["picks"]) == answer["stages"][-1]["n_kept"] <= 2
    assert answer["models"]["vlm"]["status"] == "ready"
    assert "the VLM is keeper_core.tiny_vlm's, with random weights" in printed
    assert "model weights are RANDOM (keeper-tiny:random)" in printed
    assert (tmp_path / "tiny-vlm" / "keeper.json").exists()
