"""Cull a photo library: find the bursts, keep the best of each, flag duplicates and failures.

    keeper pick --input ~/Pictures/2026-06-wedding --output ~/culls/wedding
    keeper pick --input s3://photos/trip/ --output s3://culls/trip/ --model models:/keeper-ranker@champion
    python -m keeper_train.jobs.pick --config packages/train/configs/pick.yaml input=... output=...

The last line is the ``ray job submit ... --`` and KubeRay RayJob entrypoint. No labels and no
series ids are needed: photos are grouped into bursts/scenes by capture time (per camera body)
and embedding similarity, each group is ranked by the registered ranker (``models:/NAME@champion``
when one exists) or by a zero-shot rule on quality features that every output names as such, and
each photo is kept, kept as an alternate, or rejected, with the reasons.

    plan      refuse a WebDataset corpus (keeper embed's input, not a photo library) and
              sidecar or keeper-export settings the write step could not honour for this input
              (a manifest's images in several buckets under xmp=mirror or copy_keepers, S3
              images under xmp=beside or embed); resolve the ranker (before any work: its embedding
              spec is the one to embed with)
    embed     keeper embed into OUTPUT/table (resumable: embeds only what is missing), reading
              capture metadata and writing thumbnails from the bytes and pixels it already has
    load      the table's rows for this input; images that failed, with their reasons; capture
              metadata and thumbnails for rows of older tables that lack them
    cull      keeper_core.culling.cull: group -> duplicates -> rank -> decide (what /v1/pick runs)
    write     OUTPUT/picks.parquet + picks.csv, OUTPUT/failed.csv, OUTPUT/index.html (the contact
              sheet, pages/ and thumbs/), XMP sidecars (mirrored under OUTPUT/xmp, or beside the
              originals; with xmp=embed, into JPEG originals; one that cannot be written is
              recorded with its reason and the rest are written), optional copies or links of
              the keepers; OUTPUT/_SUMMARY.json

Originals are never moved or renamed, and never written but with xmp=embed (opt-in), which
writes keeper's XMP into JPEG originals themselves, for Lightroom Classic (it reads a JPEG's
rating from the file, never from a sidecar): only the XMP segment changes, checked byte for byte
before an atomic replace (keeper_core.jpeg_xmp). Every output is written atomically and rebuilt
whole from the table on every run, so a run killed at any point is completed by running it again.
Exit codes: 0 done, 2 bad config or input, 3 embed failed more images than its limit allows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from keeper_core import run_lock, storage
from keeper_core.capture import CAPTURE_COLUMNS, capture_row, read_capture
from keeper_core.contact_sheet import SheetSummary, thumbnail_name, write_contact_sheet
from keeper_core.corpus import EMBEDDINGS
from keeper_core.culling import CullResult, Scorer, cull, picks_csv, picks_table, table_frame
from keeper_core.errors import ConfigError, DataError, KeeperError, ModelLoadError, StorageError
from keeper_core.grouping import GroupingConfig, dhash
from keeper_core.handback import (
    SidecarPlan,
    SidecarWrite,
    export_keepers,
    holds_keepers_fields,
    name_key,
    plan_sidecars,
    read_sidecar,
    write_sidecar,
    xml_text,
)
from keeper_core.images import DecodeLimits, decode_image, read_image_bytes
from keeper_core.jpeg_xmp import embeds_into, write_jpeg_xmp
from keeper_core.models import ModelSpec, spec_field
from keeper_core.picking import PickConfig
from keeper_core.progress import Progress
from keeper_core.webdataset import is_webdataset
from keeper_train.jobs import embed
from keeper_train.table import ErrorRows, in_set, restamp_written

log = logging.getLogger("keeper.pick")

DEFAULT_RANKER = "keeper-ranker"
TABLE, XMP, SUMMARY = "table", "xmp", "_SUMMARY.json"


class PickJobConfig(BaseModel):
    """Everything ``keeper pick`` takes. Unknown keys are errors (a typo fails before any work)."""

    model_config = ConfigDict(extra="forbid")
    #: :func:`earlier_outputs`, listed once per run (the plan, embed and load steps all ask)
    _earlier_outputs: list[str] | None = PrivateAttr(None)

    input: str = Field(description="folder, s3:// prefix, or CSV/Parquet manifest of photos")
    output: str = Field(description="folder or s3:// prefix for the picks, sheet and sidecars")
    embeddings: str | None = Field(
        None, description="the embedding table to reuse and extend (default OUTPUT/table)"
    )
    model: str | None = Field(
        None,
        description="ranker: models:/NAME@ALIAS or models:/NAME/VERSION (default: "
        "models:/<ranker_name>@champion when the registry has one, else the zero-shot rule)",
    )
    ranker_name: str = Field(DEFAULT_RANKER, description="registered model whose @champion ranks")
    zero_shot: bool = Field(False, description="rank with the zero-shot rule even if one exists")
    clip_model: str | None = Field(
        None,
        description="ModelSpec to embed with (default: the ranker's embedding spec, else "
        "keeper-tiny:random)",
    )
    grouping: GroupingConfig = Field(default_factory=GroupingConfig)
    picking: PickConfig = Field(default_factory=PickConfig)
    xmp: Literal["mirror", "beside", "embed", "none"] = Field(
        "mirror",
        description="XMP sidecars: mirrored under OUTPUT/xmp, beside the originals (local "
        "folders only; an existing sidecar is merged, its other fields kept), none, or embed: "
        "written INTO each JPEG original (for Lightroom Classic, which reads a JPEG's rating "
        "only from the file; only its XMP segment changes, checked before an atomic replace), "
        "beside every other photo as with beside; the one setting that writes originals",
    )
    xmp_naming: Literal["basename", "full"] = Field(
        "basename", description="IMG_1.xmp (Lightroom, Capture One) or IMG_1.CR2.xmp (darktable)"
    )
    overwrite_ratings: bool = Field(
        False,
        description="replace a rating or colour label a person gave (in an existing sidecar) "
        "with keeper's; by default only those keeper set change",
    )
    copy_keepers: str | None = Field(None, description="copy the keepers here (mirrored paths)")
    link_keepers: str | None = Field(None, description="hard-link the keepers here")
    link_mode: Literal["hardlink", "symlink"] = "hardlink"
    groups_per_page: int = Field(100, ge=1, description="contact sheet groups per page")
    io_threads: int = Field(
        16,
        ge=1,
        # The S3 client pools 32 connections (storage._cached_client): more threads would open
        # and drop connections beyond them.
        le=32,
        description="sidecars written at once: each is 2-3 requests of tens of ms on S3 or a "
        "network file system, and one fsync beside the originals (a mirror on local disks, "
        "written without fsync, is written one at a time, which is faster)",
    )
    batch_size: int = Field(64, ge=1, description="images per model forward pass")
    concurrency: int = Field(1, ge=1, description="model actors")
    num_gpus_per_worker: float = Field(0.0, ge=0)
    decode_concurrency: int | None = Field(None, ge=1)
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per model actor (embed's key)"
    )
    decode_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per decode task (embed's key)"
    )
    max_failure_fraction: float = Field(0.05, ge=0, le=1)
    retry_errors: bool = Field(
        False,
        description="read again the files an earlier run could not (re-copied from the card, "
        "or a limit raised); by default a file that failed is not read again",
    )
    prune: bool = Field(
        False,
        description="remove the embedding table's rows of photos no longer under input and not "
        "found moved (deleted, or on a disk not mounted); refused when they are more than "
        "max_prune_fraction of the input's rows (keeper embed's prune)",
    )
    max_prune_fraction: float = Field(0.25, ge=0, le=1, description="keeper embed's")
    # None: keeper embed's limits (64 MP, 64 MiB, 256 MiB for a RAW); a 100 MP medium-format
    # body or a stitched panorama needs more, or every one of its photos fails.
    max_pixels: int | None = Field(
        None,
        ge=1,
        description="largest photo in pixels (default 64 MP; PIL still refuses over ~179 MP)",
    )
    max_bytes: int | None = Field(None, ge=1, description="largest photo file (default 64 MiB)")
    max_raw_bytes: int | None = Field(
        None, ge=1, description="largest camera RAW file (default 256 MiB)"
    )
    limit: int | None = Field(None, ge=1, description="only the first N inputs (smoke runs)")
    tracking_uri: str | None = None
    data_dir: str = Field("keeper-data", description="embedded MLflow store when none is set")
    ray_address: str | None = None

    @field_validator("clip_model")
    @classmethod
    def _known_clip_model(cls, v: str | None) -> str | None:
        return None if v is None else spec_field(v)  # embed's own check of model

    @field_validator("input", "output", "embeddings", "copy_keepers", "link_keepers")
    @classmethod
    def _utf8_path(cls, v: str | None) -> str | None:
        return None if v is None else storage.utf8_path(v)  # the summary and sheet name them

    @model_validator(mode="after")
    def _consistent(self) -> PickJobConfig:
        if self.zero_shot and self.model:
            raise ValueError("zero_shot and model exclude each other")
        if self.copy_keepers and self.link_keepers:
            raise ValueError("copy_keepers and link_keepers exclude each other")
        if self.xmp in ("beside", "embed") and storage.is_s3(self.input):
            where = "into and next to" if self.xmp == "embed" else "next to"
            raise ValueError(f"xmp={self.xmp} writes {where} the originals: local folders only")
        return self

    @property
    def out(self) -> str:
        return self.output.rstrip("/")

    @property
    def decode_limits(self) -> dict[str, int]:
        """The decode limits set here, by their keeper embed (and ``DecodeLimits``) names."""
        given = {
            "max_pixels": self.max_pixels,
            "max_bytes": self.max_bytes,
            "max_raw_bytes": self.max_raw_bytes,
        }
        return {k: v for k, v in given.items() if v is not None}

    @property
    def sidecar_mode(self) -> Literal["mirror", "beside"]:
        """Where sidecars go: ``embed`` puts those of the photos it does not write into (all but
        JPEGs) beside them."""
        return "mirror" if self.xmp == "mirror" else "beside"

    @property
    def table(self) -> str:
        return (self.embeddings or storage.join(self.out, TABLE)).rstrip("/")

    @property
    def is_manifest(self) -> bool:
        """Whether ``input`` is a CSV/Parquet manifest (embed's test), not a folder or prefix."""
        return self.input.lower().endswith(embed.MANIFEST_SUFFIXES)

    @property
    def mirrors_paths(self) -> list[str]:
        """The settings that write each photo at its path relative to the input root."""
        return [
            key
            for key, on in (
                ("xmp=mirror", self.xmp == "mirror"),
                ("copy_keepers", bool(self.copy_keepers)),
                ("link_keepers", bool(self.link_keepers)),
            )
            if on
        ]

    def input_root(self, inputs: Sequence[str]) -> str:
        """The folder relative paths (mirrored sidecars, copies) start from.

        The input folder; for a manifest, the deepest folder holding every image it lists.

        Raises:
            ConfigError: a manifest's images have no such folder (several buckets, or S3 and
                local paths mixed), naming the settings that need one.
        """
        if not self.is_manifest:
            return self.input.rstrip("/")
        if not inputs:
            return storage.parent(self.input)
        try:
            return common_folder(inputs)
        except ConfigError as e:
            uses = " and ".join(self.mirrors_paths) or "mirrored paths"
            raise ConfigError(
                f"input {self.input!r}: {e}, so {uses} (which write each photo at its path "
                "relative to one folder or prefix holding every image) cannot: use xmp=none "
                "(or xmp=beside, for local images) without copy_keepers/link_keepers, or "
                "split the manifest"
            ) from e


def common_folder(uris: Sequence[str]) -> str:
    """The deepest folder or prefix holding every URI (all local, or all in one bucket).

    Raises:
        ConfigError: the URIs span several buckets, or mix ``s3://`` and local paths.
    """
    import os.path

    if all(storage.is_s3(u) for u in uris):
        parts = [u.split("/") for u in uris]
        common = []
        for names in zip(*[p[:-1] for p in parts], strict=False):
            if len(set(names)) != 1:
                break
            common.append(names[0])
        if len(common) < 3:  # s3:, "", bucket
            buckets = sorted({p[2] for p in parts})
            shown = ", ".join(buckets[:3]) + (", ..." if len(buckets) > 3 else "")
            raise ConfigError(f"the manifest's images span {len(buckets)} buckets ({shown})")
        return "/".join(common)
    if any(storage.is_s3(u) for u in uris):
        raise ConfigError("the manifest mixes s3:// and local images")
    return os.path.commonpath([os.path.dirname(storage.same_key(u)) for u in uris])


# --------------------------------------------------------------------------------------------
# plan: the input, the ranker


def check_input(cfg: PickJobConfig) -> None:
    """Refuse a WebDataset corpus, or a local input that is not there, before any work (and
    before the registry is asked for a ranker): keeper pick culls photos, not shards.

    ``keeper embed`` reads ``.tar`` shards (a single ``.tar``, a brace pattern, or a folder or
    prefix of shards and no loose images: :func:`keeper_core.webdataset.is_webdataset`, the test
    embed makes); pick's photos must be files of their own, to group, rate and give sidecars.

    Raises:
        ConfigError: the input is WebDataset shards.
        StorageError: a local input that is not there; an ``s3://`` prefix cannot be listed.
    """
    if is_webdataset(cfg.input):
        raise ConfigError(
            f"input {cfg.input!r} is a WebDataset corpus (.tar shards): keeper pick culls photo "
            "folders, s3:// prefixes of photos and CSV/Parquet manifests of them; embed a "
            "WebDataset corpus with keeper embed"
        )
    if not storage.is_s3(cfg.input) and not storage.exists(cfg.input):
        raise StorageError(cfg.input, "no such folder or manifest")


def check_handback(cfg: PickJobConfig) -> None:
    """Refuse sidecar and keeper-export settings the write step cannot honour, before any work.

    The write step's own checks, run here on the inputs (embed, which takes minutes to hours,
    comes between): :meth:`PickJobConfig.input_root` (``common_folder``: ``xmp=mirror``,
    ``copy_keepers`` and ``link_keepers`` need one folder or prefix holding every image),
    ``plan_sidecars`` (``xmp=beside`` and ``embed`` write beside and into local originals only) and
    ``export_keepers`` (links are local only). A folder's or prefix's root is the input itself
    and it is not listed here; a manifest is read for its image URIs (``embed.list_inputs``,
    what embed and the load step read), the first ``limit`` of them as those steps take.

    Raises:
        ConfigError: the settings cannot be written for these inputs (naming the setting).
        DataError, StorageError: the manifest cannot be read (embed would fail the same way).
    """
    dest = cfg.copy_keepers or cfg.link_keepers
    if cfg.xmp == "none" and not dest:
        return
    inputs: list[str] = []
    if cfg.is_manifest:
        inputs, _ = embed.list_inputs(cfg.input, exclude=excluded(cfg))
        if cfg.limit:
            inputs = inputs[: cfg.limit]
    root = cfg.input_root(inputs) if cfg.mirrors_paths else ""
    if cfg.xmp != "none":
        out_dir = storage.join(cfg.out, XMP) if cfg.xmp == "mirror" else None
        on_s3 = [u for u in inputs if storage.is_s3(u)] if cfg.xmp == "embed" else []
        if on_s3:
            raise ConfigError(
                f"xmp=embed with input {cfg.input!r}: it writes into local JPEGs and beside "
                f"local photos only, and {on_s3[0]} is on S3 (use xmp=mirror)"
            )
        try:
            plan_sidecars(
                inputs,
                input_root=root,
                mode=cfg.sidecar_mode,
                out_dir=out_dir,
                naming=cfg.xmp_naming,
            )
        except ConfigError as e:
            raise ConfigError(f"xmp={cfg.xmp} with input {cfg.input!r}: {e}") from e
    if dest:
        key = "copy_keepers" if cfg.copy_keepers else "link_keepers"
        mode = "copy" if cfg.copy_keepers else cfg.link_mode
        try:
            # Its checks of mode and destination: given no images, it exports nothing.
            export_keepers([], input_root=root, dest=dest, mode=mode)
        except ConfigError as e:
            raise ConfigError(f"{key}={dest!r}: {e}") from e
        if mode != "copy" and storage.is_s3(root):  # export_keepers' check of the images
            raise ConfigError(
                f"link_keepers links files on a local disk and the images are on S3 ({root}): "
                "use copy_keepers"
            )


@dataclass
class Ranker:
    """A registered ranker, ready to score the groups of a cull."""

    uri: str
    label: str
    embedding_spec: str | None
    scorer: Scorer
    info: dict[str, Any]


def resolve_ranker(cfg: PickJobConfig) -> tuple[Ranker | None, str]:
    """The ranker to use, or None for the zero-shot rule, and a line saying which and why.

    An explicit ``model`` that cannot load is an error. Without one, the registry's
    ``@champion`` of ``ranker_name`` is used when it exists; when the registry has no such model
    or alias, the zero-shot rule is used and the line says so (it is also in every output).

    Raises:
        ModelLoadError: ``model`` does not resolve or load, or the registry cannot be read.
    """
    if cfg.zero_shot:
        return None, "ranker: the zero-shot rule (asked for with zero_shot)"
    from keeper_core.registry import tracking_uri, use_tracking_store

    explicit = cfg.model is not None
    uri = cfg.model or f"models:/{cfg.ranker_name}@champion"
    # Not made to look: a first pick in a folder leaves no keeper-data/ (no store: no champion)
    store = tracking_uri(cfg.tracking_uri, cfg.data_dir, create=False)
    if not explicit and not _has_champion(store, cfg.ranker_name):
        return None, (
            f"ranker: the zero-shot rule: no {uri} in {store} "
            "(train, register and promote one to rank with it)"
        )
    import mlflow

    from keeper_train.jobs.evaluate import load_model

    use_tracking_store(store)  # the client's store, for anything that reads the global one
    loaded = load_model(mlflow.MlflowClient(store), uri)
    cols = loaded.input_columns()
    label = loaded.ref.label()

    def score(frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise DataError(f"{label} needs columns {missing}")
        out = loaded.pyfunc.predict(frame[cols])
        uris = frame["image_uri"].astype(str).to_numpy()
        if len(out) != len(uris) or not (out["image_uri"].astype(str).to_numpy() == uris).all():
            raise DataError(f"{label} returned rows out of input order")
        return np.asarray(out["score"], dtype=np.float64)

    spec = loaded.config.embedding_spec if loaded.config.features != "quality" else None
    if loaded.config.tower is not None:
        # A fine-tuned ranker embeds each image with its own tower (its pyfunc reads image_uri);
        # the library is embedded with its base model, for grouping and duplicates.
        spec = loaded.config.tower.base_spec
    info = {"uri": uri, "name": loaded.ref.name, "version": loaded.ref.version}
    ranker = Ranker(uri, f"{label} ({uri})", spec, score, info)
    return ranker, f"ranker: {ranker.label}, trained on {loaded.config.embedding_spec}"


def _has_champion(store: str, name: str) -> bool:
    """Whether ``name@champion`` exists; a store that cannot be read is an error, not a no.

    Raises:
        ConfigError: ``store`` is not a URI MLflow has a registry for.
        ModelLoadError: the registry cannot be read.
    """
    if store.startswith("sqlite:///"):
        from pathlib import Path

        if not Path(store.removeprefix("sqlite:///")).is_file():
            return False  # no store yet: nothing registered (and nothing created by asking)
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    from keeper_core.registry import unsupported_store

    try:
        model = mlflow.MlflowClient(store).get_registered_model(name)
    except UnsupportedModelRegistryStoreURIException as e:  # the URI names no MLflow store
        raise ConfigError(unsupported_store("tracking_uri", store, e.supported_uri_schemes)) from e
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise ModelLoadError(f"models:/{name}@champion", f"{e.message} ({store})") from e
    return "champion" in (model.aliases or {})


def embedding_spec(cfg: PickJobConfig, ranker: Ranker | None) -> str:
    """The ModelSpec to embed with: the ranker's, or the one asked for (they must agree)."""
    if ranker is not None and ranker.embedding_spec:
        if cfg.clip_model and str(ModelSpec.parse(cfg.clip_model)) != ranker.embedding_spec:
            raise ConfigError(
                f"clip_model {cfg.clip_model!r} differs from {ranker.label}'s embedding spec "
                f"{ranker.embedding_spec!r}: a ranker only scores embeddings of its own spec"
            )
        return ranker.embedding_spec
    return cfg.clip_model or "keeper-tiny:random"


# --------------------------------------------------------------------------------------------
# load: the table's rows for this input, completed where an older table lacks columns


@dataclass
class Library:
    """The photos of one input: the rows to cull and the files that failed."""

    inputs: list[str]
    frame: pd.DataFrame
    failed: pd.DataFrame  # image_uri, stage, reason, error
    backfilled: int
    seconds: dict[str, float]
    #: thumbnails under OUTPUT/thumbs of photos the table no longer holds, removed
    thumbnails_removed: int = 0

    @property
    def lost(self) -> int:
        return len(self.inputs) - len(self.frame) - len(self.failed)


def excluded(cfg: PickJobConfig) -> list[str]:
    """Outputs that may sit inside the input folder and must never be listed as photos: this
    run's, and those of earlier runs found there (:func:`earlier_outputs`)."""
    own = [p for p in (cfg.out, cfg.table, cfg.copy_keepers, cfg.link_keepers) if p]
    if cfg._earlier_outputs is None:  # one more listing of the input: once per run
        cfg._earlier_outputs = earlier_outputs(cfg)
    return own + cfg._earlier_outputs


def earlier_outputs(cfg: PickJobConfig) -> list[str]:
    """The output folders and keeper exports of earlier ``keeper pick`` runs inside the input.

    A run into ``INPUT/culls`` leaves thumbnails there, and ``--copy-keepers INPUT/keepers``
    byte-for-byte copies of the keepers: a later run with another output, or without the flag,
    would cull them as photos, and a copy that sorts first by path would be kept over its
    original, rejected as its exact duplicate. Each is found by the ``_SUMMARY.json`` it left
    (its folder, and the ``keepers`` folder it names); only folders strictly inside the input.
    """
    if cfg.is_manifest:
        return []  # a manifest names its photos: nothing is listed by folder
    (root,) = embed.folder_keys([cfg.input])
    try:
        summaries = storage.list_files(cfg.input, suffixes=[SUMMARY])
    except StorageError:
        return []  # the listing of the photos says why, with the reason
    found: list[str] = []
    for uri in summaries:
        folder, _, name = uri.rpartition("/")
        if name != SUMMARY:
            continue
        try:
            summary = json.loads(storage.read_bytes(uri))
        except (StorageError, ValueError):
            continue
        outputs = summary.get("outputs") if isinstance(summary, dict) else None
        if not isinstance(outputs, dict) or "contact_sheet" not in outputs:
            continue  # not keeper pick's
        keepers = outputs.get("keepers")
        for where in (folder, keepers if isinstance(keepers, str) else None):
            if where and storage.same_key(where).rstrip("/").startswith(root):
                found.append(where)
    return found


def load_library(cfg: PickJobConfig, spec: str) -> Library:
    """This input's rows of the embedding table, with capture metadata and thumbnails."""
    t0 = time.perf_counter()
    inputs, _ = embed.list_inputs(cfg.input, exclude=excluded(cfg))
    if cfg.limit:
        inputs = inputs[: cfg.limit]
    keys = {storage.same_key(u) for u in inputs}
    table = table_frame(storage.read_parquet(storage.join(cfg.table, embed.EMBEDDINGS)))
    in_input = in_set(table["image_uri"].astype(str).map(storage.same_key), keys)
    frame = _one_row_per_photo(table[in_input], inputs)
    specs = set(frame["model_spec"].astype(str))
    if specs - {spec}:
        raise DataError(f"the table holds embeddings of {sorted(specs)}, not {spec!r}")
    errors = ErrorRows.read(storage.join(cfg.table, embed.ERRORS)).rows()
    failed_keys = errors["image_uri"].astype(str).map(storage.same_key)
    # A file that failed under two spellings of the input is one failure; one embedded since
    # (under the other spelling) is no failure.
    done = set(frame["image_uri"].astype(str).map(storage.same_key))
    failed = errors[
        in_set(failed_keys, keys)
        & ~in_set(failed_keys, done)
        & ~failed_keys.duplicated().to_numpy()
    ]
    failed = _failed_details(cfg.table, failed)
    seconds = {"load": time.perf_counter() - t0}
    t0 = time.perf_counter()
    have = _thumbnails(cfg.out)
    removed = remove_stale_thumbnails(cfg.out, have, table["image_id"].astype(str))
    frame, n = backfill(cfg, frame, have)
    seconds["backfill"] = time.perf_counter() - t0
    return Library(inputs, frame, failed, n, seconds, removed)


def _one_row_per_photo(frame: pd.DataFrame, inputs: Sequence[str]) -> pd.DataFrame:
    """One row per file: a table embedded from ``lib`` and again from ``/abs/lib`` by a keeper
    before 2026-12-05 (whose embed compared URIs as written; it compares them as ``same_key``
    now) holds two for each photo, which would cull each as its own exact duplicate. The row
    spelled as this run lists the file is kept."""
    keys = frame["image_uri"].astype(str).map(storage.same_key)
    if not keys.duplicated().any():
        return frame.reset_index(drop=True)
    listed = in_set(frame["image_uri"].astype(str), set(inputs))
    order = np.lexsort((~listed,))  # stable: rows spelled as listed first
    first = ~keys.iloc[order].duplicated().to_numpy()
    return frame.iloc[np.sort(order[first])].reset_index(drop=True)


def _failed_details(table: str, failed: pd.DataFrame) -> pd.DataFrame:
    """The errors table's rows with stage and error text (ErrorRows keeps only what plans need)."""
    cols = ["image_uri", "stage", "reason", "error"]
    if failed.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    full = storage.read_parquet(storage.join(table, embed.ERRORS)).to_pandas()
    full = full.drop_duplicates("image_uri", keep="last").set_index("image_uri")
    out = failed[["image_uri", "reason"]].copy()
    for c in ("stage", "error"):
        out[c] = [full[c].get(u, "") if c in full.columns else "" for u in out["image_uri"]]
    return out[cols].sort_values("image_uri").reset_index(drop=True)


def backfill(cfg: PickJobConfig, frame: pd.DataFrame, have: set[str]) -> tuple[pd.DataFrame, int]:
    """Capture metadata and thumbnails for rows embedded before keeper pick wrote them (``have``:
    the thumbnails there, as :func:`_thumbnails` lists them).

    Only those rows are read again (a Ray Data pass); returns the frame and how many were read.
    """
    if "time_source" not in frame.columns:
        for name in CAPTURE_COLUMNS:
            frame[name] = None
    if "dhash" not in frame.columns:
        frame["dhash"] = None
    no_capture = frame["time_source"].isna().to_numpy()
    no_hash = frame["dhash"].isna().to_numpy()
    no_thumb = np.array([thumbnail_name(str(i)) not in have for i in frame["image_id"]], bool)
    todo = no_capture | no_thumb | no_hash
    if not todo.any():
        return frame, 0
    import ray.data

    from keeper_train.cluster import init_ray

    init_ray(cfg.ray_address)
    uris = frame.loc[todo, "image_uri"].astype(str).tolist()
    ids = frame.loc[todo, "image_id"].astype(str).tolist()
    ds = ray.data.from_items(
        [{"image_uri": u, "image_id": i} for u, i in zip(uris, ids, strict=True)]
    )
    rows = ds.map_batches(
        backfill_batch,  # type: ignore[arg-type]  # keyword-only stage arguments
        batch_size=16,
        batch_format="pandas",
        fn_kwargs={"thumbnails": cfg.out, "limits": DecodeLimits(**cfg.decode_limits)},
    ).to_pandas()
    got = rows.set_index("image_uri")
    for name, missing in [*((c, no_capture) for c in CAPTURE_COLUMNS), ("dhash", no_hash)]:
        values = frame[name].astype(object).to_numpy()
        for i in np.flatnonzero(missing):
            values[i] = got[name].get(str(frame.at[i, "image_uri"]))
        frame[name] = values
    return frame, len(uris)


def backfill_batch(
    batch: pd.DataFrame, *, thumbnails: str, limits: DecodeLimits | None = None
) -> pd.DataFrame:
    """Read each file once: capture metadata, and a thumbnail (a Ray Data task), named by the
    row's ``image_id`` as the contact sheet looks it up (the file's own sha256 when the batch
    has none): a JPEG keeper wrote its XMP into since it was embedded hashes otherwise, and its
    thumbnail would be made again by every run and shown by none.

    A file that cannot be read now (it vanished since it was embedded) gets no capture time,
    no dhash (it is then never marked a near duplicate: no pixels, no evidence) and no thumbnail
    (the contact sheet shows a placeholder).
    """
    out = []
    ids = batch["image_id"].astype(str).tolist() if "image_id" in batch else None
    for k, uri in enumerate(batch["image_uri"].astype(str)):
        try:
            data = read_image_bytes(uri, limits)
        except StorageError:
            out.append({"image_uri": uri, **capture_row(read_capture(b"")), "dhash": None})
            continue
        row = {"image_uri": uri, **capture_row(read_capture(data, mtime=embed.file_mtime(uri)))}
        row["dhash"] = None
        try:
            image = decode_image(data, limits=limits, draft_size=(256, 256))
            row["dhash"] = dhash(image)
            image_id = ids[k] if ids is not None else hashlib.sha256(data).hexdigest()
            embed.write_thumbnail(thumbnails, image_id, image)
        except KeeperError as e:
            log.warning("no thumbnail for %s: %s", uri, e)
        out.append(row)
    return pd.DataFrame(out)


def remove_stale_thumbnails(out: str, have: set[str], ids: Iterable[str]) -> int:
    """Remove the thumbnails under ``out``/thumbs (``have``, as :func:`_thumbnails` lists them)
    of image ids no row of the table holds (``ids``): photos embedded again after an edit was
    saved over them, or pruned. Else they would stay for good, a cache of pictures no sheet
    shows. Files there that keeper does not name so are left alone. Returns how many went."""
    keep = {thumbnail_name(i) for i in ids}
    stale = sorted(n for n in have if n not in keep and _is_thumbnail_name(n))

    def delete(name: str) -> bool:
        try:
            storage.delete(storage.join(out, name))
        except StorageError as e:  # a cache: the run goes on, and the next tries again
            log.warning("thumbnail %s not removed: %s", name, e)
            return False
        return True

    gone = [n for n, ok in zip(stale, storage.map_in_threads(delete, stale, 16), strict=True) if ok]
    if gone:
        have.difference_update(gone)
        log.info("removed %d thumbnail(s) of photos the table no longer holds", len(gone))
    return len(gone)


def _is_thumbnail_name(name: str) -> bool:
    """Whether ``name`` (relative to OUTPUT) is one :func:`thumbnail_name` gives."""
    try:
        return name == thumbnail_name(name.rpartition("/")[2].removesuffix(".jpg"))
    except DataError:
        return False


def _thumbnails(out: str) -> set[str]:
    folder = storage.join(out, "thumbs")
    try:
        files = storage.list_files(folder)
    except StorageError:
        return set()
    prefix = out.rstrip("/") + "/"
    return {f.removeprefix(prefix) for f in files}


# --------------------------------------------------------------------------------------------
# write: the picks, the sheet, the sidecars, the keepers


class SidecarFailure(BaseModel):
    """A sidecar that could not be written, and why (the photo's pick stands). With
    ``xmp=embed``, a JPEG whose own XMP could not be written: ``sidecar_uri`` is the JPEG (left
    as it was)."""

    image_uri: str
    sidecar_uri: str
    reason: str


class KeeperExportFailure(BaseModel):
    """A keeper that ``--copy-keepers`` / ``--link-keepers`` could not export, and why."""

    image_uri: str
    reason: str


class PickSummary(BaseModel):
    """A run's outcome; written to OUTPUT/_SUMMARY.json.

    ``sidecars`` counts written + unchanged + ``counts["sidecars_failed"]`` = the sidecars
    planned, and + skipped = the photos picked; ``sidecar_failures`` names each failed one. With
    ``xmp=embed`` a JPEG's own XMP counts as its sidecar, and ``files_written`` and
    ``files_unchanged`` say how many of the written and unchanged were JPEG originals.
    ``keepers_exported`` counts exported + already_there + updated + failed = the keepers, and
    ``export_failures`` names each failed one.
    """

    status: Literal["ok", "failed"]
    input: str
    output: str
    table: str
    ranker: str
    zero_shot: bool
    clip_model: str
    random_weights: bool
    counts: dict[str, int]
    sidecars: dict[str, int]
    sidecar_failures: list[SidecarFailure] = Field(default_factory=list)
    keepers_exported: dict[str, int] | None
    export_failures: list[KeeperExportFailure] = Field(default_factory=list)
    #: keeper's copies in the --copy-keepers folder, from earlier runs and still as it wrote
    #: them, of photos this run does not keep: left in place, named here
    keeper_copies_not_kept: list[str] = Field(default_factory=list)
    seconds: dict[str, float]
    outputs: dict[str, str]
    embed: dict[str, Any]
    finished: str
    #: where the sidecars went, so readers (keeper feedback-from-xmp) find them as pick placed
    #: them: ``xmp`` and ``xmp_naming`` as configured (``embed``: JPEGs' XMP in the files, the
    #: others' beside them), ``xmp_root`` the folder mirrored paths start from (None unless
    #: mirrored). Summaries written before these existed lack them.
    xmp: str | None = None
    xmp_naming: str | None = None
    xmp_root: str | None = None
    #: sha256 of the picks.parquet this summary describes: a reader that finds another one (a
    #: re-run rewriting the folder: picks.parquet first, this summary last) reads none of them
    picks_sha256: str | None = None

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


_DECISION_ORDER = {"keep": 0, "alternate": 1, "reject": 2}
# JPEGs written into at once (xmp=embed): each holds its photo in memory three to four times
# over (read, spliced, read back, exiv2's copy), and a local disk gains nothing from more.
_JPEGS_AT_ONCE = 4


@dataclass
class Sidecars:
    """What :func:`write_sidecars` did: each planned sidecar is written, unchanged or failed."""

    written: int = 0
    unchanged: int = 0
    skipped: int = 0  # photos sharing another's sidecar (RAW+JPEG), never planned
    #: written or unchanged sidecars holding a person's rating or label, left in place of keeper's
    kept_ratings: int = 0
    failed: list[SidecarFailure] = dataclass_field(default_factory=list)
    #: xmp=embed: of the written and unchanged, JPEG originals holding the XMP themselves (None
    #: in the other modes, which write no original)
    files_written: int | None = None
    files_unchanged: int | None = None
    #: xmp=mirror: keeper's sidecars of photos this run does not pick, removed (:func:`prune_mirror`)
    #: (None in the other modes)
    stale_removed: int | None = None

    def counts(self) -> dict[str, int]:
        """The summary's ``sidecars`` (failures are counted in ``counts["sidecars_failed"]``)."""
        out = {
            "written": self.written,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "kept_ratings": self.kept_ratings,
        }
        if self.stale_removed is not None:
            out["stale_removed"] = self.stale_removed
        if self.files_written is not None and self.files_unchanged is not None:
            out.update(files_written=self.files_written, files_unchanged=self.files_unchanged)
        return out


def since_last_run(counts: embed.Counts) -> str | None:
    """The contact sheet's note of what embed found changed in the library since it last ran."""
    parts = []
    if counts.changed:
        parts.append(f"{counts.changed} photo(s) saved over in place, measured and judged again")
    if counts.moved:
        parts.append(
            f"{counts.moved} photo(s) moved or renamed, found by their content (not embedded again)"
        )
    if counts.copied:
        parts.append(
            f"{counts.copied} new photo(s) were copies of photos already embedded (their rows "
            "copied, not embedded again)"
        )
    return "since the last run: " + "; ".join(parts) if parts else None


def gone_note(counts: embed.Counts) -> str | None:
    """The contact sheet's note of photos earlier runs embedded that the folder no longer holds
    (not since the last run only: until ``prune`` removes their rows, every run finds them)."""
    if not counts.gone:
        return None
    rows = (
        "their rows removed from the table (prune)"
        if counts.pruned
        else "their rows stay in the table until a run with --prune"
    )
    return (
        f"{counts.gone} photo(s) of earlier runs no longer in the folder (deleted, or on a disk "
        f"not mounted): {rows}"
    )


def write_sidecars(cfg: PickJobConfig, picks: pd.DataFrame, root: str) -> Sidecars:
    """One XMP sidecar per picked photo; counts written, unchanged, shared/skipped and failed.

    A RAW+JPEG pair shares the RAW's sidecar (photo tools show the pair as one photo): it gets
    the better decision of the two, so a kept JPEG is not hidden behind a rejected RAW. A sidecar
    that cannot be written (an existing file there that is not XMP, left as it is; a write that
    failed) is recorded with its reason and the others are written. File names quoted in the
    reasons may hold characters XML cannot store: they are written escaped (``\\x01``). With
    ``xmp=embed``, a JPEG that owns its sidecar's name gets its XMP written into the file
    instead (``jpeg_xmp.write_jpeg_xmp``; a refused one is recorded as a failed sidecar is), as
    does a JPEG beside a HEIC of its name (the HEIC gets the sidecar); the JPEG of a RAW+JPEG
    pair is left alone, as the pair shares the RAW's sidecar.
    Sidecars are written on ``cfg.io_threads`` threads (``storage.map_in_threads``), one thread per
    sidecar, and counted in the plans' order: the same counts and failures as one at a time. A
    mirror (no fsync) on local disks alone is written one at a time (``storage.io_threads_for``):
    there the threads only take turns at the GIL.
    """
    embed = cfg.xmp == "embed"
    done = Sidecars(files_written=0, files_unchanged=0) if embed else Sidecars()
    jpegs_at_once = threading.BoundedSemaphore(_JPEGS_AT_ONCE)
    if cfg.xmp == "none" or picks.empty:
        return done
    out_dir = storage.join(cfg.out, XMP) if cfg.xmp == "mirror" else None
    rows = {str(r["image_uri"]): r for r in picks.to_dict("records")}
    keys = group_keys(picks)
    plans = plan_sidecars(
        list(rows),
        input_root=root,
        mode=cfg.sidecar_mode,
        out_dir=out_dir,
        naming=cfg.xmp_naming,
        in_file=embeds_into if embed else None,
    )
    # One plan per sidecar or JPEG (a RAW+JPEG pair's is one plan): no two threads write one
    # file. A JPEG's earlier sidecar is updated only where no plan here owns its name.
    sidecars = [name_key(p.sidecar_uri) for p in plans if not p.in_file]
    files = [name_key(p.image_uri) for p in plans if p.in_file]
    owned = set(sidecars)
    assert len(owned) == len(sidecars), "a sidecar twice"
    assert len(set(files)) == len(files), "a JPEG twice"
    done.skipped = len(rows) - len(plans)

    def write(plan: SidecarPlan) -> tuple[bool, SidecarWrite | SidecarFailure]:
        sharing = [plan.image_uri, *(u for u, _ in plan.skipped if u in rows)]
        row = min(
            (rows[u] for u in sharing),
            key=lambda r: (_DECISION_ORDER[str(r["decision"])], int(r["rank"])),
        )
        values: dict[str, Any] = {
            "rating": int(row["rating"]),
            "label": row["label"] if isinstance(row["label"], str) else None,
            "keeper_fields": {
                "group": keys[str(row["group_id"])],
                "rank": str(int(row["rank"])),
                "decision": str(row["decision"]),
                "reasons": xml_text("; ".join(row["reasons"])),
            },
            "overwrite_ratings": cfg.overwrite_ratings,
        }
        in_file = plan.in_file
        target = plan.image_uri if in_file else plan.sidecar_uri
        try:
            if in_file:
                with jpegs_at_once:
                    wrote = write_jpeg_xmp(plan.image_uri, **values)
                if name_key(plan.sidecar_uri) not in owned:
                    _update_earlier_sidecar(plan, values)
                return True, wrote
            # Beside the originals a sidecar may hold the user's edits: fsync it. The mirror
            # under OUTPUT is keeper's own, rebuilt by any run.
            return False, write_sidecar(plan.sidecar_uri, durable=cfg.xmp != "mirror", **values)
        except KeeperError as e:
            return in_file, SidecarFailure(
                image_uri=plan.image_uri, sidecar_uri=target, reason=str(e)
            )

    targets = [p.image_uri if p.in_file else p.sidecar_uri for p in plans]
    # A mirror (out_dir) is written without fsync; beside the originals and into JPEGs each
    # file is fsynced, which the threads overlap.
    threads = storage.io_threads_for(targets, cfg.io_threads, fsync=out_dir is None)
    removed = storage.remove_stale_temps(targets, older_than_s=STALE_TEMP_S)
    if removed:
        log.info("removed %d temporary file(s) a killed run left beside the photos", removed)
    rewritten: dict[str, tuple[storage.Stamp, str]] = {}
    progress = Progress("photos' XMP written" if embed else "sidecars", len(plans), log)
    for plan, (in_file, result) in zip(
        plans, storage.map_in_threads(write, plans, threads), strict=True
    ):
        progress.step()
        if isinstance(result, SidecarFailure):
            what = "XMP of" if in_file else "sidecar"
            log.warning("%s %s not written: %s", what, result.sidecar_uri, result.reason)
            done.failed.append(result)
            continue
        done.written += int(result.changed)
        done.unchanged += int(not result.changed)
        done.kept_ratings += int(bool(result.kept))
        if in_file and done.files_written is not None and done.files_unchanged is not None:
            done.files_written += int(result.changed)
            done.files_unchanged += int(not result.changed)
        if result.stamp is not None and result.content_id is not None:
            rewritten[plan.image_uri] = (result.stamp, result.content_id)
    progress.done()
    if rewritten:  # else the next run reads every JPEG written to find it unchanged
        n = restamp_written(storage.join(cfg.table, EMBEDDINGS), rewritten)
        log.info("embedding table: %d rows given the stamps of the JPEGs written into", n)
    if out_dir is not None:
        done.stale_removed = prune_mirror(out_dir, [p.sidecar_uri for p in plans])
    return done


def prune_mirror(out_dir: str, planned: Sequence[str]) -> int:
    """xmp=mirror: removes the sidecars an earlier run left under ``out_dir`` for photos this run
    does not pick (deleted or renamed since, or left out by ``limit``); returns how many.

    The mirror is this run's output, rebuilt whole like the picks: a stale sidecar copied onto a
    library would give an old decision to whatever photo takes that name next (a camera's
    counter comes round). Only keeper's sidecars go (holding keeper's fields); another tool's
    file there, or one that cannot be read, stays, logged.
    """
    keep = {name_key(u) for u in planned}
    removed = 0
    for uri in storage.list_files(out_dir, suffixes=[".xmp"]):
        if name_key(uri) in keep:
            continue
        try:
            if holds_keepers_fields(read_sidecar(uri)):
                storage.delete(uri)
                removed += 1
                continue
            log.warning("sidecar %s under the mirror is not keeper's; left in place", uri)
        except KeeperError as e:
            log.warning("stale sidecar %s left in place: %s", uri, e)
    return removed


def group_keys(picks: pd.DataFrame) -> dict[str, str]:
    """Each group's ``keeper:group`` in the XMP, by ``group_id``: ``g`` and the first 12 hex
    digits of the smallest ``image_id`` (a content hash) among its shots.

    ``group_id`` (``g000042``) numbers one run's groups in time order, so photos of an earlier
    moment added to the library renumber every later group, and every sidecar and ``--xmp
    embed`` JPEG of those groups would be rewritten for that alone. This key changes only with
    the group's shots (and then their ranks and reasons may change too), whatever the order of
    rows or the spelling of the library's folder."""
    first = picks.groupby("group_id")["image_id"].min()
    return {str(g): f"g{str(i)[:12]}" for g, i in first.items()}


#: A temporary file beside a JPEG or sidecar older than this was left by a killed run
#: (``storage.remove_stale_temps``): a write and its checks take seconds, on a slow network
#: share a minute. ``xmp=embed``'s is a full-size hidden copy of the photo.
STALE_TEMP_S = 300


def _update_earlier_sidecar(plan: SidecarPlan, values: dict[str, Any]) -> None:
    """xmp=embed: a sidecar an earlier ``--xmp beside`` run left beside a JPEG still holds what
    keeper decided then, and darktable, Capture One and Bridge read it where Lightroom reads the
    file: merged with this run's choice (a person's rating in it stays), the two agree. A sidecar
    without keeper's fields is another tool's, and left alone; one that cannot be updated is
    logged (the JPEG, this run's XMP, was written)."""
    try:
        if not storage.exists(plan.sidecar_uri):
            return
        if not holds_keepers_fields(read_sidecar(plan.sidecar_uri)):
            return
        write_sidecar(plan.sidecar_uri, durable=True, **values)
    except KeeperError as e:
        log.warning("earlier sidecar %s beside the JPEG not updated: %s", plan.sidecar_uri, e)


@dataclass(frozen=True)
class Exported:
    """What ``--copy-keepers`` / ``--link-keepers`` did, as the summary records it."""

    counts: dict[str, int]
    failures: list[KeeperExportFailure]
    not_kept: list[str]


SHOWN_FAILURES = 5  # failures named in the printed summary and the sheet's header


def _failure_warnings(what: str, failures: list[tuple[str, str]]) -> list[str]:
    """One header line for the contact sheet naming the first few failures."""
    if not failures:
        return []
    shown = "; ".join(f"{uri}: {reason}" for uri, reason in failures[:SHOWN_FAILURES])
    more = len(failures) - SHOWN_FAILURES
    tail = f"; and {more} more" if more > 0 else ""
    return [f"{len(failures)} {what} (all in {SUMMARY}): {shown}{tail}"]


def write_outputs(
    cfg: PickJobConfig, lib: Library, result: CullResult, summary: SheetSummary
) -> tuple[dict[str, str], dict[str, float], Sidecars, Exported | None]:
    """Every output, each written atomically; returns paths, seconds, sidecars, the export.

    The contact sheet is written last, so its header can name the sidecars and keepers that
    failed (the first few; ``_SUMMARY.json`` lists them all).
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    paths = {
        "picks_parquet": storage.join(cfg.out, "picks.parquet"),
        "picks_csv": storage.join(cfg.out, "picks.csv"),
        "failed_csv": storage.join(cfg.out, "failed.csv"),
    }
    storage.write_parquet(picks_table(result.picks), paths["picks_parquet"])
    storage.write_bytes(paths["picks_csv"], picks_csv(result.picks))
    storage.write_bytes(paths["failed_csv"], lib.failed.to_csv(index=False).encode())
    seconds["write_tables"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Only mirrored paths need the root: xmp=none or beside takes any manifest.
    root = cfg.input_root(lib.inputs) if cfg.mirrors_paths else ""
    sidecars = write_sidecars(cfg, result.picks, root)
    if cfg.xmp == "mirror":
        paths["xmp"] = storage.join(cfg.out, XMP)
    seconds["write_xmp"] = time.perf_counter() - t0
    exported = None
    dest = cfg.copy_keepers or cfg.link_keepers
    if dest:
        t0 = time.perf_counter()
        keepers = result.picks.loc[result.picks["decision"] == "keep", "image_uri"]
        mode = "copy" if cfg.copy_keepers else cfg.link_mode
        res = export_keepers(
            keepers.astype(str).tolist(),
            input_root=root,
            dest=dest,
            mode=mode,
            io_threads=cfg.io_threads,
        )
        exported = Exported(
            counts={
                "exported": res.exported,
                "already_there": res.already_there,
                "updated": res.updated,
                "failed": len(res.failed),
            },
            failures=[KeeperExportFailure(image_uri=u, reason=r) for u, r in res.failed],
            not_kept=res.not_kept,
        )
        for f in exported.failures:
            log.warning("keeper %s not exported: %s", f.image_uri, f.reason)
        if res.record_problem:
            log.warning("%s", res.record_problem)
            summary.warnings.append(res.record_problem)
        paths["keepers"] = dest
        seconds["export_keepers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary.warnings += _failure_warnings(
        "XMP sidecar(s) not written", [(f.sidecar_uri, f.reason) for f in sidecars.failed]
    )
    if exported is not None:
        summary.warnings += _failure_warnings(
            "keeper(s) not exported", [(f.image_uri, f.reason) for f in exported.failures]
        )
    paths["contact_sheet"] = write_contact_sheet(
        cfg.out,
        result.picks,
        summary,
        failed=lib.failed,
        groups_per_page=cfg.groups_per_page,
        title=f"keeper pick: {cfg.input}",
    )
    seconds["write_sheet"] = time.perf_counter() - t0
    return paths, seconds, sidecars, exported


# --------------------------------------------------------------------------------------------
# The job: plan -> embed -> load -> cull -> write


def run(cfg: PickJobConfig) -> PickSummary:
    """Run ``keeper pick``; returns the summary (also written to OUTPUT/_SUMMARY.json).

    Raises:
        BusyError: another run is writing OUTPUT (``keeper pick`` or ``keeper unpick``: it holds
            OUTPUT/_LOCK.json, ``run_lock``), or its embedding table (``keeper embed``).
    """
    with run_lock.holding(cfg.out, job="keeper pick"):
        return _run(cfg)


def _run(cfg: PickJobConfig) -> PickSummary:
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    check_input(cfg)
    check_handback(cfg)
    ranker, ranker_line = resolve_ranker(cfg)
    spec = embedding_spec(cfg, ranker)
    log.info(ranker_line)
    seconds["plan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    emb = embed.run(
        embed.EmbedConfig(
            input=cfg.input,
            output=cfg.table,
            model=spec,
            batch_size=cfg.batch_size,
            concurrency=cfg.concurrency,
            num_gpus_per_worker=cfg.num_gpus_per_worker,
            decode_concurrency=cfg.decode_concurrency,
            actor_resources=cfg.actor_resources,
            decode_resources=cfg.decode_resources,
            max_failure_fraction=cfg.max_failure_fraction,
            retry_errors=cfg.retry_errors,
            prune=cfg.prune,
            max_prune_fraction=cfg.max_prune_fraction,
            **cfg.decode_limits,
            limit=cfg.limit,
            capture=True,
            thumbnails=cfg.out,
            exclude=excluded(cfg),
            ray_address=cfg.ray_address,
        )
    )
    print(embed.format_summary(emb), flush=True)
    seconds["embed"] = time.perf_counter() - t0

    lib = load_library(cfg, spec)
    seconds.update(lib.seconds)
    # After the embed pass's progress, the driver's own work: say so (a minute at 1M photos).
    log.info("culling %d photos: grouping, duplicates, ranking, decisions", len(lib.frame))
    result = cull(
        lib.frame,
        scorer=ranker.scorer if ranker else None,
        ranker=ranker.label if ranker else None,
        grouping=cfg.grouping,
        picking=cfg.picking,
    )
    seconds.update({f"cull_{k}": v for k, v in result.seconds.items()})
    log.info(
        "culled in %.1f s; writing picks, %s sidecars and the contact sheet",
        sum(result.seconds.values()),
        cfg.xmp if cfg.xmp != "none" else "no",
    )
    counts = {
        "in": len(lib.inputs),
        "picked": len(result.picks),
        "failed": len(lib.failed),
        "lost": lib.lost,
        **{k: v for k, v in result.counts().items() if k != "images"},
        "copy_timed": result.copy_timed,
        "capture_backfilled": lib.backfilled,
        "thumbnails_removed": lib.thumbnails_removed,
    }
    random_weights = ModelSpec.parse(spec).is_random
    notes = [f"embeddings: {spec}"]
    if random_weights:
        notes.append(
            "random CLIP weights: grouping similarities and near-duplicate marks rest on "
            "embeddings that carry no meaning beyond tests"
        )
    notes += [n for n in (since_last_run(emb.counts), gone_note(emb.counts)) if n]
    if result.copy_timed:
        notes.append(
            f"{result.copy_timed} photo(s) without an EXIF time whose file times record a copy, "
            "not a capture: each is a group of its own (its reasons say so)"
        )
    sheet = SheetSummary(
        images=len(result.picks),
        groups=counts["groups"],
        keepers=counts["keepers"],
        alternates=counts["alternates"],
        rejects=counts["rejects"],
        duplicates=counts["duplicates"],
        failed=counts["failed"],
        seconds={k: round(v, 2) for k, v in seconds.items()},
        ranker=result.ranker,
        notes=notes,
        warnings=[f"{lib.lost} input(s) neither picked nor failed"] if lib.lost else [],
    )
    paths, out_seconds, sidecars, exported = write_outputs(cfg, lib, result, sheet)
    picks_sha256 = hashlib.sha256(storage.read_bytes(paths["picks_parquet"])).hexdigest()
    counts["sidecars_failed"] = len(sidecars.failed)
    seconds.update(out_seconds)
    seconds["total"] = time.perf_counter() - t_start
    summary = PickSummary(
        status="ok" if emb.status == "ok" and lib.lost == 0 else "failed",
        input=cfg.input,
        output=cfg.out,
        table=cfg.table,
        ranker=result.ranker,
        zero_shot=ranker is None,
        clip_model=spec,
        random_weights=random_weights,
        counts=counts,
        sidecars=sidecars.counts(),
        sidecar_failures=sidecars.failed,
        keepers_exported=exported.counts if exported else None,
        export_failures=exported.failures if exported else [],
        keeper_copies_not_kept=exported.not_kept if exported else [],
        seconds={k: round(v, 3) for k, v in seconds.items()},
        outputs=paths,
        embed={"run_id": emb.run_id, "status": emb.status, **emb.counts.model_dump(by_alias=True)},
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
        xmp=cfg.xmp,
        xmp_naming=cfg.xmp_naming,
        xmp_root=cfg.input_root(lib.inputs) if cfg.xmp == "mirror" else None,
        picks_sha256=picks_sha256,
    )
    storage.write_bytes(storage.join(cfg.out, SUMMARY), summary.to_json())
    return summary


def format_summary(s: PickSummary) -> str:
    """The one-screen summary printed at the end of a run."""
    c = s.counts
    lines = [
        f"keeper pick  {s.status.upper()}",
        f"  input     {s.input}",
        f"  ranker    {s.ranker}",
        f"  photos    {c['in']} in = {c['picked']} picked + {c['failed']} failed (unreadable, "
        f"listed with reasons)" + (f" + {c['lost']} LOST" if c["lost"] else ""),
        f"  groups    {c['groups']} bursts/scenes: {c['keepers']} keepers, "
        f"{c['alternates']} alternates, {c['rejects']} rejects"
        + (
            f" ({c['copy_timed']} photos timed by a copy's file time: each a group of its own)"
            if c.get("copy_timed")
            else ""
        ),
        f"  dupes     {c['exact_duplicates']} exact, {c['near_duplicates']} near",
        f"  sidecars  {s.sidecars['written']} XMP written, {s.sidecars['unchanged']} unchanged"
        + (
            f" ({s.sidecars['files_written']} written into and {s.sidecars['files_unchanged']} "
            "unchanged in JPEG originals)"
            if "files_written" in s.sidecars
            else ""
        )
        + (
            f", {s.sidecars['skipped']} shared (RAW+JPEG) or skipped"
            if s.sidecars["skipped"]
            else ""
        )
        + (
            f", {s.sidecars['kept_ratings']} kept a person's rating or label "
            "(--overwrite-ratings replaces them)"
            if s.sidecars.get("kept_ratings")
            else ""
        )
        + (
            f", {c['sidecars_failed']} FAILED (sidecar_failures in {SUMMARY})"
            if c.get("sidecars_failed")
            else ""
        )
        + (
            f", {s.sidecars['stale_removed']} stale removed (photos gone since)"
            if s.sidecars.get("stale_removed")
            else ""
        ),
    ]
    lines += [
        f"            {f.sidecar_uri}: {f.reason}" for f in s.sidecar_failures[:SHOWN_FAILURES]
    ]
    if s.keepers_exported is not None:
        e = s.keepers_exported
        lines.append(
            f"  keepers   {e['exported']} exported, {e['already_there']} already there, "
            + (f"{e['updated']} updated, " if e.get("updated") else "")
            + f"{e['failed']} failed -> {s.outputs['keepers']}"
            + (f" (export_failures in {SUMMARY})" if e["failed"] else "")
        )
        lines += [
            f"            {f.image_uri}: {f.reason}" for f in s.export_failures[:SHOWN_FAILURES]
        ]
        if s.keeper_copies_not_kept:
            lines.append(
                f"            {len(s.keeper_copies_not_kept)} copies there of photos no longer "
                f"kept, left in place (keeper_copies_not_kept in {SUMMARY})"
            )
    lines += [
        f"  table     {s.outputs['picks_parquet']} (+ picks.csv, failed.csv)",
        f"  sheet     {s.outputs['contact_sheet']}",
        "  seconds   " + "  ".join(f"{k} {v:.1f}" for k, v in s.seconds.items()),
    ]
    # What went outside OUTPUT (into the library, or a keepers folder) can be taken back.
    keepers = " --keepers" if s.keepers_exported is not None else ""
    if s.xmp in ("beside", "embed") or keepers:
        lines.append(f"  undo      keeper unpick --run {shlex.quote(s.output)}{keepers}")
    if s.zero_shot:
        lines.append("  NOTE      zero-shot rule: no trained ranker was used")
    if s.random_weights:
        lines.append("  NOTE      random CLIP weights: similarities carry no meaning beyond tests")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.pick --config FILE [key=value ...]``."""
    from keeper_train.config import job_main

    return job_main(
        argv,
        job="pick",
        description=__doc__.split("\n")[0],
        model=PickJobConfig,
        run=run,
        describe=format_summary,
        exit_code=lambda s: 0 if s.status == "ok" else embed.EXIT_TOO_MANY_FAILURES,
        example="grouping.max_gap_s=2",
    )


if __name__ == "__main__":
    # Re-import by module name so Ray pickles the stage functions by reference.
    from keeper_train.jobs import pick

    sys.exit(pick.main())
