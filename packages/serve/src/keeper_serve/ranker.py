"""``SeriesRanker``: the registry's champion ranker, followed through promotions with no downtime.

The replica resolves its model URI (``models:/keeper-ranker@champion`` by default) to a
registered version, downloads that version's artifacts and loads only the ranker folder inside
them (``ranker.json`` + safetensors): no pickle, and no code from the artifact store runs here
(the pyfunc wrapper is not imported). Every ``poll_s`` seconds it resolves the alias again; a new
version is loaded on a worker thread while the current one keeps answering, warmed with one
forward on the replica's forward thread, then swapped in with one reference assignment, so no
request fails, and none waits longer than that one warm-up forward. A version
that fails to load (any error: a keeper refusal, a corrupt file, a bug) is refused and the
current one stays; ``info`` reports the reason as ``error``, and with none loaded yet ``rank``
answers "unavailable" with it.

A refused version is not downloaded again at every poll: the replica remembers it and tries it
again only once a backoff has passed (``SeriesRanker.RETRY_MIN_S`` after the first failure,
doubling at each further one up to ``RETRY_MAX_S``), or at once when the alias moves to another
version or ``reconfigure`` gives another ``model_uri``. A transient failure (a download cut
short) is thus retried soon, a corrupt version rarely. A failure to resolve the alias itself
(the registry unreachable) is no version's: the next poll tries again.

Two kinds of version load (``keeper_core.ranker.load_ranker``):

- ``head``: a head over the encoder's embeddings (``SeriesRanker``); refused when it was trained
  on embeddings of another CLIP model than the encoder serves.
- ``fine-tuned``: its own adapted vision tower (``keeper_core.finetune.TunedRanker``: base spec +
  adapter + head) that scores the ingress's pixels. Each replica holds that tower, so a
  fine-tuned champion needs the resources of an encoder replica (docs/serving.md). It is
  refused when its base model prepares images differently (size, normalisation, interpolation,
  resize mode) from the encoder's: the ingress resizes pixels for the encoder's model.

``user_config`` ``{"model_uri": ..., "poll_s": ...}`` changes what it follows, in place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError
from ray import serve

from keeper_core import registry
from keeper_core.embedding import check_same_spec
from keeper_core.errors import KeeperError, ModelLoadError
from keeper_core.finetune import TunedRanker
from keeper_core.models import default_device, preprocess_config
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import RankerConfig, ranked_frame, read_config, unreadable_errors
from keeper_core.ranker import SeriesRanker as CoreRanker
from keeper_core.registry import ModelRef, resolve_model
from keeper_core.torch_thread import TorchThread, pin_torch_threads
from keeper_serve.api import RankerKind
from keeper_serve.config import RankerArgs, describe
from keeper_serve.encoder import torch_threads

log = logging.getLogger("keeper.serve")

#: What a ranker scores from: ``rank`` answers ``{"needs": ...}`` when a call lacks it.
PIXELS, EMBEDDINGS = "pixels", "embeddings"


@dataclass(frozen=True)
class Loaded:
    ref: ModelRef
    ranker: CoreRanker | TunedRanker

    @property
    def config(self) -> RankerConfig:
        return self.ranker.config

    @property
    def kind(self) -> RankerKind:
        return "head" if self.config.tower is None else "fine-tuned"

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "uri": self.ref.uri,
            "name": self.ref.name,
            "version": self.ref.version,
            "alias": self.ref.alias,
            "run_id": self.ref.run_id,
            "kind": self.kind,
            "method": cfg.tower.method if cfg.tower else None,
            "base_spec": cfg.tower.base_spec if cfg.tower else None,
            "features": cfg.features,
            "head": cfg.head.kind,
        }


def check_preprocessing(ref: ModelRef, base_spec: str, clip_model: str) -> None:
    """A fine-tuned tower must take the pixels the ingress prepares for the encoder's model.

    Raises:
        ModelLoadError: the two specs' preprocessing differs (named), or a spec is unknown.
    """
    try:
        want, served = preprocess_config(base_spec), preprocess_config(clip_model)
    except KeeperError as e:
        raise ModelLoadError(ref.uri, f"{ref.label()}: {e}") from e
    if want != served:
        raise ModelLoadError(
            ref.uri,
            f"{ref.label()} is fine-tuned from {base_spec}, which prepares images as {want}; "
            f"the ingress prepares them for {clip_model} ({served})",
        )


def load_version(
    client: Any,
    ref: ModelRef,
    clip_model: str,
    device: str | torch.device | None = None,
    warm: Callable[[ModelRef, CoreRanker | TunedRanker], Loaded] | None = None,
) -> Loaded:
    """Download ``ref``'s artifacts, load its ranker (either kind), then warm it.

    ``device`` is a fine-tuned ranker's (its tower); default: CUDA when present. ``warm`` runs
    the first forward (default: ``_warm`` on this thread; the replica sends it to the thread
    that runs every forward).

    Raises:
        ModelLoadError: the download or the load failed; a head trained on embeddings of another
            CLIP model than the encoder serves; a fine-tuned tower whose base model prepares
            images differently from the encoder's.
    """
    warm = warm or _warm
    with tempfile.TemporaryDirectory(prefix="keeper-ranker-") as d:
        folder = registry.download_ranker(client, ref, d)
        try:
            config = read_config(folder)
        except unreadable_errors() as e:
            raise ModelLoadError(ref.uri, f"cannot read {ref.label()}'s ranker.json: {e}") from e
        if config.tower is not None:
            # Checked from configs alone, before the base tower is loaded.
            check_preprocessing(ref, config.tower.base_spec, clip_model)
        try:
            if config.tower is not None:
                return warm(ref, TunedRanker.load(folder, device=device or default_device()))
            ranker = CoreRanker.load(folder)
        except KeeperError as e:
            raise ModelLoadError(ref.uri, str(e)) from e
        except ImportError as e:  # peft: keeper-core[finetune] is not installed here
            raise ModelLoadError(ref.uri, f"{ref.label()} needs keeper-core[finetune]: {e}") from e
    spec = ranker.config.embedding_spec
    if spec is not None:
        try:
            check_same_spec(spec, clip_model)
        except KeeperError as e:
            raise ModelLoadError(
                ref.uri,
                f"{ref.label()} ranks embeddings of {spec}, but the encoder serves {clip_model}",
            ) from e
    return warm(ref, ranker)


def _warm(ref: ModelRef, ranker: CoreRanker | TunedRanker) -> Loaded:
    """The first forward allocates (and picks kernels): done here, before any request can."""
    if isinstance(ranker, TunedRanker):
        s, q = ranker.image_size, len(FEATURE_NAMES)
        rank_pixels(ranker, np.zeros((2, 3, s, s), np.uint8), np.zeros((2, q), np.float32), [2])
    else:
        ranker.score([np.zeros((2, ranker.config.head.in_dim), np.float32)])
    return Loaded(ref=ref, ranker=ranker)


def replica_device() -> torch.device:
    """CUDA when Ray granted this replica a GPU (``num_gpus`` in the Serve config), else CPU.

    Not ``torch.cuda.is_available()``: a replica without ``num_gpus`` still sees its node's GPUs
    (Ray leaves CUDA_VISIBLE_DEVICES alone at zero), but none of them is its to use.
    """
    import ray

    granted = ray.get_runtime_context().get_accelerator_ids().get("GPU") or []
    return torch.device("cuda" if granted and torch.cuda.is_available() else "cpu")


def _per_series(
    lengths: list[int], scores: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Series laid end to end and their raw scores -> (scores, probabilities) per series,
    through keeper_core's ``ranked_frame`` (the softmax every ranker's ``rank`` uses)."""
    ids = np.repeat(np.arange(len(lengths)), lengths).astype(str)
    rows = np.split(np.arange(len(ids)), np.cumsum(lengths)[:-1])
    ranked = ranked_frame(pd.DataFrame({"series_id": ids}), rows, scores)
    return [(ranked["score"].to_numpy()[r], ranked["prob"].to_numpy()[r]) for r in rows]


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


