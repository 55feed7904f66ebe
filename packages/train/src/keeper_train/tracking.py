"""MLflow: where runs go, and how a ranker is logged and registered (no pickle)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keeper_core.errors import ConfigError, ModelLoadError

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
    from keeper_core.ranker import SeriesRanker

    ranker = SeriesRanker.load(ranker_dir)
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


# --------------------------------------------------------------------------------------------
# The registry: resolving a model URI, and the aliases promotion moves

#: Where ``keeper promote`` remembers the champion it replaced, for ``--rollback``.
PREVIOUS_CHAMPION = "previous-champion"


@dataclass(frozen=True)
class ModelRef:
    """A model URI as given, and what it pins down in the registry.

    Attributes:
        uri: the URI as given, e.g. ``models:/keeper-ranker@champion``.
        load_uri: what to load: ``models:/NAME/VERSION`` for a registered model (so an alias
            moving while this process works cannot switch models under it), else ``uri``.
        name, version, alias: the registered model, its version and the alias given (None
            where the URI names no registered model, e.g. ``runs:/...`` or ``models:/m-...``).
        run_id: the MLflow run that logged the model, where known.
    """

    uri: str
    load_uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None

    def label(self) -> str:
        """``NAME vN`` for a registered version, else the URI."""
        return f"{self.name} v{self.version}" if self.name else self.uri


def resolve_model(client: Any, uri: str) -> ModelRef:
    """Resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` to a registered version.

    Other URIs (``runs:/RUN/model``, ``models:/m-...`` logged models, paths) are returned as they
    are, with no registry information.

    Raises:
        ModelLoadError: the registered model, version or alias does not exist.
    """
    from mlflow.exceptions import MlflowException

    if not uri.strip():
        raise ConfigError("the model URI must not be empty")
    if not uri.startswith("models:/"):
        return ModelRef(uri=uri, load_uri=uri)
    path = uri.removeprefix("models:/").strip("/")
    name, at, alias = path.partition("@")
    head, slash, version = path.rpartition("/")
    try:
        if at:
            mv = client.get_model_version_by_alias(name, alias)
        elif slash and version.isdigit():
            name, alias = head, ""
            mv = client.get_model_version(name, version)
        else:  # models:/m-<id>: a logged model that was not (necessarily) registered
            return ModelRef(uri=uri, load_uri=uri)
    except MlflowException as e:
        raise ModelLoadError(uri, f"{e.message} (tracking URI {client.tracking_uri})") from e
    return ModelRef(
        uri=uri,
        load_uri=f"models:/{mv.name}/{mv.version}",
        name=str(mv.name),
        version=str(mv.version),
        alias=alias or None,
        run_id=mv.run_id,
    )


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
