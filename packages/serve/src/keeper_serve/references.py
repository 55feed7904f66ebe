"""``ReferenceCollections``: ``/v1/compare``'s deployment. Loads every collection once, follows them.

A replica lists ``args.references.root`` (keeper_core.references: each ``ROOT/NAME/`` holding a
``reference.json``) and loads each collection's rows with the served model spec. A collection
that cannot be used (embedded with another model, a malformed file, no members) is not fatal:
it is kept as *refused* with its reason, which ``/v1/references`` shows and ``/v1/compare``
answers with; a root that cannot be listed fails the replica, loudly.

A thread lists the root again every ``poll_s`` seconds and compares each ``reference.json``'s
sha256 with the loaded version: new and changed collections are loaded, removed ones dropped,
and the whole set is swapped in as one reference, so requests in flight finish on the set they
started with and none fails over a swap. A changed collection that cannot be loaded leaves its
loaded version serving (its error is listed); that version of the file is not tried again.

Percentiles need every member scored with the prompt set the query is scored with: a
:class:`~keeper_core.references.ReferenceProfile` per (collection version, prompt embeddings),
built on first use on a worker thread and cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from keeper_core import storage
from keeper_core.errors import DataError, StorageError
from keeper_core.references import (
    Comparison,
    ReferenceCollection,
    ReferenceMeta,
    ReferenceProfile,
    list_collections,
    load_collection,
    meta_uri,
)
from keeper_core.scoring import AestheticConfig
from keeper_serve.config import ReferenceArgs

log = logging.getLogger("keeper.serve")

# Profiles kept: one per collection version and prompt set (a replica's ingresses share one set).
_PROFILE_CACHE = 64


class UnknownCollection(DataError):
    """A collection name the root does not hold (or not any more)."""


class CollectionUnusable(DataError):
    """A collection the replica refused to load; ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason
        super().__init__(f"collection {name!r} cannot be compared against: {reason}")

    def __reduce__(self) -> tuple[type[CollectionUnusable], tuple[str, str]]:
        return type(self), (self.name, self.reason)  # crosses to the ingress by pickle


@dataclass(frozen=True)
class Refused:
    """A collection that could not be loaded, and the reference.json version that was tried."""

    reason: str
    version: str | None  # None: a storage failure, tried again next poll


@dataclass(frozen=True)
class Collections:
    """One listing of the root: never changed once built (a poll builds a new one)."""

    loaded: dict[str, ReferenceCollection] = field(default_factory=dict)
    refused: dict[str, Refused] = field(default_factory=dict)
    # A loaded collection whose newer reference.json could not be loaded: name -> that failure.
    stale: dict[str, Refused] = field(default_factory=dict)


@dataclass(frozen=True)
class Compared:
    """``compare``'s answer: which collection version answered, and the comparison."""

    meta: ReferenceMeta
    comparison: Comparison


def read_version(root: str, name: str) -> str | None:
    """sha256 of ``ROOT/NAME/reference.json`` as it is now; None when it is gone.

    Raises:
        StorageError: it exists but could not be read.
    """
    uri = meta_uri(root, name)
    try:
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    except StorageError:
        if not storage.exists(uri):
            return None
        raise


def prompts_fingerprint(prompt_emb: Mapping[str, np.ndarray]) -> str:
    """A digest of prompt texts and their embeddings' bytes (what member scores depend on)."""
    h = hashlib.sha256()
    for text in sorted(prompt_emb):
        h.update(text.encode())
        h.update(b"\0")
        h.update(np.ascontiguousarray(prompt_emb[text], np.float32).tobytes())
    return h.hexdigest()


