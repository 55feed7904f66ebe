"""The model registry end to end, on a real ``mlflow server`` (S3 artifacts on moto_server):
train -> promote on held-out series -> load @champion in a fresh process; the promotion gate
(training data refused, the gain's interval); rollback, and a rolled-back version kept out of
service; evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import negated, register_ranker

from keeper_core import storage
from keeper_core.metrics import series_metrics
from keeper_core.ranker import SeriesRanker
from keeper_core.series import read_series_manifest
from keeper_core.synthetic import generate_corpus
from keeper_train import tracking
from keeper_train.data import join_series
from keeper_train.jobs import embed, evaluate, promote, train_head

pytestmark = pytest.mark.integration

NAME = "keeper-ranker-test"
EXPERIMENT = "keeper-registry-test"


@dataclass
class Trained:
    manifest: str  # what the head was trained on (split into train / val / test)
    holdout: str  # 24 series of another corpus: never seen in training
    embeddings: str
    uri: str  # the tracking URI
    summary: dict[str, Any]  # train_head.run's
    rows: pd.DataFrame  # the manifest joined to the embedding table
    ranker_dir: Path  # the ranker as the training run logged it (ranker.json + safetensors)

    def data_args(self, series: str | None = None) -> list[str]:
        return [
            *("--embeddings", self.embeddings, "--series", series or self.holdout),
            *("--tracking-uri", self.uri),
        ]


@pytest.fixture(scope="module")
def trained(
    ray_cluster: str, mlflow_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    """40 series, embedded on Ray, one MLP head trained and registered (version 1 @challenger);
    24 held-out series of another corpus embedded in the same table."""
    d = tmp_path_factory.mktemp("registry")
    manifest = str(generate_corpus(d / "corpus", n_series=40, seed=11))
    holdout = str(generate_corpus(d / "holdout", n_series=24, seed=12))
    both = pd.concat([read_series_manifest(manifest), read_series_manifest(holdout)])
    both.to_csv(d / "both.csv", index=False)  # resolved URIs: one table for the two corpora
    emb = str(d / "emb")
    embed.run(embed.EmbedConfig(input=str(d / "both.csv"), output=emb, ray_address=ray_cluster))
    summary = train_head.run(
        train_head.TrainHeadConfig(
            embeddings=emb,
            series=manifest,
            head="mlp",
            epochs=8,
            register=NAME,
            tracking_uri=mlflow_server.uri,
            storage=str(d / "ckpt"),
            data_dir=str(d / "data"),
            ray_address=ray_cluster,
            baselines=False,
        )
    )
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=summary["model_uri"],
        dst_path=str(d / "logged"),
        tracking_uri=mlflow_server.uri,
    )
    ranker_dir = next(Path(local).rglob("ranker.json")).parent
    rows = join_series(emb, manifest)[0]
    return Trained(manifest, holdout, emb, mlflow_server.uri, summary, rows, ranker_dir)


def _promote(t: Trained, out: Path, *extra: str) -> dict[str, Any]:
    assert promote.main([NAME, *t.data_args(), "--json", str(out), *extra]) == 0
    return dict(json.loads(out.read_text()))


def _refused(t: Trained, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert promote.main([NAME, *argv]) == 2
    return capsys.readouterr().err


def _version(t: Trained, version: str) -> Any:
    return mlflow.MlflowClient(t.uri).get_model_version(NAME, version)


def test_register_promote_gate_and_rollback(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = trained
    assert t.summary["registered"] == {"name": NAME, "version": "1", "alias": "challenger"}
    client = mlflow.MlflowClient(t.uri)

    # The training manifest holds v1's train and val series: refused, naming how many.
    counts = t.summary["series"]
    err = _refused(t, capsys, *t.data_args(t.manifest))
    seen = counts["train"] + counts["val"]
    assert f"{seen} of 40 series ({counts['train']} with train images" in err
    assert "trained or validated on: promote on held-out series only" in err
    assert tracking.aliases(client, NAME) == {"challenger": "1"}

    # No champion yet: the first challenger is promoted because it surely beats random.
    first = _promote(t, tmp_path / "p1.json")
    m1 = first["metrics"]["challenger v1"]
    assert m1["n_series"] == 24
    assert first["gain"]["low"] > 0  # the interval's lower bound, over random
    assert (first["decision"], first["champion"], first["gain_vs"]) == ("promoted", None, "random")
    assert first["warnings"] == []
    assert tracking.aliases(client, NAME) == {"challenger": "1", "champion": "1"}
    tags = _version(t, "1").tags
    assert tags["keeper.promotion.decision"] == "promoted"
    assert "beats random" in tags["keeper.promotion.reason"]
    assert "95% CI" in tags["keeper.promotion.reason"]
    assert float(tags["keeper.promotion.challenger_top1"]) == pytest.approx(m1["top1"], abs=1e-6)
    assert float(tags["keeper.promotion.gain_ci_low"]) == pytest.approx(first["gain"]["low"])
    assert tags["keeper.promotion.champion_version"] == "none"
    assert tags["keeper.promotion.overlap"] == "none with the recorded split (24 series checked)"
    assert "PROMOTED keeper-ranker-test v1" in capsys.readouterr().out

    # @champion in a fresh process (pyfunc from the registry, S3 artifacts through the server)
    # scores exactly as the training's own ranker does here.
    ranker = SeriesRanker.load(t.ranker_dir)
    cols = ["series_id", "image_uri", "embedding", *ranker.config.quality_names]
    t.rows[cols].to_parquet(tmp_path / "rows.parquet")
    script = textwrap.dedent(f"""
        import json, sys
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
        out = model.predict(pd.read_parquet({str(tmp_path / "rows.parquet")!r}))
        print(json.dumps({{"image_uri": out["image_uri"].tolist(), "score": out["score"].tolist(),
                           "keeper_train": "keeper_train" in sys.modules}}))
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": t.uri}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["keeper_train"] is False  # a Serve replica needs only keeper_core
    here = ranker.rank(t.rows[cols])
    assert fresh["image_uri"] == here["image_uri"].tolist()
    np.testing.assert_allclose(fresh["score"], here["score"].to_numpy(), atol=1e-5, rtol=0)

    # Promoting again is a no-op: the challenger already is the champion.
    assert _promote(t, tmp_path / "p1b.json")["decision"] == "unchanged"

    # A deliberately worse challenger (reversed rankings) is rejected; the champion stays. Its run
    # recorded no split, which the outcome says.
    v2 = register_ranker(
        t.uri,
        NAME,
        negated(SeriesRanker.load(t.ranker_dir)),
        t.rows,
        tmp_path / "worse",
        EXPERIMENT,
    )
    worse = _promote(t, tmp_path / "p2.json")
    m2, champ = worse["metrics"][f"challenger v{v2}"], worse["metrics"]["champion v1"]
    assert champ == m1  # the champion's numbers are reproduced on the same data
    assert m2["top1"] < champ["top1"]
    assert m2["mrr"] < champ["mrr"]
    assert worse["gain"]["high"] < 0
    assert worse["decision"] == "rejected"
    assert worse["warnings"] == [
        f"{NAME} v{v2}'s run recorded no split.csv: whether these series are held out could "
        "not be checked"
    ]
    assert tracking.aliases(client, NAME) == {"challenger": v2, "champion": "1"}
    tags = _version(t, v2).tags
    assert tags["keeper.promotion.decision"] == "rejected"
    assert "below the +1.0 required" in tags["keeper.promotion.reason"]
    assert "not surely better" in tags["keeper.promotion.reason"]
    assert "MRR" in tags["keeper.promotion.reason"]
    assert tags["keeper.promotion.champion_version"] == "1"
    assert tags["keeper.promotion.overlap"] == "not checked: no split recorded"
    assert float(tags["keeper.promotion.champion_top1"]) == pytest.approx(m1["top1"], abs=1e-6)
    assert float(tags["keeper.promotion.champion_mrr"]) == pytest.approx(m1["mrr"], abs=1e-6)
    assert float(tags["keeper.promotion.challenger_mrr"]) == pytest.approx(m2["mrr"], abs=1e-6)

    # An equal challenger: not better, so not promoted at --min-gain 0; promoted when a drop of
    # 5 points is allowed (its interval is exactly 0: the same keepers on every series).
    v3 = register_ranker(
        t.uri, NAME, SeriesRanker.load(t.ranker_dir), t.rows, tmp_path / "same", EXPERIMENT
    )
    assert _promote(t, tmp_path / "p3a.json", "--min-gain", "0")["decision"] == "rejected"
    same = _promote(t, tmp_path / "p3.json", "--min-gain", "-0.05")
    assert same["decision"] == "promoted"
    assert same["gain"] == {"estimate": 0.0, "low": 0.0, "high": 0.0, "confidence": 0.95, "n": 24}
    assert same["metrics"][f"challenger v{v3}"] == m1
    assert tracking.aliases(client, NAME) == {
        "challenger": v3,
        "champion": v3,
        tracking.PREVIOUS_CHAMPION: "1",
    }
    assert _version(t, v3).tags["keeper.promotion.previous_champion"] == "1"

    # Rollback restores v1, says so on both versions, and takes @challenger off v3.
    capsys.readouterr()
    assert promote.main([NAME, "--rollback", "--tracking-uri", t.uri]) == 0
    assert f"@champion v{v3} -> v1 (v{v3} is no longer @challenger)" in capsys.readouterr().out
    assert tracking.aliases(client, NAME) == {"champion": "1"}
    assert _version(t, "1").tags["keeper.rollback.restored_from"] == v3
    assert _version(t, v3).tags["keeper.rollback.rolled_back_to"] == "1"

    # The next plain promote has nothing to promote; pointing @challenger at v3 again does not
    # bring it back either; naming it without --force does not.
    assert "has no @challenger version" in _refused(t, capsys, *t.data_args())
    client.set_registered_model_alias(NAME, "challenger", v3)
    for argv in ([], ["--version", v3]):
        err = _refused(t, capsys, *t.data_args(), *argv)
        assert f"{NAME} v{v3} was rolled back (keeper.rollback.rolled_back_at=" in err
        assert "keeper.rollback.rolled_back_to=1)" in err
        assert f"keeper promote {NAME} --version {v3} --force" in err
    assert tracking.aliases(client, NAME) == {"challenger": v3, "champion": "1"}

    # Named and forced, it goes through the gate again and is recorded as forced.
    forced = _promote(t, tmp_path / "p4.json", "--version", v3, "--force", "--min-gain", "-0.05")
    assert forced["decision"] == "promoted"
    assert _version(t, v3).tags["keeper.promotion.forced_after_rollback"] == "true"
    assert tracking.aliases(client, NAME)["champion"] == v3

    # Two rollbacks walk back to v1; a third has nowhere to go.
    assert promote.main([NAME, "--rollback", "--tracking-uri", t.uri]) == 0
    assert tracking.aliases(client, NAME)["champion"] == "1"
    assert "no previous champion to roll back to" in _refused(
        t, capsys, "--rollback", "--tracking-uri", t.uri
    )


