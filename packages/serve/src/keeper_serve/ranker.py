"""``SeriesRanker``: the registry's champion head, followed through promotions with no downtime.

The replica resolves its model URI (``models:/keeper-ranker@champion`` by default) to a
registered version, downloads that version's artifacts and loads only the ranker folder inside
them (``ranker.json`` + ``weights.safetensors``): no pickle, and no code from the artifact
store runs here (the pyfunc wrapper is not imported). Every ``poll_s`` seconds it resolves the
alias again; a new version is loaded and warmed on a worker thread while the current one keeps
answering, then swapped in with one reference assignment, so no request fails or waits for a
load. A version that fails to load (or was trained on another CLIP model) is refused and the
current one stays; with none loaded yet, ``rank`` answers "unavailable" with the reason.

``user_config`` ``{"model_uri": ..., "poll_s": ...}`` changes what it follows, in place.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray import serve

from keeper_core import registry
from keeper_core.embedding import check_same_spec
from keeper_core.errors import KeeperError, ModelLoadError
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import ARTIFACT_KEY
from keeper_core.ranker import SeriesRanker as CoreRanker
from keeper_core.registry import ModelRef, resolve_model
from keeper_serve.config import RankerArgs

log = logging.getLogger("keeper.serve")


@dataclass(frozen=True)
class Loaded:
    ref: ModelRef
    ranker: CoreRanker

    def describe(self) -> dict[str, Any]:
        cfg = self.ranker.config
        return {
            "uri": self.ref.uri,
            "name": self.ref.name,
            "version": self.ref.version,
            "alias": self.ref.alias,
            "run_id": self.ref.run_id,
            "features": cfg.features,
            "head": cfg.head.kind,
        }


def _ranker_folder(root: Path) -> Path | None:
    """The ranker folder of a downloaded pyfunc model, as its MLmodel file names it."""
    import yaml

    try:
        meta = yaml.safe_load((root / "MLmodel").read_text())
        rel = meta["flavors"]["python_function"]["artifacts"][ARTIFACT_KEY]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    folder = (root / str(rel)).resolve()
    if root.resolve() not in folder.parents or not (folder / "ranker.json").is_file():
        return None
    return folder


def load_version(client: Any, ref: ModelRef, clip_model: str) -> Loaded:
    """Download ``ref``'s artifacts and load its ranker (JSON + safetensors), then warm it.

    Raises:
        ModelLoadError: the download or the load failed, or the ranker was trained on
            embeddings of another CLIP model than the encoder serves.
    """
    import mlflow

    with tempfile.TemporaryDirectory(prefix="keeper-ranker-") as d:
        try:
            # A registered version's own artifact location, from this client's registry (a
            # models:/ URI would be resolved against the process-wide registry URI instead).
            source = (
                client.get_model_version_download_uri(ref.name, ref.version)
                if ref.name and ref.version
                else ref.load_uri
            )
            root = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=d, tracking_uri=client.tracking_uri
                )
            )
        except Exception as e:  # MlflowException, botocore, OSError: all mean "cannot fetch"
            raise ModelLoadError(ref.uri, f"cannot download {ref.load_uri}: {e}") from e
        folder = _ranker_folder(root)
        if folder is None:
            raise ModelLoadError(ref.uri, f"{ref.load_uri} is not a keeper ranker (MLmodel)")
        try:
            ranker = CoreRanker.load(folder)
        except KeeperError as e:
            raise ModelLoadError(ref.uri, str(e)) from e
    spec = ranker.config.embedding_spec
    if spec is not None:
        try:
            check_same_spec(spec, clip_model)
        except KeeperError as e:
            raise ModelLoadError(
                ref.uri,
                f"{ref.label()} ranks embeddings of {spec}, but the encoder serves {clip_model}",
            ) from e
    # Warm-up: the first forward of a fresh head allocates; do it before any request can.
    cfg = ranker.config
    warm = np.zeros((2, cfg.head.in_dim), np.float32)
    ranker.score([warm])
    return Loaded(ref=ref, ranker=ranker)


def rank_table(
    ranker: CoreRanker, embeddings: np.ndarray, quality: np.ndarray | None, lengths: list[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Scores and probabilities per series, through keeper_core's ``SeriesRanker.rank``."""
    ids = np.repeat(np.arange(len(lengths)), lengths).astype(str)
    table = pd.DataFrame({"series_id": ids, "embedding": list(embeddings)})
    if quality is not None:
        for j, name in enumerate(FEATURE_NAMES):
            table[name] = quality[:, j]
    ranked = ranker.rank(table)
    out = []
    start = 0
    for n in lengths:
        part = ranked.iloc[start : start + n]
        out.append((part["score"].to_numpy(), part["prob"].to_numpy()))
        start += n
    return out


