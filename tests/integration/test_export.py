"""Fine-tuned rankers through the registry, on a real ``mlflow server`` (S3 artifacts on
moto_server) and the session's Ray: ``keeper export --merge`` to a file and to S3, loaded back
through keeper's own ModelSpec loader and by ``keeper embed``; the folder export; the errors; and
``keeper evaluate`` / ``keeper promote`` on a fine-tuned version.

Every expectation is the tuned ranker's own (``TunedRanker.embed_pixels`` / ``rank``, computed
here with the adapters on), never the export's output."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from keeper_core import storage
from keeper_core.embedding import ClipEmbedder
from keeper_core.finetune import TunedRanker
from keeper_core.heads import HeadConfig, pad_series, series_softmax_loss
from keeper_core.metrics import series_metrics
from keeper_core.preparation import ImagePreparation
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import QUALITY_INPUTS, RankerConfig, SeriesRanker, fit_standardizer
from keeper_core.series import read_series_manifest
from keeper_core.synthetic import generate_corpus
from keeper_core.tower import TowerConfig
from keeper_train import tracking
from keeper_train.data import join_series
from keeper_train.jobs import embed, evaluate, export, promote

pytestmark = pytest.mark.integration

TINY = "keeper-tiny:random"
EXPERIMENT = "keeper-export-test"
QUALITY = list(QUALITY_INPUTS)


# --------------------------------------------------------------------------------------------
# helpers: a fine-tuned ranker whose tuning matters, logged and registered as train jobs do


def prepared(uris: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 3, S, S) uint8 and all quality features, as keeper embed prepares them."""
    prep = ImagePreparation(TINY)
    decoded = [prep.decode(storage.read_bytes(u), source=u) for u in uris]
    return prep.pixels(decoded), prep.quality(decoded)


def quality_columns(rows: pd.DataFrame) -> pd.DataFrame:
    _, q = prepared(rows["image_uri"].astype(str).tolist())
    out = rows.copy()
    for name in QUALITY:
        out[name] = q[:, FEATURE_NAMES.index(name)].astype(np.float64)
    return out


