"""MLflow: where runs go, and how a ranker is logged and registered (no pickle)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from keeper_core.errors import ConfigError

CHAMPION, CHALLENGER = "champion", "challenger"


def tracking_uri(explicit: str | None, data_dir: str | Path) -> str:
    """``explicit``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<data_dir>/mlflow.db``."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    d = Path(data_dir).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def experiment_id(client: Any, name: str, data_dir: str | Path) -> str:
    """The experiment's id, creating it (artifacts beside the sqlite DB) when it is new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        # An embedded store keeps its artifacts next to it, not in the working directory.
        location = (Path(data_dir).expanduser().resolve() / "mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def log_ranker(ranker_dir: Path, input_example: Any) -> Any:
    """Log a saved ranker as an MLflow pyfunc (models from code) in the active run."""
    import mlflow
    from mlflow.models import infer_signature

    from keeper_core import mlflow_pyfunc
    from keeper_core.ranker import SeriesRanker

    ranker = SeriesRanker.load(ranker_dir)
    signature = infer_signature(input_example, ranker.rank(input_example))
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=mlflow_pyfunc.__file__,
        artifacts={mlflow_pyfunc.ARTIFACT_KEY: str(ranker_dir)},
        signature=signature,
        input_example=input_example,
        # Explicit, so MLflow does not import-trace the model to guess them.
        pip_requirements=["keeper-core[mlflow]"],
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
