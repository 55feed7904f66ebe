"""``evaluate.load_model`` (used by ``keeper evaluate``, ``keeper pick --model`` and ``keeper
promote``) loads a model's files, never its code: a pyfunc whose artifact runs code when MLflow
loads it (models-from-code or a pickled python_model) is refused and its code never runs, and a
keeper ranker logged as train-head logs it loads, from the client's store, and predicts as
``mlflow.pyfunc.load_model``'s model of it does.

Every store is a local sqlite one in ``tmp_path``; no server.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.pyfunc import PythonModel
from PIL import Image

from keeper_core import registry
from keeper_core.errors import DataError, ModelLoadError
from keeper_core.finetune import TunedRanker
from keeper_core.heads import HeadConfig
from keeper_core.mlflow_pyfunc import ARTIFACT_KEY
from keeper_core.ranker import QUALITY_INPUTS, RankerConfig, SeriesRanker, fit_standardizer
from keeper_core.tower import TowerConfig
from keeper_train import tracking
from keeper_train.jobs import evaluate

TINY = "keeper-tiny:random"
QUALITY = list(QUALITY_INPUTS)
NAME = "keeper-safe-load"
MARKER_ENV = "KEEPER_TEST_CODE_RAN"  # where the planted code writes its marker

# A models-from-code pyfunc that is not a keeper ranker: MLflow runs this file when it loads it.
PLANTED_CODE = f"""
import os
from pathlib import Path

import mlflow

if os.environ.get({MARKER_ENV!r}):
    Path(os.environ[{MARKER_ENV!r}]).write_text("the artifact store's code ran")


class Planted(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Planted())
"""


class Pickled(PythonModel):
    """A python_model that, unpickled, writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "unpickled"))

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
        return model_input