def tuned_ranker(
    folder: Path, method: str, rows: pd.DataFrame, *, quality: bool, head: Any = None
) -> TunedRanker:
    """keeper-tiny with ``method`` applied, every trainable tower tensor moved (LoRA's B starts
    at zero), saved to ``folder`` and loaded back. ``head``: weights to put in the head."""
    q = rows[QUALITY].to_numpy() if quality else None
    mean, std = fit_standardizer(q) if q is not None else ([], [])
    cfg = RankerConfig(
        head=HeadConfig(kind="linear", in_dim=64 + (len(QUALITY) if quality else 0)),
        features="embedding+quality" if quality else "embedding",
        embedding_spec="unsaved",
        embed_dim=64,
        quality_names=QUALITY if quality else [],
        quality_mean=mean,
        quality_std=std,
        tower=TowerConfig(base_spec=TINY, method=method, rank=4),  # type: ignore[arg-type]
    )
    ranker = TunedRanker.build(cfg, device="cpu", seed=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in [*ranker.parts.lora.values(), *ranker.parts.backbone.values()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if head is not None:
            ranker.model.head.load_state_dict(head)
    ranker.save(folder)
    return TunedRanker.load(folder, device="cpu")


def register(uri: str, name: str, folder: Path, example: pd.DataFrame) -> tuple[str, str]:
    """Log the saved ranker in ``folder`` in a new run and register it; (version, run id)."""
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = tracking.experiment_id(client, EXPERIMENT, folder.parent)
    with mlflow.start_run(experiment_id=exp) as run:
        info = tracking.log_ranker(folder, example)
        version = tracking.register(client, info.model_uri, name, run.info.run_id)
    return version, run.info.run_id


@dataclass
class Registered:
    name: str
    version: str
    run_id: str
    ranker: TunedRanker


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Three series of 96x72 JPEGs made from real photos, with their quality columns."""
    d = tmp_path_factory.mktemp("photos")
    manifest = generate_corpus(d, n_series=3, seed=5, image_size=(96, 72), max_shots=3)
    return quality_columns(read_series_manifest(str(manifest)))


@pytest.fixture(scope="module")
def registered(
    mlflow_server: Any, photos: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Registered]:
    """Two fine-tuned versions: LoRA over the embedding; last-blocks+lora with quality too."""
    out = {}
    for method, quality in (("lora", False), ("last-blocks+lora", True)):
        folder = tmp_path_factory.mktemp("tuned") / "ranker"
        ranker = tuned_ranker(folder, method, photos, quality=quality)
        cols = ["series_id", "image_uri", *(QUALITY if quality else [])]
        name = f"keeper-export-{method}"
        version, run_id = register(mlflow_server.uri, name, folder, photos[cols].head(4))
        out[method] = Registered(name, version, run_id, ranker)
    return out


def _export(uri: str, *argv: str) -> int:
    return export.main([*argv, "--tracking-uri", uri])


# --------------------------------------------------------------------------------------------
# keeper export


@pytest.mark.parametrize("method", ["lora", "last-blocks+lora"])
def test_merged_checkpoint_loads_as_a_model_spec_and_embeds_as_the_tuned_tower(
    method: str,
    registered: dict[str, Registered],
    photos: pd.DataFrame,
    mlflow_server: Any,
    ray_cluster: str,
    s3_bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = registered[method]
    uris = photos["image_uri"].astype(str).tolist()
    pixels, _ = prepared(uris)
    tuned = r.ranker.embed_pixels(pixels)
    base = ClipEmbedder(TINY, device="cpu").embed_pixels(pixels)
    assert np.abs(tuned - base).max() > 1e-2  # the tuning changes the embeddings

    # To a local file: the printed spec loads through keeper's loader.
    out = tmp_path / "out" / f"{method}.safetensors"
    capsys.readouterr()
    assert (
        _export(mlflow_server.uri, f"models:/{r.name}@challenger", "--merge", "--output", str(out))
        == 0
    )
    printed = capsys.readouterr().out
    spec = f"keeper-tiny:{out}"
    assert printed.strip().splitlines()[-1] == f"load it as: {spec}"
    assert f"-> {r.name} version {r.version}: fine-tuned ranker ({method})" in printed
    merged = ClipEmbedder(spec, device="cpu").embed_pixels(pixels)
    np.testing.assert_allclose(merged, tuned, atol=1e-5, rtol=0)

    data = out.read_bytes()
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["sha256"] == hashlib.sha256(data).hexdigest()
    assert (side["model_spec"], side["base_spec"], side["method"]) == (spec, TINY, method)
    assert (side["registered_name"], side["registered_version"]) == (r.name, r.version)
    assert (side["alias"], side["run_id"]) == ("challenger", r.run_id)
    assert side["tower_id"] == r.ranker.config.embedding_spec
    assert side["max_abs_diff"] < 1e-4

    # To S3: the same bytes, loadable as keeper-tiny:s3://...
    key = f"exports/{method}.safetensors"
    s3_out = f"s3://{s3_bucket}/{key}"
    assert (
        _export(mlflow_server.uri, f"models:/{r.name}/{r.version}", "--merge", "--output", s3_out)
        == 0
    )
    assert capsys.readouterr().out.strip().endswith(f"load it as: keeper-tiny:{s3_out}")
    s3_data = storage.read_bytes(s3_out)
    s3_side = json.loads(storage.read_bytes(f"{s3_out}.json"))
    assert s3_side["sha256"] == hashlib.sha256(s3_data).hexdigest()
    assert s3_side["alias"] is None  # exported by version
    from_s3 = ClipEmbedder(f"keeper-tiny:{s3_out}", device="cpu", cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(from_s3.embed_pixels(pixels), tuned, atol=1e-5, rtol=0)

    # keeper embed with that spec, on Ray Data: the tuned tower's embeddings of the same images.
    if method == "last-blocks+lora":  # one embed run covers the loader on Ray workers
        emb = str(tmp_path / "emb")
        manifest = tmp_path / "photos.csv"
        photos[["series_id", "image_uri"]].to_csv(manifest, index=False)
        summary = embed.run(
            embed.EmbedConfig(
                input=str(manifest), output=emb, model=spec, batch_size=8, ray_address=ray_cluster
            )
        )
        assert summary.status == "ok"
        assert summary.counts.embedded == len(uris)
        table = storage.read_parquet(storage.join(emb, embed.EMBEDDINGS)).to_pandas()
        assert set(table["model_spec"]) == {spec}
        by_uri = {
            storage.same_key(u): e
            for u, e in zip(table["image_uri"], table["embedding"], strict=True)
        }
        got = np.stack([np.asarray(by_uri[storage.same_key(u)], np.float32) for u in uris])
        np.testing.assert_allclose(got, tuned, atol=1e-4, rtol=0)


def test_folder_export_round_trips(
    registered: dict[str, Registered],
    mlflow_server: Any,
    photos: pd.DataFrame,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from keeper_core.ranker import load_ranker

    r = registered["last-blocks+lora"]
    out = tmp_path / "ranker-copy"
    assert _export(mlflow_server.uri, f"models:/{r.name}@challenger", "--output", str(out)) == 0
    assert "load it with keeper_core.ranker.load_ranker" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["ranker.json", "weights.safetensors", "adapter.safetensors", "blocks.safetensors"]
    )
    copy = load_ranker(out, device="cpu")
    assert isinstance(copy, TunedRanker)
    assert copy.config == r.ranker.config
    pd.testing.assert_frame_equal(copy.rank(photos), r.ranker.rank(photos))


def test_merging_a_head_and_unknown_versions_are_errors(
    mlflow_server: Any,
    photos: pd.DataFrame,
    registered: dict[str, Registered],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A head over keeper-tiny embeddings: nothing to merge; its folder exports fine.
    head = SeriesRanker(
        RankerConfig(
            head=HeadConfig(kind="linear", in_dim=64),
            features="embedding",
            embedding_spec=TINY,
            embed_dim=64,
        )
    )
    folder = head.save(tmp_path / "head")
    rows = photos[["series_id", "image_uri"]].head(4).copy()
    rows["embedding"] = list(
        ClipEmbedder(TINY, device="cpu").embed_pixels(prepared(list(rows["image_uri"]))[0])
    )
    name = "keeper-export-head"
    version, _ = register(mlflow_server.uri, name, folder, rows)
    out = tmp_path / "head.safetensors"
    capsys.readouterr()
    assert (
        _export(mlflow_server.uri, f"models:/{name}@challenger", "--merge", "--output", str(out))
        == 2
    )
    err = capsys.readouterr().err
    assert f"nothing to merge: {name} v{version} is a head over embeddings of {TINY}" in err
    assert not out.exists()
    assert not Path(f"{out}.json").exists()
    assert (
        _export(mlflow_server.uri, f"models:/{name}/{version}", "--output", str(tmp_path / "h"))
        == 0
    )
    assert isinstance(SeriesRanker.load(tmp_path / "h"), SeriesRanker)

    # An alias or a version that does not exist: refused, nothing written.
    r = registered["lora"]
    for uri in (f"models:/{r.name}@nope", f"models:/{r.name}/99"):
        capsys.readouterr()
        assert _export(mlflow_server.uri, uri, "--merge", "--output", str(out)) == 2
        err = capsys.readouterr().err
        assert f"keeper export: error: cannot load model '{uri}'" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# keeper evaluate and keeper promote on a fine-tuned version


def fitted_head(rows: pd.DataFrame) -> dict[str, torch.Tensor]:
    """A linear head over [embedding (64), standardised quality] that ranks by quality (fitted on
    ``rows`` with the series softmax) and leans a little on the embedding, so both parts count."""
    q = rows[QUALITY].to_numpy(dtype=np.float64)
    mean, std = fit_standardizer(q)
    z = ((q - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
    groups = [g.index.to_numpy() for _, g in rows.groupby("series_id", sort=True)]
    x, mask = pad_series([z[g] for g in groups])
    best = torch.tensor([int(np.argmax(rows["is_best"].to_numpy()[g])) for g in groups])
    torch.manual_seed(0)
    lin = torch.nn.Linear(len(QUALITY), 1)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        scores = lin(x).squeeze(-1).masked_fill(~mask, float("-inf"))
        series_softmax_loss(scores, mask, best).backward()
        opt.step()
    emb = 0.05 * torch.randn((1, 64), generator=torch.Generator().manual_seed(2))
    return {
        "net.weight": torch.cat([emb, lin.weight.detach()], dim=1),
        "net.bias": lin.bias.detach().clone(),
    }


def test_evaluate_and_promote_a_fine_tuned_version(
    ray_cluster: str,
    mlflow_server: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 20 series at 96x72, embedded with the base spec on Ray (the table gives rows and quality).
    manifest = str(generate_corpus(tmp_path / "corpus", n_series=20, seed=21, image_size=(96, 72)))
    emb = str(tmp_path / "emb")
    embed.run(embed.EmbedConfig(input=manifest, output=emb, batch_size=16, ray_address=ray_cluster))
    rows = join_series(emb, manifest)[0]
    ranker = tuned_ranker(
        tmp_path / "ranker", "last-blocks+lora", rows, quality=True, head=fitted_head(rows)
    )
    name = "keeper-tuned-promote"
    cols = ["series_id", "image_uri", *QUALITY]
    version, _ = register(mlflow_server.uri, name, tmp_path / "ranker", rows[cols].head(6))

    # evaluate's predictions are the tuned ranker's own, and its metrics are theirs.
    client = mlflow.MlflowClient(mlflow_server.uri)
    data = evaluate.load_data(emb, manifest)
    model = evaluate.load_model(client, f"models:/{name}@challenger")
    assert (model.kind, model.tuned) == ("fine-tuned", True)
    got = evaluate.predict(model, data)
    want = ranker.rank(rows[cols])
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-5, rtol=0)
    assert (got["rank"].to_numpy() == want["rank"].to_numpy()).all()

    summary = evaluate.run(
        evaluate.EvaluateConfig(
            model=f"models:/{name}@challenger", embeddings=emb, series=manifest,
            tracking_uri=mlflow_server.uri,
        )
    )  # fmt: skip
    m = summary["model"]
    assert (m["kind"], m["method"], m["base_spec"]) == ("fine-tuned", "last-blocks+lora", TINY)
    assert m["embedding_spec"] == ranker.config.embedding_spec != summary["embedding_spec"]
    groups = [g.index.to_numpy() for _, g in rows.groupby("series_id", sort=True)]
    best = [int(np.argmax(rows["is_best"].to_numpy()[g])) for g in groups]
    expect = series_metrics([want["score"].to_numpy()[g] for g in groups], best)
    assert summary["metrics"][f"{name} v{version}"] == pytest.approx(expect.as_dict())
    assert "fine-tuned ranker (last-blocks+lora on keeper-tiny:random)" in evaluate.format_summary(
        summary
    )

    # promote: the same gate; no champion yet, so it must surely beat random, which it does.
    assert expect.top1 > expect.random_top1 + 0.3  # (fitted here: the gate has a clear case)
    out = tmp_path / "promote.json"
    argv = [name, "--embeddings", emb, "--series", manifest, "--tracking-uri", mlflow_server.uri]
    assert promote.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["decision"], result["challenger"], result["gain_vs"]) == (
        "promoted",
        version,
        "random",
    )
    assert result["metrics"][f"challenger v{version}"] == pytest.approx(expect.as_dict())
    assert result["gain"]["low"] > 0
    assert tracking.aliases(client, name) == {"challenger": version, "champion": version}
    assert "PROMOTED" in capsys.readouterr().out
