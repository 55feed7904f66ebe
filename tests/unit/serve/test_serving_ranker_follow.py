"""``SeriesRanker`` following a real (sqlite) MLflow registry: what a pinned ``user_config`` does
to a new replica, and what answers name after the followed URI changes to the same version.

The deployment's class runs in this process (no Ray, no Serve); versions are registered with a
keeper ranker folder as their artifacts, so resolving, downloading and loading are the real ones.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from serve_fakes import bare_ranker

from keeper_core.heads import HeadConfig
from keeper_core.ranker import ARTIFACT_KEY, RankerConfig
from keeper_core.ranker import SeriesRanker as CoreRanker

SPEC = "keeper-tiny:random"
NAME = "keeper-ranker"
DIM = 8


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow sqlite store, created once (migrations take seconds)."""
    import mlflow

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


class Registry:
    def __init__(self, db: Path, root: Path) -> None:
        import mlflow

        self.uri = f"sqlite:///{db}"
        self.root = root
        self.client = mlflow.MlflowClient(self.uri)
        self.experiment = self.client.create_experiment("r", artifact_location=root.as_uri())
        self.client.create_registered_model(NAME)

    def version(self) -> str:
        run = self.client.create_run(self.experiment).info.run_id
        src = self.root / "models" / run
        src.mkdir(parents=True)
        config = RankerConfig(
            head=HeadConfig(kind="linear", in_dim=DIM),
            features="embedding",
            embedding_spec=SPEC,
            embed_dim=DIM,
        )
        CoreRanker(config).save(src / "ranker")
        flavor = {"python_function": {"artifacts": {ARTIFACT_KEY: {"path": "ranker"}}}}
        (src / "MLmodel").write_text(yaml.safe_dump({"flavors": flavor}))
        mv = self.client.create_model_version(NAME, source=src.as_uri(), run_id=run)
        return str(mv.version)

    def alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(NAME, alias, version)


@pytest.fixture
def reg(empty_db: Path, tmp_path: Path) -> Registry:
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_db, db)
    return Registry(db, tmp_path)


def start(reg: Registry, model_uri: str) -> Any:
    """A replica as its constructor leaves it (its first load done), without Ray."""
    obj = bare_ranker(SPEC, reg.uri, model_uri)
    obj._starting = True
    obj._refresh_sync()
    return obj