def rank_pixels(
    ranker: TunedRanker, pixels: np.ndarray, quality: np.ndarray | None, lengths: list[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same for a fine-tuned ranker: uint8 pixels (the ingress's) and raw quality features
    (``FEATURE_NAMES`` order; the ranker picks and standardises its own)."""
    q = None
    if ranker.config.features == "embedding+quality" and quality is not None:
        q = np.asarray(quality, np.float32)[
            :, [FEATURE_NAMES.index(n) for n in ranker.config.quality_names]
        ]
    return _per_series(lengths, ranker.score(pixels, q, lengths))


@dataclass(frozen=True)
class FailedVersion:
    """A version that failed to load: not tried again before ``retry_at`` (``time.monotonic``).

    Attributes:
        load_uri: the version (``ModelRef.load_uri``).
        error: why it failed (what ``info`` reports while it waits).
        attempts: failed loads of it in a row.
        retry_at: the monotonic time from which the next poll tries it again.
    """

    load_uri: str
    error: str
    attempts: int
    retry_at: float


@serve.deployment
class SeriesRanker:
    #: A version that failed to load is tried again after this many seconds, doubling at each
    #: further failure of the same version up to ``RETRY_MAX_S`` (module docstring).
    RETRY_MIN_S = 30.0
    RETRY_MAX_S = 600.0
    #: True from the constructor until the first ``reconfigure``: Serve calls that one before
    #: the replica takes any request, so a ``model_uri`` it gives is loaded before it returns.
    _starting = False

    def __init__(
        self, ranker: RankerArgs, clip_model: str, tracking_uri: str | None, data_dir: str
    ) -> None:
        self.device = replica_device()  # a fine-tuned champion's tower runs there
        # Every forward (warm-up, heads, a fine-tuned tower) on one thread, as ClipEncoder's
        # (keeper_core.torch_thread). Loads run elsewhere (here, then a worker thread) so that
        # a promotion never waits behind requests, at one torch thread each: only the forward
        # thread keeps an OpenMP team.
        self._torch = TorchThread("ranker")
        # On CPU, as ClipEncoder: Ray sets the replica's OMP_NUM_THREADS from its num_cpus (1
        # for a fractional CPU); torch is told so explicitly. On CUDA this sizes the host side.
        self._torch.call(pin_torch_threads, torch_threads(None))
        self.clip_model = clip_model
        self.tracking_uri = registry.tracking_uri(tracking_uri, data_dir)
        self.model_uri = ranker.model_uri
        self.poll_s = ranker.poll_s
        self.current: Loaded | None = None
        self.error: str | None = None
        self._failed: FailedVersion | None = None  # the last version that failed to load
        self._swap_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._starting = True
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
        """Resolve the URI; load the version it names if it is not the current one (on the
        calling thread, at one torch thread; its warm-up forward on the forward thread).

        Never raises: any failure is kept in ``self.error`` (what ``info`` reports) and the
        current version stays. A version that failed is skipped until its backoff has passed
        (``FailedVersion``; module docstring).
        """
        if self.model_uri is None:
            self.current, self.error = None, "no ranker configured (ranker.model_uri is null)"
            return
        ref: ModelRef | None = None
        try:
            pin_torch_threads(1)  # this thread's count only
            client = self._client()
            ref = resolve_model(client, self.model_uri)
            failed = self._failed
            if failed is not None and failed.load_uri != ref.load_uri:
                self._failed = failed = None  # the alias moved: whatever it names now is new
            cur = self.current
            if cur is not None and cur.ref.load_uri == ref.load_uri:
                # The alias still names the version being served (runs:/ never moves): nothing
                # is pending, so an earlier failure (a refused version, a registry hiccup) is over.
                # The same version reached by another URI (following @champion, then pinned to
                # its number) is not loaded again, but answers name what is followed now.
                if cur.ref != ref:
                    self.current = dataclasses.replace(cur, ref=ref)
                self.error = None
                return
            if failed is not None and time.monotonic() < failed.retry_at:
                self.error = failed.error  # still refused: not downloaded again yet
                return
            loaded = load_version(
                client, ref, self.clip_model, self.device,
                warm=lambda r, ranker: self._torch.call(_warm, r, ranker),
            )  # fmt: skip
        except Exception as e:  # any failure: keep serving what is loaded, and say why
            self._failed_refresh(ref, e)
            return
        before = self._label()
        self.current, self.error = loaded, None  # the swap: one reference assignment
        self._failed = None
        log.info("SeriesRanker: now serving %s (was %s)", loaded.ref.label(), before)

    def _failed_refresh(self, ref: ModelRef | None, e: Exception) -> None:
        """Record a failed refresh: ``self.error`` says why; a version that failed to load
        (``ref`` resolved) is remembered with its backoff. Logged once per distinct failure."""
        keeper = isinstance(e, KeeperError)  # its message names the URI (ModelLoadError)
        error = str(e) if keeper else f"{type(e).__name__}: {e}"
        if ref is not None:
            if not keeper:
                error = f"{ref.label()}: {error}"
            prev = self._failed
            attempts = prev.attempts + 1 if prev and prev.load_uri == ref.load_uri else 1
            backoff = min(self.RETRY_MAX_S, self.RETRY_MIN_S * 2 ** (attempts - 1))
            self._failed = FailedVersion(ref.load_uri, error, attempts, time.monotonic() + backoff)
        if error != self.error:  # once per distinct failure, not at every poll
            if keeper:
                log.error("SeriesRanker: keeping %s: %s", self._label(), error)
            else:  # not a refusal keeper made on purpose: the traceback helps
                log.exception("SeriesRanker: keeping %s: %s", self._label(), error)
        self.error = error

    def _label(self) -> str:
        return self.current.ref.label() if self.current else "nothing"

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self._refresh()
            except Exception as e:  # the poller must outlive any one failure
                # _refresh_sync never raises; this is a last resort, and info() says it too.
                log.exception("SeriesRanker: registry poll failed")
                self.error = f"registry poll failed: {type(e).__name__}: {e}"

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._follow())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"model_uri": str | None, "poll_s": float}``, both optional.

        Validated as ``RankerArgs`` (a malformed URI, a ``poll_s`` that is not a finite number >
        0: ValueError). On a running replica it returns at once: a new URI is loaded in the
        background while the current version keeps answering (Serve routes no requests to a
        replica while its reconfigure runs). The first call, which Serve makes before a new
        replica takes any request, loads it before returning instead: a replica started under a
        pinned ``model_uri`` never answers with the version its constructor's ``args`` named
        (where the pinned one does not load, it answers 503 until a poll loads it).
        """
        unknown = set(user_config) - {"model_uri", "poll_s"}
        if unknown:
            raise ValueError(f"SeriesRanker user_config: unknown keys {sorted(unknown)}")
        try:
            new = RankerArgs(
                model_uri=user_config.get("model_uri", self.model_uri),
                poll_s=user_config.get("poll_s", self.poll_s),
            )
        except ValidationError as e:
            raise ValueError(f"SeriesRanker user_config: {describe(e)}") from e
        starting, self._starting = self._starting, False
        self.poll_s = new.poll_s
        if new.model_uri != self.model_uri:
            self.model_uri = new.model_uri
            self._failed = None  # a new URI: whatever it names is tried at once
            if starting:
                await self._refresh()
                if self.error is not None and self.model_uri is not None:
                    # The pinned version did not load: answering with the constructor's (the
                    # version it was pinned away from, a rollback's bad champion) is what the
                    # pin is there to prevent. Nothing answers (503) until the next poll loads
                    # it, tried then without a backoff.
                    self.current, self._failed = None, None
            else:
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
        self,
        embeddings: np.ndarray | None,
        quality: np.ndarray | None,
        lengths: list[int],
        pixels: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Series laid end to end -> per-series scores and probabilities, and the version.

        A head scores ``embeddings`` (the encoder's) and ignores ``pixels``; a fine-tuned ranker
        scores ``pixels`` ((N, 3, S, S) uint8, as the ingress sends them to the encoder) with its
        own tower and ignores ``embeddings``. Either may be None when the current version does
        not need it; a call lacking what it needs is answered ``{"needs": "pixels" |
        "embeddings"}`` (the version just changed kind: the caller sends it again, with both).
        With no ranker loaded: ``{"unavailable": reason}`` (the ingress answers 503).
        """
        self._ensure_poller()
        cur = self.current  # this request uses one version from start to end
        if cur is None:
            return {"unavailable": self.error or "no ranker loaded"}
        if cur.config.features != "embedding" and quality is None:
            return {"unavailable": "the ranker needs quality features and none were sent"}
        if isinstance(cur.ranker, TunedRanker):
            if pixels is None:
                return {"needs": PIXELS, "model": cur.describe()}
            # A tower forward: off the event loop, which keeps answering info() and polling.
            results = await self._torch.run(rank_pixels, cur.ranker, pixels, quality, lengths)
        else:
            if embeddings is None:
                return {"needs": EMBEDDINGS, "model": cur.describe()}
            results = await self._torch.run(rank_table, cur.ranker, embeddings, quality, lengths)
        return {"model": cur.describe(), "series": results}