@dataclass
class Store:
    uri: str
    client: Any
    dir: Path
    experiment: str

    def log(self, name: str = NAME, **log_model: Any) -> tuple[str, str]:
        """``mlflow.pyfunc.log_model(**log_model)`` in a new run, registered: (version, run id)."""
        with mlflow.start_run(experiment_id=self.experiment) as run:
            info = mlflow.pyfunc.log_model(name="model", **log_model)
            version = tracking.register(self.client, info.model_uri, name, run.info.run_id)
        return version, run.info.run_id

    def log_ranker(self, folder: Path, example: pd.DataFrame, name: str = NAME) -> str:
        """Log a saved ranker as train-head does (``tracking.log_ranker``) and register it."""
        with mlflow.start_run(experiment_id=self.experiment) as run:
            info = tracking.log_ranker(folder, example)
            return tracking.register(self.client, info.model_uri, name, run.info.run_id)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # where log_model logs (the active run's store)
    client = mlflow.MlflowClient(uri)
    try:
        yield Store(uri, client, tmp_path, tracking.experiment_id(client, "safe-load", tmp_path))
    finally:
        mlflow.set_tracking_uri(before)


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders ``registry.download_model`` downloads into, and the ranker folder each time."""
    seen: list[Path] = []
    real = registry.download_model

    def spy(client: Any, ref: Any, dst: str | Path) -> tuple[Path, Path]:
        root, folder = real(client, ref, dst)
        seen.extend([Path(dst), folder])
        return root, folder

    monkeypatch.setattr(registry, "download_model", spy)
    return seen


def head_rows(n_series: int = 4, per: int = 3, dim: int = 8) -> pd.DataFrame:
    """Rows of an embedding table joined to a manifest (float32 columns, as the table has)."""
    rng = np.random.default_rng(0)
    n = n_series * per
    rows = pd.DataFrame(
        {
            "series_id": [f"s{i // per:02d}" for i in range(n)],
            "image_uri": [f"/photos/{i:03d}.jpg" for i in range(n)],
            "embedding": [rng.standard_normal(dim).astype(np.float32) for _ in range(n)],
        }
    )
    for q in QUALITY:
        rows[q] = rng.standard_normal(n).astype(np.float32)
    rows["is_best"] = [int(i % per == 0) for i in range(n)]
    return rows


def head_ranker(rows: pd.DataFrame, dim: int = 8) -> SeriesRanker:
    mean, std = fit_standardizer(rows[QUALITY].to_numpy())
    torch.manual_seed(0)
    return SeriesRanker(
        RankerConfig(
            head=HeadConfig(kind="mlp", in_dim=dim + len(QUALITY), hidden=16, layers=1),
            features="embedding+quality", embedding_spec=TINY, embed_dim=dim,
            quality_names=QUALITY, quality_mean=mean, quality_std=std,
        )
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# code in the artifact store never runs


def test_a_models_from_code_pyfunc_is_refused_and_its_code_never_runs(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = tmp_path / "planted.py"
    code.write_text(PLANTED_CODE)
    version, run_id = store.log(python_model=str(code))  # (logging runs it: no marker set yet)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))

    for uri in (f"models:/{NAME}/{version}", f"models:/{NAME}@challenger", f"runs:/{run_id}/model"):
        with pytest.raises(ModelLoadError) as e:
            evaluate.load_model(store.client, uri)
        assert not marker.exists(), uri
        assert e.value.spec == uri
        assert "is not a keeper ranker" in e.value.cause
    with pytest.raises(ModelLoadError):
        evaluate.load_models(store.client, [f"models:/{NAME}@challenger"])
    assert not marker.exists()

    # The payload is live: the loader evaluate used to call runs it.
    mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    assert marker.read_text() == "the artifact store's code ran"


def test_a_pickled_python_model_is_refused_even_where_pickle_is_allowed(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "unpickled"
    version, _ = store.log(python_model=Pickled(marker), pip_requirements=["mlflow"])
    marker.unlink(missing_ok=True)  # (logging may load it back to check it)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")

    uri = f"models:/{NAME}/{version}"
    with pytest.raises(ModelLoadError) as e:
        evaluate.load_model(store.client, uri)
    assert not marker.exists()
    assert e.value.spec == uri
    assert "is not a keeper ranker" in e.value.cause

    # The payload is live: MLflow's loader unpickles it (then fails on what it built: an int).
    with pytest.raises(AttributeError, match="load_context"):
        mlflow.pyfunc.load_model(uri)
    assert marker.read_text() == "unpickled"


def test_planted_code_beside_a_ranker_folder_is_not_run_either(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pyfunc whose code is not keeper's, but whose artifacts hold a real ranker folder: the
    # ranker is loaded from its files, the code is not run.
    rows = head_rows()
    ranker = head_ranker(rows)
    code = tmp_path / "planted.py"
    code.write_text(PLANTED_CODE)
    folder = ranker.save(tmp_path / "ranker")
    version, _ = store.log(python_model=str(code), artifacts={ARTIFACT_KEY: str(folder)})
    marker = tmp_path / "code-ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))

    model = evaluate.load_model(store.client, f"models:/{NAME}/{version}")
    out = model.pyfunc.predict(rows[model.input_columns()])
    np.testing.assert_allclose(out["score"], ranker.rank(rows)["score"], rtol=0, atol=1e-6)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# a keeper ranker loads and predicts as before


def test_a_logged_head_loads_from_the_clients_store_and_predicts_as_before(
    store: Store, tmp_path: Path, downloads: list[Path]
) -> None:
    rows = head_rows()
    ranker = head_ranker(rows)
    cols = ["series_id", "image_uri", "embedding", *QUALITY]
    version = store.log_ranker(ranker.save(tmp_path / "ranker"), rows[cols].head(8))
    uri = f"models:/{NAME}@challenger"
    before = mlflow.pyfunc.load_model(uri)  # what evaluate loaded until now (a trusted model)

    # The client's store is the one read, whatever the process-wide tracking URI says.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    model = evaluate.load_model(store.client, uri)
    assert len(downloads) == 2
    assert not downloads[0].exists()  # downloaded, and deleted

    assert (model.ref.name, model.ref.version, model.ref.alias) == (NAME, version, "challenger")
    assert (model.kind, model.tuned, model.label) == ("head", False, f"{NAME} v{version}")
    assert model.config == ranker.config
    assert model.title == f"{NAME} v{version} (mlp, embedding+quality)"
    assert model.input_columns() == cols
    assert isinstance(model.pyfunc, mlflow.pyfunc.PyFuncModel)
    assert model.pyfunc.metadata.get_input_schema() == before.metadata.get_input_schema()
    assert isinstance(model.pyfunc.unwrap_python_model().ranker, SeriesRanker)

    # The same frame as the pyfunc MLflow loads returns (its signature enforced first), and the
    # ranker's own scores.
    got = model.pyfunc.predict(rows[cols])
    pd.testing.assert_frame_equal(got, before.predict(rows[cols]))
    np.testing.assert_allclose(got["score"], ranker.rank(rows[cols])["score"], rtol=0, atol=1e-6)
    data = evaluate.EvalData(
        rows=rows, spec=TINY, dropped=0, embeddings="emb", series="s.csv", manifest_sha256=""
    )
    pd.testing.assert_frame_equal(evaluate.predict(model, data), got)

    # load_models: two URIs of one version, loaded once.
    [c] = evaluate.load_models(store.client, [uri, f"models:/{NAME}/{version}"])
    assert c.uris == [uri, f"models:/{NAME}/{version}"]
    pd.testing.assert_frame_equal(c.model.pyfunc.predict(rows[cols]), got)
    assert len(downloads) == 4
    assert not any(d.exists() for d in downloads)


def test_a_missing_model_is_a_model_load_error_naming_its_uri(store: Store) -> None:
    for uri in (f"runs:/{'0' * 32}/model", f"models:/{NAME}/9", "models:/m-0123456789abcdef"):
        with pytest.raises(ModelLoadError) as e:
            evaluate.load_model(store.client, uri)
        assert e.value.spec == uri


def test_a_fine_tuned_ranker_loads_and_needs_no_folder_afterwards(
    store: Store, tmp_path: Path, downloads: list[Path]
) -> None:
    cfg = RankerConfig(
        head=HeadConfig(kind="linear", in_dim=64), features="embedding", embedding_spec="unsaved",
        embed_dim=64, tower=TowerConfig(base_spec=TINY, method="lora", rank=4),
    )  # fmt: skip
    tuned = TunedRanker.build(cfg, device="cpu", seed=3)
    with torch.no_grad():  # LoRA's B starts at zero: moved so the adapter does something
        g = torch.Generator().manual_seed(7)
        for p in tuned.parts.lora.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = tuned.save(tmp_path / "tuned")
    rng = np.random.default_rng(1)
    uris = []
    for i in range(4):
        path = tmp_path / "photos" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    rows = pd.DataFrame({"series_id": ["a", "a", "b", "b"], "image_uri": uris})
    version = store.log_ranker(folder, rows)

    model = evaluate.load_model(store.client, f"models:/{NAME}/{version}")
    [download, ranker_folder] = downloads
    assert not download.exists()  # deleted before anything is scored
    assert ranker_folder.is_relative_to(download)
    assert (model.kind, model.tuned) == ("fine-tuned", True)
    assert model.title == f"{NAME} v{version} (fine-tuned lora, embedding)"
    assert model.input_columns() == ["series_id", "image_uri"]
    got = model.pyfunc.predict(rows)
    want = TunedRanker.load(folder, device="cpu").rank(rows)
    np.testing.assert_allclose(got["score"], want["score"], rtol=0, atol=1e-5)
    assert (got["rank"].to_numpy() == want["rank"].to_numpy()).all()


# --------------------------------------------------------------------------------------------
# a model that scores its (finite: the ranker checks) inputs NaN is refused, not compared on the
# rest (compare_methods leaves a series with a NaN out for every method)


class _NanWhereItLoses:
    """A pyfunc stand-in: a real head's scores, NaN for the first image of each series."""

    def __init__(self, ranker: SeriesRanker) -> None:
        self.ranker = ranker
        self.metadata = type("M", (), {"get_input_schema": staticmethod(lambda: None)})()

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        out = self.ranker.rank(frame)
        first = ~frame["series_id"].duplicated().to_numpy()
        return out.assign(score=np.where(first, np.nan, out["score"].to_numpy()))


def test_a_model_scoring_its_inputs_nan_is_refused() -> None:
    rows = head_rows()
    model = evaluate.LoadedModel(
        ref=tracking.ModelRef(uri="models:/r/1", load_uri="models:/r/1", name="r", version="1"),
        pyfunc=_NanWhereItLoses(head_ranker(rows)),
        config=head_ranker(rows).config,
    )
    data = evaluate.EvalData(
        rows=rows, spec=TINY, dropped=0, embeddings="emb", series="s.csv", manifest_sha256=""
    )
    with pytest.raises(
        DataError, match=r"gave 4 of 12 images a NaN or infinite score \(e.g. /photos/000.jpg\)"
    ):
        evaluate.predict(model, data)
