"""The MLflow registry as keeper reads it: where the tracking store is, and what a URI names.

Shared by the batch jobs (keeper_train) and the Serve replicas (keeper_serve); needs the
``mlflow`` extra, imported only when a function runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keeper_core.errors import ConfigError, ModelLoadError


def tracking_uri(explicit: str | None, data_dir: str | Path, *, create: bool = True) -> str:
    """``explicit``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<data_dir>/mlflow.db``
    (``data_dir`` made first unless ``create`` is False: a caller that only looks, and reads
    a missing store as an empty one, leaves no folder behind).

    Set the store with ``use_tracking_store``, not ``mlflow.set_tracking_uri``: the latter sets
    ``MLFLOW_TRACKING_URI``, which this then takes for the user's choice.

    Raises:
        ConfigError: the given URI is not one MLflow has a model registry for (its scheme).
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_store_uri(uri, "tracking_uri" if explicit else "MLFLOW_TRACKING_URI")
        return uri
    d = Path(data_dir).expanduser().resolve()
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def use_tracking_store(uri: str) -> None:
    """``mlflow.set_tracking_uri(uri)``, with ``MLFLOW_TRACKING_URI`` left as it was.

    MLflow 3 also exports the URI as ``MLFLOW_TRACKING_URI``, which ``tracking_uri`` reads as the
    user's choice: the next job in this process, given another ``data_dir``, would use this
    store. MLflow's own lookups read its global first, so they still find ``uri``.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def check_store_uri(uri: str, name: str = "tracking_uri") -> None:
    """Refuse a URI whose scheme the installed MLflow has no model registry store for.

    MLflow's own list is asked (file, sqlite, postgresql, mysql, mssql, http, https, databricks,
    a plain path, and any scheme a plugin registers), not a copy of it: nothing is connected to
    or created. Without MLflow nothing is checked (the caller's own import then fails).

    Raises:
        ConfigError: MLflow has no registry store for the URI's scheme (naming ``name``).
    """
    try:
        from mlflow.tracking._model_registry.utils import _get_store_registry
        from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException
    except ImportError:  # no mlflow here (or a version that moved its registry): not checked
        return
    try:
        _get_store_registry().get_store_builder(uri)
    except UnsupportedModelRegistryStoreURIException as e:
        raise ConfigError(unsupported_store(name, uri, e.supported_uri_schemes)) from e


def unsupported_store(name: str, uri: str, schemes: list[str]) -> str:
    """The one line that says a tracking URI names no MLflow store, and which schemes do."""
    from urllib.parse import urlparse

    known = ", ".join(s for s in schemes if s)
    return (
        f"{name} {uri!r}: MLflow has no tracking/registry store for the scheme "
        f"{urlparse(uri).scheme!r} (supported: {known}, or a plain path)"
    )


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
        ConfigError: the URI is empty.
        ModelLoadError: the registered model, version or alias does not exist, or the URI has no
            scheme and is not an existing local path (a bare name such as ``keeper-ranker``).
    """
    from urllib.parse import urlparse

    from mlflow.exceptions import MlflowException

    if not uri.strip():
        raise ConfigError("the model URI must not be empty")
    if not urlparse(uri).scheme and not Path(uri).exists():
        # A bare name would reach the artifact download and fail there as "no such artifact".
        raise ModelLoadError(
            uri,
            "not a model URI, and no such local path: name a registered model as "
            "models:/NAME@ALIAS or models:/NAME/VERSION (or give runs:/RUN_ID/PATH, or the "
            "path of a model folder)",
        )
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


def ranker_folder(root: Path) -> Path | None:
    """The ranker folder of a downloaded pyfunc model, as its MLmodel file names it.

    None when MLmodel names none, or names a folder outside ``root`` or without ``ranker.json``.
    """
    import yaml

    from keeper_core.ranker import ARTIFACT_KEY, CONFIG_FILE

    try:
        meta = yaml.safe_load((root / "MLmodel").read_text("utf-8"))
        rel = meta["flavors"]["python_function"]["artifacts"][ARTIFACT_KEY]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    folder = (root / str(rel)).resolve()
    if root.resolve() not in folder.parents or not (folder / CONFIG_FILE).is_file():
        return None
    return folder


def download_ranker(client: Any, ref: ModelRef, dst: str | Path) -> Path:
    """Download ``ref``'s model artifacts into ``dst``; returns its ranker folder.

    Only the files are fetched: no code from the artifact store is imported or run.

    Raises:
        ModelLoadError: the download failed, or the model is not a keeper ranker.
    """
    return download_model(client, ref, dst)[1]


def download_model(client: Any, ref: ModelRef, dst: str | Path) -> tuple[Path, Path]:
    """``download_ranker``, and the downloaded model's own folder (its ``MLmodel``): (model
    folder, ranker folder).

    Raises:
        ModelLoadError: the download failed, or the model is not a keeper ranker.
    """
    import mlflow

    try:
        # A registered version's own artifact location, from this client's registry (a models:/
        # URI would be resolved against the process-wide registry URI instead).
        source = (
            client.get_model_version_download_uri(ref.name, ref.version)
            if ref.name and ref.version
            else ref.load_uri
        )
        root = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(dst), tracking_uri=client.tracking_uri
            )
        )
    except Exception as e:  # MlflowException, botocore, OSError: all mean "cannot fetch"
        raise ModelLoadError(ref.uri, f"cannot download {ref.load_uri}: {e}") from e
    folder = ranker_folder(root)
    if folder is None:
        raise ModelLoadError(ref.uri, f"{ref.load_uri} is not a keeper ranker (MLmodel)")
    return root, folder