@serve.deployment
class SeriesRanker:
    def __init__(
        self, ranker: RankerArgs, clip_model: str, tracking_uri: str | None, data_dir: str
    ) -> None:
        self.clip_model = clip_model
        self.tracking_uri = registry.tracking_uri(tracking_uri, data_dir)
        self.model_uri = ranker.model_uri
        self.poll_s = ranker.poll_s
        self.current: Loaded | None = None
        self.error: str | None = None
        self._swap_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # The first load happens before the replica takes traffic (Serve runs the constructor on
        # the replica's event loop, which serves nothing until it returns); then the alias is
        # followed.
        self._refresh_sync()
        self._ensure_poller()

    # -------------------------------------------------------------- following the registry

    def _client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def _refresh_sync(self) -> None:
        """Resolve the URI; load the version it names if it is not the current one."""
        if self.model_uri is None:
            self.current, self.error = None, "no ranker configured (ranker.model_uri is null)"
            return
        client = self._client()
        try:
            ref = resolve_model(client, self.model_uri)
            cur = self.current
            if cur is not None and cur.ref.load_uri == ref.load_uri:
                return  # the alias still names the version being served (runs:/ never moves)
            loaded = load_version(client, ref, self.clip_model)
        except KeeperError as e:
            if str(e) != self.error:  # once per distinct failure, not at every poll
                log.error("SeriesRanker: keeping %s: %s", self._label(), e)
            self.error = str(e)
            return
        before = self._label()
        self.current, self.error = loaded, None  # the swap: one reference assignment
        log.info("SeriesRanker: now serving %s (was %s)", loaded.ref.label(), before)

    def _label(self) -> str:
        return self.current.ref.label() if self.current else "nothing"

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self._refresh()
            except Exception:  # the poller must outlive any one failure
                log.exception("SeriesRanker: registry poll failed")

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._follow())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"model_uri": str | None, "poll_s": float}``, both optional.

        Returns at once: a new URI is loaded in the background while the current version keeps
        answering (Serve routes no requests to a replica while its reconfigure runs).
        """
        unknown = set(user_config) - {"model_uri", "poll_s"}
        if unknown:
            raise ValueError(f"SeriesRanker user_config: unknown keys {sorted(unknown)}")
        if "poll_s" in user_config:
            poll = float(user_config["poll_s"])
            if not poll > 0:
                raise ValueError(f"poll_s must be > 0, got {poll}")
            self.poll_s = poll
        if "model_uri" in user_config and user_config["model_uri"] != self.model_uri:
            self.model_uri = user_config["model_uri"]
            self._background.add(asyncio.get_running_loop().create_task(self._refresh()))
            self._background = {t for t in self._background if not t.done()}
        self._ensure_poller()

    async def _refresh(self) -> None:
        async with self._swap_lock:
            await asyncio.to_thread(self._refresh_sync)

    # -------------------------------------------------------------- requests

    async def info(self) -> dict[str, Any]:
        self._ensure_poller()
        cur = self.current
        if self.model_uri is None:
            return {"uri": None, "status": "disabled", "error": self.error}
        if cur is None:
            return {"uri": self.model_uri, "status": "unavailable", "error": self.error}
        return {**cur.describe(), "uri": self.model_uri, "status": "ready", "error": self.error}

    async def rank(
        self, embeddings: np.ndarray, quality: np.ndarray | None, lengths: list[int]
    ) -> dict[str, Any]:
        """Series laid end to end -> per-series scores and probabilities, and the version.

        With no ranker loaded: ``{"unavailable": reason}`` (the ingress answers 503).
        """
        self._ensure_poller()
        cur = self.current  # this request uses one version from start to end
        if cur is None:
            return {"unavailable": self.error or "no ranker loaded"}
        if cur.ranker.config.features != "embedding" and quality is None:
            return {"unavailable": "the ranker needs quality features and none were sent"}
        results = rank_table(cur.ranker, embeddings, quality, lengths)
        return {"model": cur.describe(), "series": results}
