"""MLflow: where runs go, and how a ranker is logged and registered (no pickle)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keeper_core.errors import ConfigError, DataError, ModelLoadError
from keeper_core.registry import ModelRef, resolve_model, tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS_CHAMPION",
    "ModelRef",
    "aliases",
    "experiment_id",
    "log_ranker",
    "register",
    "resolve_model",
    "tracking_uri",
    "training_split",
]

#: The artifact train_head logs in its run: ``series_id, image_uri, split`` of every row it used.
SPLIT_ARTIFACT = "split.csv"
#: What a training run records of its split: each image's series, path, content hash and split
#: (``keeper promote`` refuses series sharing an image with train or val, by path or content).
SPLIT_COLUMNS = ("series_id", "image_uri", "image_id", "split")


def experiment_id(client: Any, name: str, data_dir: str | Path) -> str:
    """The experiment's id, creating it (artifacts beside the sqlite DB) when it is new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        # An embedded store keeps its artifacts next to its database file, not wherever the
        # process happens to run (MLflow's default, ./mlruns).
        db = Path(client.tracking_uri.removeprefix("sqlite:///"))
        base = db.parent if db.is_absolute() else Path(data_dir).expanduser().resolve()
        location = (base / "mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def log_ranker(ranker_dir: Path, input_example: Any) -> Any:
    """Log a saved ranker as an MLflow pyfunc (models from code) in the active run."""
    import mlflow
    from mlflow.models import infer_signature

    from keeper_core import mlflow_pyfunc
    from keeper_core.ranker import load_ranker

    ranker = load_ranker(ranker_dir, device="cpu")
    # Declare float columns as double: the stored example comes back from JSON as float64, and
    # float32 rows from an embedding table widen to double safely (the reverse would not).
    example = input_example.copy()
    if "embedding" in example.columns:
        example["embedding"] = [np.asarray(e, dtype=np.float64) for e in example["embedding"]]
    floats = example.select_dtypes(include=["float32"]).columns
    example[floats] = example[floats].astype("float64")
    input_example = example
    signature = infer_signature(input_example, ranker.rank(input_example))
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=mlflow_pyfunc.__file__,
        artifacts={mlflow_pyfunc.ARTIFACT_KEY: str(ranker_dir)},
        signature=signature,
        input_example=input_example,
        # Explicit, so MLflow does not import-trace the model to guess them.
        pip_requirements=["keeper-core[mlflow,finetune]"],
    )


def register(client: Any, model_uri: str, name: str, run_id: str) -> str:
    """Register ``model_uri`` as a new version of ``name`` with alias ``challenger``."""
    import mlflow

    if not name.strip():
        raise ConfigError("register: the model name must not be empty")
    version = mlflow.register_model(model_uri, name)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    client.set_model_version_tag(name, version.version, "keeper.run_id", run_id)
    return str(version.version)


# --------------------------------------------------------------------------------------------
# The registry: resolving a model URI, and the aliases promotion moves

#: Where ``keeper promote`` remembers the champion it replaced, for ``--rollback``.
PREVIOUS_CHAMPION = "previous-champion"


def aliases(client: Any, name: str) -> dict[str, str]:
    """The aliases of registered model ``name``: alias -> version.

    Raises:
        ConfigError: there is no registered model ``name``.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        raise ConfigError(
            f"no registered model {name!r} at {client.tracking_uri}: {e.message}"
        ) from e
    return {str(k): str(v) for k, v in (model.aliases or {}).items()}


def training_split(client: Any, run_id: str | None) -> pd.DataFrame | None:
    """The ``series_id, image_uri, split`` rows a training run recorded, or None if it has none.

    None means only that there is no split to read: a model logged by other code than
    train_head (its run has no ``split.csv``), or whose run was deleted for good. A store that
    cannot be asked, or a split that cannot be read, is an error: callers gate on this split
    (``keeper promote`` refuses series a challenger trained on), so a failure must not pass
    for "nothing recorded".

    Raises:
        ModelLoadError: the run's artifacts cannot be listed or the split downloaded (an
            unreachable tracking server or artifact store, missing credentials...).
        DataError: the split is there but is not a ``series_id, image_uri, split`` CSV.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    where = f"runs:/{run_id}/{SPLIT_ARTIFACT}"
    try:
        listed = {str(f.path) for f in client.list_artifacts(run_id)}
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":  # the run is gone; its version outlives it
            return None
        raise ModelLoadError(where, f"cannot list the run's artifacts: {e.message}") from e
    except Exception as e:  # botocore, OSError...: the store could not be asked
        raise ModelLoadError(where, f"cannot list the run's artifacts: {e}") from e
    if SPLIT_ARTIFACT not in listed:
        return None
    with tempfile.TemporaryDirectory() as d:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=SPLIT_ARTIFACT,
                dst_path=d,
                tracking_uri=client.tracking_uri,
            )
        except Exception as e:  # MlflowException, botocore, OSError: all mean "cannot fetch"
            raise ModelLoadError(where, f"cannot download the recorded split: {e}") from e
        try:
            split = pd.read_csv(path, dtype=str)
        except (ValueError, UnicodeDecodeError) as e:  # pandas' parser errors are ValueErrors
            raise DataError(f"unreadable split: {e}", source=where) from e
    missing = {"series_id", "image_uri", "split"} - set(split.columns)
    if missing:
        raise DataError(f"the recorded split lacks columns {sorted(missing)}", source=where)
    return split
