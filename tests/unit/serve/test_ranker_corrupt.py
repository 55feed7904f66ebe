"""keeper_serve.ranker.SeriesRanker's refresh: a version that fails to load never takes the
replica down, is reported by ``info``, and is not downloaded again at every poll.

The deployment's class runs in this process (no Ray, no Serve, no MLflow): the registry is a
dict of versions (alias -> ranker folder) behind stand-ins for ``resolve_model`` and
``registry.download_ranker``; the load itself is keeper_core's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from serve_fakes import bare_ranker

from keeper_core import registry
from keeper_core.heads import HeadConfig
from keeper_core.ranker import WEIGHTS_FILE, RankerConfig
from keeper_core.ranker import SeriesRanker as CoreRanker
from keeper_core.registry import ModelRef
from keeper_serve import ranker as serve_ranker

SPEC = "keeper-tiny:random"
URI = "models:/keeper-ranker@champion"


class Registry:
    """Versions by number; ``champion`` names one. Counts the downloads of each."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.versions: dict[str, Path] = {}
        self.champion = ""
        self.downloads: dict[str, int] = {}

    def add(self, version: str, *, corrupt: bool = False) -> None:
        torch.manual_seed(int(version))
        folder = CoreRanker(
            RankerConfig(
                head=HeadConfig(kind="mlp", in_dim=8, hidden=16, layers=1),
                features="embedding",
                embedding_spec=SPEC,
                embed_dim=8,
            )
        ).save(self.root / f"v{version}")
        if corrupt:
            (folder / WEIGHTS_FILE).write_bytes(b"\xff" * 8)
        self.versions[version] = folder

    def resolve(self, client: Any, uri: str) -> ModelRef:
        v = self.champion
        return ModelRef(uri, f"models:/keeper-ranker/{v}", "keeper-ranker", v, "champion")

    def download(self, client: Any, ref: ModelRef, dst: str | Path) -> Path:
        assert ref.version is not None
        self.downloads[ref.version] = self.downloads.get(ref.version, 0) + 1
        return Path(shutil.copytree(self.versions[ref.version], Path(dst) / "ranker"))


@pytest.fixture
def reg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    r = Registry(tmp_path)
    monkeypatch.setattr(serve_ranker, "resolve_model", r.resolve)
    monkeypatch.setattr(registry, "download_ranker", r.download)
    return r


def replica(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The deployment's state as its constructor leaves it, before the first refresh."""
    obj = bare_ranker(SPEC, "unused", URI)
    monkeypatch.setattr(obj, "_client", lambda: object())
    return obj


def info(obj: Any) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        out: dict[str, Any] = await obj.info()
        obj._poller.cancel()
        return out

    return asyncio.run(go())


def test_a_corrupt_first_version_leaves_the_replica_up_and_unavailable(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.add("1", corrupt=True)
    reg.champion = "1"
    obj = replica(monkeypatch)

    obj._refresh_sync()  # what the constructor runs: it must not raise

    got = info(obj)
    assert got["status"] == "unavailable"
    assert WEIGHTS_FILE in got["error"]
    assert "header too large" in got["error"]
    answer = asyncio.run(obj.rank(None, None, [2]))
    assert answer == {"unavailable": got["error"]}


def test_a_corrupt_promotion_keeps_the_current_version_and_is_not_refetched_each_poll(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.add("1")
    reg.add("2", corrupt=True)
    reg.add("3")
    reg.champion = "1"
    obj = replica(monkeypatch)
    obj._refresh_sync()
    assert (obj.current.ref.version, obj.error) == ("1", None)

    reg.champion = "2"
    for _ in range(5):  # five polls
        obj._refresh_sync()
    got = info(obj)
    assert (got["status"], got["version"]) == ("ready", "1")
    assert WEIGHTS_FILE in got["error"]
    assert reg.downloads["2"] == 1  # remembered: not downloaded again at each poll
    assert obj._failed.attempts == 1

    # Once the backoff has passed it is tried again (and fails again: a longer backoff).
    obj._failed = dataclasses.replace(obj._failed, retry_at=0.0)
    obj._refresh_sync()
    assert reg.downloads["2"] == 2
    assert obj._failed.attempts == 2
    assert obj.current.ref.version == "1"

    # The alias moves on: the new version loads at the next poll, and the error is over.
    reg.champion = "3"
    obj._refresh_sync()
    assert (obj.current.ref.version, obj.error, obj._failed) == ("3", None, None)

    # Back to the corrupt one: a new attempt at once (the alias moved).
    reg.champion = "2"
    obj._refresh_sync()
    assert reg.downloads["2"] == 3
    assert obj.current.ref.version == "3"
    assert WEIGHTS_FILE in obj.error


def test_any_failure_sets_the_error_and_keeps_the_current_version(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.add("1")
    reg.add("2")
    reg.champion = "1"
    obj = replica(monkeypatch)
    obj._refresh_sync()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("not a keeper error")

    monkeypatch.setattr(serve_ranker, "load_version", broken)
    reg.champion = "2"
    obj._refresh_sync()
    assert obj.current.ref.version == "1"
    assert obj.error == "keeper-ranker v2: RuntimeError: not a keeper error"
    got = info(obj)
    assert (got["status"], got["version"], got["error"]) == ("ready", "1", obj.error)

    # A registry that cannot be reached is no version's failure: nothing remembered.
    def unreachable(client: Any, uri: str) -> ModelRef:
        raise ConnectionError("registry down")

    obj._failed = None
    monkeypatch.setattr(serve_ranker, "resolve_model", unreachable)
    obj._refresh_sync()
    assert obj.error == "ConnectionError: registry down"
    assert obj._failed is None
    assert obj.current.ref.version == "1"


def test_a_failed_version_is_retried_at_once_for_a_new_model_uri(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.add("1", corrupt=True)
    reg.champion = "1"
    obj = replica(monkeypatch)
    obj._refresh_sync()
    assert obj._failed is not None

    async def go() -> None:
        await obj.reconfigure({"model_uri": "models:/keeper-ranker/1"})
        await asyncio.gather(*obj._background)
        obj._poller.cancel()

    asyncio.run(go())
    assert reg.downloads["1"] == 2