async def answer(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = await obj.rank(np.zeros((2, DIM), np.float32), None, [2])
    return out["model"]


def test_serving_a_new_replica_under_a_pinned_user_config_never_answers_with_the_args_version(
    reg: Registry,
) -> None:
    """keeper-gpu.yaml pins through user_config: Serve builds the replica with args.ranker (the
    default @champion), calls reconfigure, then routes requests to it."""
    v1, v2 = reg.version(), reg.version()
    reg.alias("champion", v2)

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        obj = start(reg, f"models:/{NAME}@champion")
        await obj.reconfigure({"model_uri": f"models:/{NAME}/{v1}"})  # the rollback pin
        first = await answer(obj)  # the first request Serve could route to it
        # A later reconfigure (the replica serving) still returns at once, loading behind.
        await obj.reconfigure({"model_uri": f"models:/{NAME}@champion"})
        during = await answer(obj)
        await asyncio.gather(*obj._background)
        after = await answer(obj)
        obj._poller.cancel()
        return first, during, after

    first, during, after = asyncio.run(go())
    assert (first["version"], first["uri"], first["alias"]) == (v1, f"models:/{NAME}/{v1}", None)
    assert during["version"] == v1
    assert (after["version"], after["alias"]) == (v2, "champion")


def test_serving_a_new_replica_whose_pinned_version_fails_answers_nothing_until_it_loads(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pinned version's download failed once: the replica answered with the args' @champion
    # (the bad version a rollback pins away from) for at least the 30 s backoff.
    from keeper_core import registry
    from keeper_core.errors import StorageError

    v1, v2 = reg.version(), reg.version()
    reg.alias("champion", v2)
    real = registry.download_ranker
    left = [1]

    def flaky(client: Any, ref: Any, d: Any) -> Any:
        if ref.version == v1 and left[0]:
            left[0] -= 1
            raise StorageError(ref.load_uri, "connection reset while downloading", retryable=True)
        return real(client, ref, d)

    monkeypatch.setattr(registry, "download_ranker", flaky)

    async def go() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        obj = start(reg, f"models:/{NAME}@champion")
        await obj.reconfigure({"model_uri": f"models:/{NAME}/{v1}"})
        first = await obj.rank(np.zeros((2, DIM), np.float32), None, [2])
        info = await obj.info()
        await obj._refresh()  # the next poll: tried at once, no backoff
        after = await answer(obj)
        obj._poller.cancel()
        return first, info, after

    first, info, after = asyncio.run(go())
    assert "connection reset" in first["unavailable"]  # the ingress answers 503
    assert (info["uri"], info["status"]) == (f"models:/{NAME}/{v1}", "unavailable")
    assert after["version"] == v1


def test_serving_answers_name_the_followed_uri_after_pinning_the_same_version(
    reg: Registry,
) -> None:
    """Following @champion at v1, then pinned to /v1: no reload, but once the alias moves on,
    v1's answers must not call it the champion."""
    v1, v2 = reg.version(), reg.version()
    reg.alias("champion", v1)

    async def go() -> tuple[dict[str, Any], dict[str, Any], Any]:
        obj = start(reg, f"models:/{NAME}@champion")
        obj._starting = False  # a running replica
        loaded = obj.current.ranker
        await obj.reconfigure({"model_uri": f"models:/{NAME}/{v1}"})
        await asyncio.gather(*obj._background)
        reg.alias("champion", v2)
        obj._refresh_sync()  # a poll
        out = await answer(obj)
        info = await obj.info()
        obj._poller.cancel()
        return out, info, obj.current.ranker is loaded

    out, info, same = asyncio.run(go())
    assert same  # the same weights: not downloaded again
    assert (out["version"], out["uri"], out["alias"]) == (v1, f"models:/{NAME}/{v1}", None)
    assert (info["version"], info["alias"], info["status"]) == (v1, None, "ready")


def test_serving_rollback_of_the_alias_is_followed(reg: Registry) -> None:
    v1, v2 = reg.version(), reg.version()
    reg.alias("champion", v1)
    obj = start(reg, f"models:/{NAME}@champion")
    reg.alias("champion", v2)
    obj._refresh_sync()
    assert obj.current.ref.version == v2
    reg.alias("champion", v1)  # keeper promote --rollback
    obj._refresh_sync()
    assert (obj.current.ref.version, obj.error) == (v1, None)


@pytest.mark.parametrize(
    ("user_config", "words"),
    [
        ({"model_uri": ""}, "model_uri is empty"),
        ({"model_uri": f"models:/{NAME}"}, "names no model"),
        ({"model_uri": f"models:/{NAME}@"}, "names no model"),
        ({"model_uri": 7}, "model_uri"),
        ({"poll_s": 0}, "poll_s"),
        ({"poll_s": float("inf")}, "poll_s"),
        ({"poll_s": "often"}, "poll_s"),
    ],
)
def test_serving_reconfigure_refuses_a_bad_user_config_and_keeps_what_it_had(
    reg: Registry, user_config: dict[str, Any], words: str
) -> None:
    v1 = reg.version()
    reg.alias("champion", v1)
    obj = start(reg, f"models:/{NAME}@champion")

    async def go() -> None:
        with pytest.raises(ValueError, match=words):
            await obj.reconfigure(user_config)

    asyncio.run(go())
    assert (obj.model_uri, obj.poll_s, obj.current.ref.version) == (
        f"models:/{NAME}@champion",
        3600.0,
        v1,
    )