def scan(root: str, clip_model: str, current: Collections) -> Collections:
    """The collections under ``root`` now: ``current``'s where unchanged, the others loaded.

    Raises:
        StorageError: the root could not be listed.
    """
    loaded: dict[str, ReferenceCollection] = {}
    refused: dict[str, Refused] = {}
    stale: dict[str, Refused] = {}
    for name in list_collections(root):
        have = current.loaded.get(name)
        tried = current.refused.get(name) or current.stale.get(name)
        try:
            version = read_version(root, name)
        except StorageError as e:
            # Unreadable for now: whatever this replica holds of it stays as it is.
            log.error("reference collection %s: cannot read its reference.json: %s", name, e)
            if have is not None:
                loaded[name] = have
            if name in current.refused:
                refused[name] = current.refused[name]
            if name in current.stale:
                stale[name] = current.stale[name]
            continue
        if version is None:  # removed between the listing and the read
            continue
        if have is not None and version == have.version:
            loaded[name] = have
            continue
        if tried is not None and tried.version == version:  # refused as it is: not again
            if have is not None:
                loaded[name], stale[name] = have, tried
            else:
                refused[name] = tried
            continue
        try:
            c = load_collection(root, name, model_spec=clip_model)
        except (DataError, StorageError) as e:
            # A storage failure (a file missing mid-write, a timeout) is tried again next poll;
            # a collection refused for its content is not loaded again until it changes.
            failure = Refused(str(e), None if isinstance(e, StorageError) else version)
            if have is not None:
                loaded[name], stale[name] = have, failure
                log.error("reference collection %s: keeping the loaded version: %s", name, e)
            else:
                refused[name] = failure
                log.error("reference collection %s: refused: %s", name, e)
            continue
        loaded[name] = c
        log.info(
            "reference collection %s: %s %d images (%s, updated %s)",
            name,
            "swapped in" if have is not None else "loaded",
            len(c),
            c.meta.model_spec,
            c.meta.updated_at,
        )
    for name in set(current.loaded) - set(loaded):
        log.info("reference collection %s: removed", name)
    return Collections(loaded, refused, stale)


