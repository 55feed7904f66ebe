"""Reference collections: a named set of images a person trusts, embedded once, compared against.

A score of 0.61 means nothing to a photographer; "your composition sits at the 62nd percentile of
this portfolio" does. A collection is keeper embed's table of its images under ``ROOT/NAME/``
(``embeddings/part-*.parquet``, ``errors/``, ``_KEEPER_TABLE.json``) with ``reference.json``
beside it, written last: a folder without it is an add in progress (or a failed one) and is not a
collection. ``keeper reference add|list|remove`` manages them; ``POST /v1/compare`` answers an
image's nearest references and where each of its scores sits in the collection.

    root = "s3://bucket/references"
    c = load_collection(root, "portfolio", model_spec="ViT-B-32:laion2b_s34b_b79k")
    profile = ReferenceProfile.build(c, prompt_emb, AestheticConfig.default())
    cmp = profile.compare(query_emb, {"sharpness": 5.1, ...}, k=5)
    cmp.aesthetic["composition"]  # Standing(value=0.58, percentile=62.0)

Percentiles are computed against the scorer that scores the query (member scores come from the
stored embeddings and the prompt set in use, not frozen at add time), so a changed prompt set
never compares new scores with old ones. A percentile says where a value sits, not whether it is
good: for ``noise`` or ``blockiness`` a high percentile means more of it than most references.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keeper_core import storage
from keeper_core.corpus import EMBEDDINGS, embedding_matrix
from keeper_core.errors import DataError, ModelLoadError, StorageError
from keeper_core.models import check_table
from keeper_core.quality import FEATURE_NAMES
from keeper_core.scoring import AestheticConfig, PromptEmbeddings, aesthetic_scores

#: ROOT/NAME/reference.json: written last by ``keeper reference add``; its presence makes NAME a
#: collection.
REFERENCE_FILE = "reference.json"
#: The name of the aesthetic total among a comparison's aesthetic dimensions.
TOTAL = "total"
# A name is one path segment in a folder and in a URL: letters, digits, '.', '_' and '-'.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" would let "a\n" by


def check_name(name: str) -> str:
    """``name`` when it can name a collection.

    Raises:
        DataError: empty, over 64 characters, or with characters other than letters, digits,
            '.', '_' and '-' (or not starting with a letter or digit).
    """
    if not _NAME.fullmatch(name):
        raise DataError(
            f"collection name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def collection_uri(root: str, name: str) -> str:
    """Where collection ``name`` lives under ``root`` (its embedding table's folder)."""
    return storage.join(root, check_name(name))


def now() -> str:
    """The current time as ISO 8601 UTC, to the second (what ``reference.json`` records)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class ReferenceMeta(BaseModel):
    """``reference.json``: what a collection is."""

    model_config = ConfigDict(extra="forbid")

    format: int = 1
    name: str
    model_spec: str = Field(description="the ModelSpec every member was embedded with")
    embed_dim: int = Field(ge=1)
    images: int = Field(ge=0, description="members: rows of the embedding table")
    failed: int = Field(0, ge=0, description="inputs that could not be embedded (errors/)")
    sources: list[str] = Field(default_factory=list, description="inputs added, oldest first")
    description: str = ""
    created_at: str
    updated_at: str


def meta_uri(root: str, name: str) -> str:
    return storage.join(collection_uri(root, name), REFERENCE_FILE)


def write_meta(root: str, meta: ReferenceMeta) -> None:
    """Write ``meta`` as ``ROOT/NAME/reference.json`` (atomically: one file, one put)."""
    storage.write_bytes(meta_uri(root, meta.name), meta.model_dump_json(indent=2).encode())


def _parse_meta(data: bytes, source: str) -> ReferenceMeta:
    try:
        return ReferenceMeta.model_validate(json.loads(data))
    except (ValueError, ValidationError) as e:
        raise DataError(f"not a keeper reference.json: {e}", source=source) from e


def read_meta(root: str, name: str) -> ReferenceMeta | None:
    """Collection ``name``'s ``reference.json``, or None when there is no such collection.

    Raises:
        DataError: the file is not a keeper reference.json.
        StorageError: it could not be read (other than missing).
    """
    uri = meta_uri(root, name)
    if not storage.exists(uri):
        return None
    return _parse_meta(storage.read_bytes(uri), uri)


def list_collections(root: str) -> list[str]:
    """The names of the collections under ``root``, sorted (folders holding a reference.json).

    An S3 prefix without keys holds none; a local folder that does not exist is an error (a
    mistyped root, or one unmounted under a server, is not an empty one).

    Raises:
        StorageError: the root could not be listed (a missing folder or bucket, access denied).
    """
    base = root.rstrip("/") + "/"
    names = []
    for uri in storage.list_files(root, suffixes=[f"/{REFERENCE_FILE}"]):
        rel = uri[len(base) :] if uri.startswith(base) else ""
        name, _, rest = rel.partition("/")
        if rest == REFERENCE_FILE and _NAME.fullmatch(name):
            names.append(name)
    return sorted(names)


def remove_collection(root: str, name: str) -> int:
    """Delete collection ``name``: its ``reference.json`` first (servers drop it at their next
    poll), then every file of its table. Returns the files removed (0: no such folder).

    Raises:
        StorageError: a delete failed; what remains is not a collection any more, and running
            the remove again finishes it.
    """
    folder = collection_uri(root, name)
    storage.delete(meta_uri(root, name))
    if not storage.is_s3(folder) and not storage.exists(folder):
        return 0
    files = storage.list_files(folder)
    for uri in files:
        storage.delete(uri)
    if not storage.is_s3(folder):  # the empty folders the files leave (S3 has none), and what
        # list_files skips: a killed write's temporary file
        try:
            for p in sorted(Path(folder).rglob("*"), key=lambda p: -len(p.parts)):
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                else:
                    p.unlink()
            Path(folder).rmdir()
        except OSError as e:
            raise StorageError(folder, f"cannot remove what is left: {e}", retryable=True) from e
    return len(files)


# --------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ReferenceCollection:
    """A loaded collection: its members' embeddings and quality features, by row."""

    meta: ReferenceMeta
    version: str  # sha256 of the reference.json it was loaded with
    image_id: list[str]
    image_uri: list[str]
    embeddings: np.ndarray  # (N, D) float32, unit norm
    features: dict[str, np.ndarray]  # quality feature -> (N,) float64, FEATURE_NAMES present

    def __len__(self) -> int:
        return len(self.image_uri)

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` members most similar to a (D,) unit vector: (rows, cosines), best first.

        Exact search: a collection is a portfolio (thousands of images, a few MB), not a corpus.
        Equal cosines (the same photo twice) are ordered by row, so which of them make the top
        ``k`` never depends on the selection algorithm; ``k`` < 1 answers none.

        Raises:
            DataError: a vector of another dimension.
        """
        q = np.asarray(query, np.float32).reshape(-1)
        if q.shape[0] != self.embeddings.shape[1]:
            raise DataError(
                f"query of dimension {q.shape[0]}; collection {self.meta.name!r} holds "
                f"{self.embeddings.shape[1]}-d embeddings"
            )
        sims = self.embeddings @ q
        k = max(0, min(k, len(sims)))
        if k == 0:
            return np.zeros(0, np.int64), sims[:0]
        # argpartition picks an arbitrary subset of members tied at the k-th cosine: take every
        # member at least that close, then order by (cosine desc, row asc) and cut at k.
        kth = sims[np.argpartition(-sims, k - 1)[k - 1]]
        cand = np.flatnonzero(sims >= kth) if np.isfinite(kth) else np.arange(len(sims))
        order = np.lexsort((cand, -sims[cand]))[:k]
        top = cand[order]
        return top, sims[top]


def load_collection(root: str, name: str, *, model_spec: str | None = None) -> ReferenceCollection:
    """Collection ``name`` under ``root``, its rows read once.

    Args:
        root: the folder or ``s3://`` prefix holding collections.
        name: the collection.
        model_spec: the spec queries will be embedded with; another one is refused.

    Raises:
        DataError: no such collection, a malformed reference.json or table, members embedded
            with another model spec than ``model_spec`` (similarities across specs mean
            nothing) or with a checkpoint since replaced at that spec's path (the weights
            version the table's ``_KEEPER_TABLE.json`` records), or a collection without
            members.
        StorageError: a file could not be read, the spec's checkpoint could not be reached to
            check its version, or the table does not hold the members reference.json counts
            (an add writing into it, or one interrupted: worth trying again later).
    """
    uri = meta_uri(root, name)
    try:
        raw = storage.read_bytes(uri)
    except StorageError as e:
        if not storage.exists(uri):
            raise DataError(f"no reference collection {name!r} under {root}") from e
        raise
    meta = _parse_meta(raw, uri)
    if meta.name != name:
        raise DataError(f"reference.json names {meta.name!r}, its folder {name!r}", source=uri)
    if model_spec is not None and meta.model_spec != model_spec:
        raise DataError(
            f"collection {name!r} was embedded with {meta.model_spec}; queries here are "
            f"embedded with {model_spec}: add it again with that model",
            source=uri,
        )
    table_uri = collection_uri(root, name)
    if model_spec is not None:
        # The same spec string with a checkpoint replaced at its path, or images prepared
        # otherwise: the members' vectors are another model's (keeper embed records both, as
        # for /v1/search).
        try:
            check_table(model_spec, table_uri)
        except ModelLoadError as e:
            raise StorageError(table_uri, f"cannot check the weights: {e}", retryable=True) from e
    folder = storage.join(table_uri, EMBEDDINGS)
    t = storage.read_parquet(folder)
    missing = sorted({"image_id", "image_uri", "model_spec", "embedding"} - set(t.column_names))
    if missing:
        raise DataError(f"collection {name!r}: its table lacks {missing}", source=folder)
    if not t.num_rows:
        raise DataError(f"collection {name!r} has no members", source=folder)
    # keeper embed keeps one row per image; an add in progress can hold a row twice (a retried
    # write, until its end dedupes): the first part by name keeps it, as embed's dedupe does.
    uris = [str(x) for x in t.column("image_uri").to_pylist()]
    first: dict[str, int] = {}
    for i, u in enumerate(uris):
        first.setdefault(u, i)
    if len(first) != len(uris):
        t = t.take(np.fromiter(first.values(), np.int64, len(first)))
    if t.num_rows != meta.images:
        # Rows reference.json does not count: an add is writing into the table (or was
        # interrupted); serving them would answer for a collection no reference.json describes.
        raise StorageError(
            folder,
            f"collection {name!r}: the table holds {t.num_rows} images, its reference.json "
            f"{meta.images}: an add is in progress or was interrupted (run it again)",
            retryable=True,
        )
    specs = set(pc.unique(t.column("model_spec")).to_pylist())
    if specs != {meta.model_spec}:
        raise DataError(
            f"collection {name!r}: its rows hold {sorted(map(str, specs))} embeddings, its "
            f"reference.json says {meta.model_spec}",
            source=folder,
        )
    emb = embedding_matrix(t, source=folder)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # in place: one copy
    features = {}
    for f in FEATURE_NAMES:
        if f in t.column_names:
            try:
                features[f] = t.column(f).to_numpy(zero_copy_only=False).astype(np.float64)
            except (ValueError, TypeError) as e:
                raise DataError(
                    f"collection {name!r}: column {f} is not numeric", source=folder
                ) from e
    return ReferenceCollection(
        meta=meta,
        version=hashlib.sha256(raw).hexdigest(),
        image_id=[str(x) for x in t.column("image_id").to_pylist()],
        image_uri=[str(x) for x in t.column("image_uri").to_pylist()],
        embeddings=emb,
        features=features,
    )


# --------------------------------------------------------------------------------- comparing


def percentile_rank(sorted_values: np.ndarray, value: float) -> float | None:
    """Where ``value`` sits among ``sorted_values`` (ascending, no NaN), in [0, 100].

    The mid-rank percentile: the share of values below it plus half the share equal to it, so
    a value equal to every reference sits at 50, one above all of them at 100. None when there
    is nothing to compare with or ``value`` is NaN.
    """
    n = len(sorted_values)
    if n == 0 or not np.isfinite(value):
        return None
    below = int(np.searchsorted(sorted_values, value, side="left"))
    upto = int(np.searchsorted(sorted_values, value, side="right"))
    return 100.0 * (below + 0.5 * (upto - below)) / n


@dataclass(frozen=True)
class Standing:
    """One score of the query and its percentile in the collection (None: not comparable)."""

    value: float
    percentile: float | None


@dataclass(frozen=True)
class Neighbour:
    image_id: str
    image_uri: str
    score: float  # cosine


@dataclass(frozen=True)
class Comparison:
    """An image against a collection."""

    nearest: list[Neighbour]
    aesthetic: dict[str, Standing]  # "total" and each aesthetic dimension
    quality: dict[str, Standing]  # each quality feature both sides have


def _sorted_finite(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, np.float64)
    return np.sort(v[np.isfinite(v)])


@dataclass(frozen=True)
class ReferenceProfile:
    """A collection with its members' scores sorted per dimension, for percentiles.

    Built once per collection version and prompt set (scoring every member is one matmul).
    """

    collection: ReferenceCollection
    config: AestheticConfig
    prompts: PromptEmbeddings | Mapping[str, np.ndarray]
    aesthetic: dict[str, np.ndarray]  # dimension (and "total") -> members' scores, ascending
    quality: dict[str, np.ndarray]  # feature -> members' values, ascending

    @classmethod
    def build(
        cls,
        collection: ReferenceCollection,
        prompt_emb: PromptEmbeddings | Mapping[str, np.ndarray],
        config: AestheticConfig,
    ) -> ReferenceProfile:
        """Score every member with ``config`` and sort the scores.

        Raises:
            DataError: prompt embeddings of another dimension, or missing prompts.
        """
        scores = aesthetic_scores(collection.embeddings, prompt_emb, config)
        aesthetic = {TOTAL: _sorted_finite(scores.total)}
        aesthetic.update({k: _sorted_finite(v) for k, v in scores.dimensions.items()})
        quality = {f: _sorted_finite(v) for f, v in collection.features.items()}
        return cls(collection, config, prompt_emb, aesthetic, quality)

    def compare(
        self, query: np.ndarray, features: Mapping[str, float] | None, k: int
    ) -> Comparison:
        """A (D,) unit-norm query embedding (and its quality features) against the collection.

        Raises:
            DataError: a query of another dimension than the collection's.
        """
        rows, sims = self.collection.nearest(query, k)
        c = self.collection
        nearest = [
            Neighbour(c.image_id[r], c.image_uri[r], float(s))
            for r, s in zip(rows.tolist(), sims, strict=True)
        ]
        scores = aesthetic_scores(np.asarray(query, np.float32)[None, :], self.prompts, self.config)
        values = {TOTAL: float(scores.total[0])}
        values.update({k: float(v[0]) for k, v in scores.dimensions.items()})
        aesthetic = {
            d: Standing(v, percentile_rank(self.aesthetic[d], v)) for d, v in values.items()
        }
        quality = {
            f: Standing(float(v), percentile_rank(self.quality[f], float(v)))
            for f, v in (features or {}).items()
            if f in self.quality
        }
        return Comparison(nearest, aesthetic, quality)
