"""``registry.use_tracking_store``: MLflow's process-wide store is set, ``MLFLOW_TRACKING_URI``
is left as it was, so a second job in the same process finds its own ``data_dir``'s store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keeper_core import registry

mlflow = pytest.importorskip("mlflow")

USER_URI = "sqlite:////srv/users-own/mlflow.db"


@pytest.fixture(autouse=True)
def mlflow_global(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """MLflow's global tracking URI put back as it was (monkeypatch restores the environment)."""
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri  # None when never set: get_tracking_uri() would invent one
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored after the test
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def sqlite_under(d: Path) -> str:
    return f"sqlite:///{d.resolve() / 'mlflow.db'}"


@pytest.mark.parametrize("env", [None, USER_URI], ids=["unset", "set"])
def test_the_store_is_set_and_the_environment_is_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str | None
) -> None:
    if env is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    store = sqlite_under(tmp_path)
    registry.use_tracking_store(store)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env
    assert mlflow.get_tracking_uri() == store
    assert mlflow.get_registry_uri() == store  # models:/ URIs resolve here


@pytest.mark.parametrize("env", [None, USER_URI], ids=["unset", "set"])
def test_a_second_job_finds_its_own_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str | None
) -> None:
    if env is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    first = registry.tracking_uri(None, tmp_path / "a")
    registry.use_tracking_store(first)
    second = registry.tracking_uri(None, tmp_path / "b")
    # The user's MLFLOW_TRACKING_URI still wins; without one, b's own store, not a's.
    assert second == (env or sqlite_under(tmp_path / "b"))
    assert mlflow.get_tracking_uri() == first  # until the second job sets its own