@serve.deployment
class ReferenceCollections:
    """The reference collections under one root, compared against; follows changes to them."""

    def __init__(
        self, args: ReferenceArgs, clip_model: str, aesthetic_config: str | None = None
    ) -> None:
        self.args, self.clip_model = args, clip_model
        # The ingress scores the query with this config; members must be scored with the same.
        self.config = (
            AestheticConfig.from_yaml(aesthetic_config)
            if aesthetic_config
            else AestheticConfig.default()
        )
        # A root that cannot be listed fails the replica, loudly; a bad collection does not.
        self._state = scan(args.root, clip_model, Collections())
        self._scanned_at = time.time()
        self._last_error: str | None = None
        self._swaps = 0
        self._profiles: OrderedDict[tuple[str, str, str], ReferenceProfile] = OrderedDict()
        # The poll thread prunes _profiles while requests use it on the event loop.
        self._profiles_lock = threading.Lock()
        self._building: dict[tuple[str, str, str], asyncio.Future[ReferenceProfile]] = {}
        self._stop = threading.Event()
        log.info(
            "reference collections under %s: %d loaded, %d refused",
            args.root,
            len(self._state.loaded),
            len(self._state.refused),
        )
        if args.poll_s > 0:
            threading.Thread(
                target=self._follow, name="keeper-references-poll", daemon=True
            ).start()

    def _follow(self) -> None:
        while not self._stop.wait(self.args.poll_s):
            try:
                self.refresh()
            except Exception as e:  # an unforeseen error must not end the polling for good
                self._last_error = f"{type(e).__name__}: {e}"
                log.exception("reference root %s: poll failed", self.args.root)

    def refresh(self) -> bool:
        """List the root again; True when the set of loaded collections changed."""
        before = self._state
        try:
            new = scan(self.args.root, self.clip_model, before)
        except StorageError as e:  # serving the collections held beats serving none
            self._last_error = f"{type(e).__name__}: {e}"
            log.error("reference root %s: keeping what is loaded: %s", self.args.root, e)
            return False
        self._scanned_at, self._last_error = time.time(), None
        changed = {n: c.version for n, c in new.loaded.items()} != {
            n: c.version for n, c in before.loaded.items()
        }
        if changed or new.refused != before.refused or new.stale != before.stale:
            self._state = new  # one reference: a request holds the set it started with
            self._swaps += changed
        if changed:  # a replaced or removed collection's profiles hold its old rows: drop them
            self._prune_profiles()
        return changed

    def _prune_profiles(self) -> None:
        """Drop the profiles of collection versions no longer loaded (and the oldest beyond
        the cache's size): each holds its collection, every member's embedding."""
        current = {(n, c.version) for n, c in self._state.loaded.items()}
        with self._profiles_lock:
            for old in [k for k in self._profiles if k[:2] not in current]:
                del self._profiles[old]
            while len(self._profiles) > _PROFILE_CACHE:
                self._profiles.popitem(last=False)

    def _collection(self, name: str) -> ReferenceCollection:
        state = self._state
        c = state.loaded.get(name)
        if c is not None:
            return c
        if name in state.refused:
            raise CollectionUnusable(name, state.refused[name].reason)
        raise UnknownCollection(f"no reference collection {name!r} (GET /v1/references lists them)")

    async def _profile(
        self, c: ReferenceCollection, prompt_emb: Mapping[str, np.ndarray]
    ) -> ReferenceProfile:
        key = (c.meta.name, c.version, prompts_fingerprint(prompt_emb))
        with self._profiles_lock:
            cached = self._profiles.get(key)
            if cached is not None:
                self._profiles.move_to_end(key)
                return cached
        task = self._building.get(key)
        if task is None:  # the first request builds it; any meanwhile wait for the same build
            task = asyncio.ensure_future(
                asyncio.to_thread(ReferenceProfile.build, c, prompt_emb, self.config)
            )
            self._building[key] = task
            task.add_done_callback(lambda t: self._built(key, t))
        # Shielded: a request that goes away does not cancel the build the others wait for.
        return await asyncio.shield(task)

    def _built(self, key: tuple[str, str, str], task: asyncio.Future[ReferenceProfile]) -> None:
        del self._building[key]
        if task.cancelled() or task.exception() is not None:  # its waiters got the error
            return
        with self._profiles_lock:
            self._profiles[key] = task.result()
        self._prune_profiles()  # a collection replaced during the build: its profile goes

    async def compare(
        self,
        name: str,
        query_emb: np.ndarray,
        features: Mapping[str, float] | None,
        prompt_emb: Mapping[str, np.ndarray],
        k: int,
    ) -> Compared:
        """A (D,) unit-norm image embedding (and its quality features) against ``name``.

        Raises:
            UnknownCollection: no such collection under the root.
            CollectionUnusable: the collection was refused (its reason).
            DataError: an embedding of another dimension, or prompts missing from
                ``prompt_emb``.
        """
        c = self._collection(name)  # one version for the whole request: a swap is harmless
        profile = await self._profile(c, prompt_emb)
        comparison = await asyncio.to_thread(profile.compare, query_emb, features, k)
        return Compared(c.meta, comparison)

    def list(self) -> dict[str, Any]:
        """The loaded collections' metas (by name) and the refused ones with their reasons."""
        state = self._state
        return {
            "root": self.args.root,
            "collections": [
                {
                    "meta": state.loaded[n].meta,
                    "error": state.stale[n].reason if n in state.stale else None,
                }
                for n in sorted(state.loaded)
            ],
            "refused": [
                {"name": n, "reason": state.refused[n].reason} for n in sorted(state.refused)
            ],
        }

    def info(self) -> dict[str, Any]:
        state = self._state
        return {
            "root": self.args.root,
            "loaded": len(state.loaded),
            "refused": len(state.refused),
            "scanned_at": self._scanned_at,
            "swaps": self._swaps,
            "last_error": self._last_error,
        }