def test_evaluate_table_json_and_report(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = trained
    client = mlflow.MlflowClient(t.uri)
    client.set_registered_model_alias(NAME, "evaluated", "1")  # an alias no other test moves
    # A missing image gets a placeholder in the report, not an error.
    gone = Path(t.rows["image_uri"].iloc[0])
    moved = gone.rename(tmp_path / "moved.jpg")
    try:
        argv = ["--model", f"models:/{NAME}@evaluated", *t.data_args(t.manifest)]
        argv += ["--json", str(tmp_path / "e.json"), "--html", str(tmp_path / "e.html")]
        assert evaluate.main(argv) == 0
    finally:
        moved.rename(gone)
    printed = capsys.readouterr().out
    assert f"models:/{NAME}@evaluated -> {NAME} version 1" in printed
    for row in (f"{NAME} v1", "sharpness rule", "random"):
        assert row in printed

    result = json.loads((tmp_path / "e.json").read_text())
    assert result["model"]["version"] == "1"
    assert result["model"]["alias"] == "evaluated"
    assert result["model"]["loaded"] == f"models:/{NAME}/1"
    assert result["model"]["embedding_spec"] == result["embedding_spec"] == "keeper-tiny:random"
    assert result["trained_on_this_manifest"] is True
    counts = t.summary["series"]
    assert result["series_seen_in_training"] == counts["train"] + counts["val"]
    assert f"share images with {NAME} v1's training split" in result["warnings"][0]
    assert result["series_scored"] == 40
    # The numbers are the ones the logged ranker and the sharpness column give here.
    ranked = SeriesRanker.load(t.ranker_dir).rank(t.rows)
    groups = [g.index.to_numpy() for _, g in t.rows.groupby("series_id", sort=True)]
    best = [int(np.argmax(t.rows["is_best"].to_numpy()[g])) for g in groups]
    model = series_metrics([ranked["score"].to_numpy()[g] for g in groups], best)
    sharpness = t.rows["sharpness"].to_numpy(dtype=np.float64)
    sharp = series_metrics([sharpness[g] for g in groups], best)
    assert result["metrics"][f"{NAME} v1"] == pytest.approx(model.as_dict())
    assert result["metrics"]["sharpness rule"] == pytest.approx(sharp.as_dict())
    assert result["table"] in printed

    html = (tmp_path / "e.html").read_text()
    assert html.count("class='series'") == 40
    assert html.count("data:image/jpeg;base64,") == len(t.rows) - 1
    assert html.count("(no image)") == 1
    assert html.count("tag keep") == 40 + 1  # every series' keeper, plus the legend


def test_evaluate_refuses_embeddings_of_another_spec(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = trained
    table = storage.read_parquet(storage.join(t.embeddings, "embeddings")).to_pandas()
    table["model_spec"] = "ViT-B-32:laion2b_s34b_b79k"
    (tmp_path / "emb" / "embeddings").mkdir(parents=True)
    table.to_parquet(tmp_path / "emb" / "embeddings" / "part-0.parquet")
    # By the training run's logged-model URI: no registry involved.
    argv = ["--model", t.summary["model_uri"], "--embeddings", str(tmp_path / "emb")]
    argv += ["--series", t.manifest, "--tracking-uri", t.uri]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "from 'ViT-B-32:laion2b_s34b_b79k'" in err
    assert "trained on 'keeper-tiny:random'" in err
    assert "specs never mix" in err
