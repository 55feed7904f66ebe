"""Embed an image corpus with CLIP on Ray Data, resumably.

    python -m keeper_train.jobs.embed --config packages/train/configs/embed.yaml \
        input=s3://bucket/photos/ output=s3://bucket/emb/vit-b-32/ model=ViT-B-32:laion2b_s34b_b79k
    keeper embed --input SRC --output DST --model SPEC [--batch-size N] [--concurrency N]

The same line is the ``ray job submit ... --`` entrypoint and a KubeRay RayJob's entrypoint.

Pipeline (streaming: every stage runs at once, so a GPU model stage is fed while CPUs decode):

    plan      list SRC (folder, s3:// prefix, manifest, or WebDataset shards: each indexed
              once, cached in DST/_shards); read DST's parts once; skip what is
              embedded and the failures another try cannot fix (retryable ones are retried);
              set aside files whose names are not UTF-8 (recorded as bad_name, never read)
    tasks     read bytes -> safe decode -> quality features -> resize to uint8 model input;
              a bad image becomes a row of the errors table, with its stage and reason
    actors    keeper_core.ClipEmbedder: one model load per actor, num_gpus per actor
    tasks     write a Parquet part (atomic, named by a hash of its image URIs)
    summarise read only the parts this run wrote; remove duplicates left by retried tasks and
              the error rows of images a retry embedded; count; write _SUMMARY.json

DST layout: ``embeddings/part-*.parquet``, ``errors/part-*.parquet``, ``_SUMMARY.json``, and
``_KEEPER_TABLE.json`` naming the model spec (another spec into the same DST is refused). A re-run
with the same SRC and DST embeds only images not yet there, so a killed job is resumed by running
it again. Exit codes: 0 done, 2 bad config or input, 3 failed fraction above the limit.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keeper_core import run_lock, storage
from keeper_core.capture import CAPTURE_COLUMNS, capture_row, read_capture
from keeper_core.contact_sheet import thumbnail_jpeg, thumbnail_name
from keeper_core.corpus import EMBEDDINGS
from keeper_core.decoders import DEVICE_DECODERS, resolve_decoder
from keeper_core.embedded_xmp import content_digest, file_ids
from keeper_core.errors import (
    ConfigError,
    DataError,
    ImageDecodeError,
    KeeperError,
    StorageError,
)
from keeper_core.formats import IMAGE_SUFFIXES
from keeper_core.grouping import dhash
from keeper_core.images import DecodeLimits, sniff_is_image
from keeper_core.models import (
    TABLE_META,
    ModelSpec,
    PreprocessConfig,
    actor_memory_request,
    check_table_preprocessing,
    check_weights,
    embed_dim,
    parameter_count,
    preprocess_config,
    preprocess_record,
    spec_field,
    weights_version,
)
from keeper_core.preparation import ImagePreparation
from keeper_core.quality import FEATURE_NAMES
from keeper_core.series import read_csv_strict, resolve_image_uris
from keeper_core.torch_thread import TorchThread, pin_torch_threads
from keeper_core.webdataset import (
    is_webdataset,
    list_shards,
    load_or_index,
    names_shards,
    read_member,
)
from keeper_train.cluster import actor_pool_released, custom_resources
from keeper_train.config import job_main
from keeper_train.table import STAMP_COLUMNS, EmbeddedParts, ErrorRows, in_set

if TYPE_CHECKING:  # torch: the model actors import these; decode and write tasks never do
    import pandas as pd

    from keeper_core.device_preparation import DevicePreparation
    from keeper_core.embedding import ClipEmbedder

log = logging.getLogger("keeper.embed")

ERRORS = "errors"  # beside EMBEDDINGS (keeper_core.corpus: selection reads the table there)
SUMMARY = "_SUMMARY.json"
SHARDS = "_shards"  # cached WebDataset shard indexes (keeper_core.webdataset)
#: Columns a WebDataset corpus carries into the table (null when a sample has none).
SAMPLE_COLUMNS = ("caption", "metadata")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
# Files that are certainly not photos: never sniffed, so listing a mixed prefix stays cheap.
NOT_IMAGE_SUFFIXES = (
    *(".parquet", ".json", ".csv", ".txt", ".md", ".yaml", ".yml", ".xml", ".pq"),
    ".tar",  # WebDataset shards: never sniffed as images (plan reads them as shards)
    # A camera's thumbnail of a video (MVI_0001.THM beside MVI_0001.MOV) or of an old Canon CRW:
    # a JPEG inside, but no photo of its own; culled, it would get a sidecar beside the video.
    ".thm",
)
EXIT_TOO_MANY_FAILURES = 3
#: The reason recorded for an input whose name is not valid UTF-8 (a local file named in Latin-1).
BAD_NAME = "bad_name"
#: The errors table. ``retryable`` failures (a timeout, an unreachable endpoint) are retried by the
#: next run; the others (a corrupt file) only with ``retry_errors``. Tables written before the
#: column existed read as not retryable.
ERRORS_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("error", pa.string()),
        ("retryable", pa.bool_()),
        ("run_id", pa.string()),
        ("at", pa.string()),
        # the file's stamp when it failed: a file changed since is tried again
        *((c, pa.int64()) for c in STAMP_COLUMNS),
    ]
)
#: What the table keeps of the file each row was made from beside its stamp (STAMP_COLUMNS,
#: null for shard members and manifest rows): its content digest (``file_ids``).
CONTENT_ID = "content_id"


def actor_memory(spec: str) -> int:
    """Bytes a model actor asks Ray for: its baseline and the model in fp32, plus the 25 %
    headroom Ray Data's memory check wants over what a worker was seen to use. ViT-B-32: 1.95
    GiB (seen using up to ~1.5 GiB on CPU); keeper-tiny 1.28 GiB; ViT-L-14 3.2 GiB."""
    return actor_memory_request(4 * parameter_count(spec))


#: A decode task's worker before its images: Ray, pyarrow, Pillow and keeper's decode path, no
#: torch (~230 MiB measured; it was ~1.1 GiB with torch: benchmarks/decode_worker.py).
WORKER_BASELINE_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class StageCpus:
    """CPUs a decode task and a model actor reserve; the model's torch threads.

    ``node_threads``: the actor sets its threads to its node's cores divided by the actors
    (``model_threads`` is then None).
    """

    decode: float
    actor: float
    model_threads: int | None
    node_threads: bool


class EmbedConfig(BaseModel):
    """Everything the embed job takes. Unknown keys are errors (a typo fails before any work)."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="folder, s3:// prefix, or CSV/Parquet manifest with image_uri")
    output: str = Field(description="folder or s3:// prefix for the embedding table")
    model: str = "keeper-tiny:random"
    batch_size: int = Field(64, ge=1, description="images per model forward pass")
    concurrency: int = Field(1, ge=1, description="model actors")
    num_gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs per model actor (fractional ok)"
    )
    num_cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs each model actor reserves (default: 1 with GPUs, 0.5 on a CPU-only "
        "run, where its torch threads share the node's cores with decode: see model_threads)",
    )
    model_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads per model actor (default: Ray's, one per reserved "
        "CPU, with GPUs; on a CPU-only run the node's cores divided by the actors)",
    )
    decode_num_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs each decode task reserves (default: 1 with GPUs, 0.5 on a CPU-only "
        "run, so decode can use the cores the model leaves idle)",
    )
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each model actor needs, e.g. {keeper_gpu_node: 1}: "
        "the actors go only to nodes that offer them (a node type), decode tasks go anywhere",
    )
    decode_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each decode task needs (keep decode off a node type)",
    )
    decode_batch_size: int = Field(16, ge=1, description="images per decode task batch")
    decode_concurrency: int | None = Field(None, ge=1, description="max decode tasks at once")
    rows_per_file: int = Field(1024, ge=1, description="rows per Parquet part (resume granularity)")
    max_failure_fraction: float = Field(0.05, ge=0, le=1)
    retry_errors: bool = Field(False, description="re-attempt images already in the errors table")
    draft: bool = Field(True, description="JPEG draft-mode decode for images larger than needed")
    decode: Literal["auto", "cpu", "pil", "turbo", "gpu", "nvimgcodec"] = Field(
        "auto",
        description="JPEG decode backend (keeper_core.decoders): auto = cpu = the fastest CPU "
        "backend here (PIL with libjpeg-turbo, measured); turbo = simplejpeg; gpu = nvJPEG "
        "through torchvision, nvimgcodec = NVIDIA nvImageCodec (the GPU's hardware JPEG decoder "
        "where it has one), both on the model actors' GPUs",
    )
    decode_placement: Literal["auto", "tasks", "actor"] = Field(
        "auto",
        description="where images are read and decoded: tasks = CPU tasks that feed the model "
        "actors (decode capacity scales with the cluster's CPUs); actor = inside each model "
        "actor, overlapped with its forward passes (no decoded pixels cross the object store; "
        "decode=gpu and decode=nvimgcodec decode there); auto = actor for those, else tasks",
    )
    actor_decode_calls: int = Field(
        1,
        ge=1,
        description="decode_placement=actor: batches an actor decodes while it embeds another",
    )
    max_pixels: int = Field(64_000_000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_raw_bytes: int = Field(
        256 * 1024**2,
        ge=1,
        description="byte limit for camera RAW files (their JPEG preview is read)",
    )
    max_jpeg_scans: int = Field(
        256, ge=1, description="scans in one JPEG (encoders write ~10; each is a full pass)"
    )
    min_side: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1, description="embed only the first N inputs (smoke runs)")
    capture: bool = Field(
        True,
        description="read capture metadata (EXIF capture time, camera body, burst tags; the "
        "file's modification time when EXIF has no time) into the table",
    )
    thumbnails: str | None = Field(
        None,
        description="also write a JPEG thumbnail of every image under this folder or s3:// "
        "prefix (named by image_id), from the pixels already decoded (keeper pick's contact "
        "sheet links them)",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="folders or prefixes under input that are never listed (outputs written "
        "inside the input folder); output is always excluded",
    )
    prune: bool = Field(
        False,
        description="remove the table's rows (embedded or failed) of files under input that "
        "this run finds neither under their name nor moved (deleted, or on a disk not mounted; "
        "a moved photo's row moves with it either way). Input must be a folder or prefix. "
        "None is removed when they are more than max_prune_fraction of input's rows: the run "
        "stops and names the folders (a disk not mounted lists like one emptied)",
    )
    max_prune_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="prune: the largest share of input's rows a run removes for files not found "
        "under a new name (1: no limit)",
    )
    find_copies: bool = Field(
        True,
        description="look for copies (of photos the table holds, and among this run's new "
        "files) and embed each content once: a new file whose size at most a few others share "
        "has its last 16 KB read in the driver (32 at once), and is read whole only when that "
        "matches. False for a corpus known to hold none: a first run over a million camera "
        "JPEGs reads 1 in 12 to 1 in 6 files' ends (on S3, a request each). Moved photos are "
        "found either way",
    )
    ray_address: str | None = None

    @property
    def cpu_only(self) -> bool:
        """No GPU per model actor: model and decode share the same cores."""
        return self.num_gpus_per_worker == 0

    def stage_cpus(self) -> StageCpus:
        """What each stage reserves and the model's threads, the defaults resolved.

        On a CPU-only run an actor's forward is multi-threaded while a decode task is one
        Python thread that waits on reads: reserving a whole CPU for each (Ray's default)
        runs one decode task beside one single-threaded model on two cores and leaves the
        write stage no CPU until decoding ends (docs/benchmarks.md). So the CPU-only defaults
        reserve half a CPU for each, let the model use every core (``model_threads=None``
        here: the actor counts its node's cores), and the write stage reserves none.
        """
        gpu_default = 0.5 if self.cpu_only else 1.0
        return StageCpus(
            decode=self.decode_num_cpus if self.decode_num_cpus is not None else gpu_default,
            actor=self.num_cpus_per_worker if self.num_cpus_per_worker is not None else gpu_default,
            model_threads=self.model_threads,
            node_threads=self.cpu_only and self.model_threads is None,
        )

    @field_validator("actor_resources", "decode_resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v, "num_cpus_per_worker, num_gpus_per_worker or decode_num_cpus")

    @field_validator("model")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return spec_field(v)

    @field_validator("decode")
    @classmethod
    def _decoder_here(cls, v: str) -> str:
        if v in DEVICE_DECODERS:
            return v  # checked against the rest of the config below; CUDA by the actors
        try:
            resolve_decoder(v)  # turbo without simplejpeg fails here, not in every task
        except ConfigError as e:
            raise ValueError(str(e)) from e
        return v

    @model_validator(mode="after")
    def _gpu_decode_fits(self) -> EmbedConfig:
        if self.decode not in DEVICE_DECODERS:
            return self
        if self.cpu_only:
            raise ValueError(
                f"decode={self.decode} decodes on the model actors' GPUs, and this run gives "
                "them none: set num_gpus_per_worker (or use decode=auto, the CPU decode tasks)"
            )
        if self.decode_placement == "tasks":
            raise ValueError(
                f"decode={self.decode} decodes inside the model actors: decode_placement must "
                "be actor (or auto), not tasks"
            )
        if self.thumbnails:
            raise ValueError(
                "thumbnails are written from images decoded on the CPU: use decode=auto with "
                f"thumbnails (decode={self.decode} keeps its pixels on the device)"
            )
        return self

    @property
    def placement(self) -> Literal["tasks", "actor"]:
        """decode_placement with auto resolved: the actor for GPU decode, else CPU tasks."""
        if self.decode_placement != "auto":
            return self.decode_placement
        return "actor" if self.decode in DEVICE_DECODERS else "tasks"

    @field_validator("input", "output")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return storage.utf8_path(v.strip())

    @field_validator("thumbnails")
    @classmethod
    def _thumbnails_utf8(cls, v: str | None) -> str | None:
        return None if v is None else storage.utf8_path(v)

    @field_validator("exclude")
    @classmethod
    def _exclude_utf8(cls, v: list[str]) -> list[str]:
        return [storage.utf8_path(e) for e in v]


# --------------------------------------------------------------------------------------------
# Inputs and what DST already holds


def list_inputs(src: str, *, exclude: str | Sequence[str] | None = None) -> tuple[list[str], int]:
    """The image URIs named by SRC, in a stable order, and the count of non-image files ignored.

    SRC is a manifest (CSV/Parquet with an ``image_uri`` column; relative local paths resolve
    against the manifest's folder) or a folder/prefix listed recursively. In a listing, files with
    an image extension are taken as images (a corrupt one then fails decoding, with a reason);
    files with another extension are taken when their first bytes are an image signature. An
    image whose name is not valid UTF-8 is listed escaped (:func:`find_inputs`).
    """
    found = find_inputs(src, exclude=exclude)
    return found.uris, found.ignored


def scan_inputs(
    src: str, *, exclude: str | Sequence[str] | None = None
) -> tuple[list[str], int, int]:
    """``list_inputs``, and the count of manifest rows naming an image an earlier row named.

    Rows are the same image when their URIs name one file (``storage.same_key``: ``a.jpg``,
    ``/abs/a.jpg`` and ``file:///abs/a.jpg`` beside the manifest): it is embedded once, under
    its first row's spelling, and the other rows are counted, not silently dropped.
    """
    found = find_inputs(src, exclude=exclude)
    return found.uris, found.ignored, found.repeated


@dataclass(frozen=True)
class Inputs:
    """The images SRC names, in a stable order, and what was set aside on the way."""

    uris: list[str]
    ignored: int = 0  # files that are not images
    repeated: int = 0  # manifest rows naming an image an earlier row named
    #: images whose path is not valid UTF-8, under their escaped URI (also in ``uris``) -> why
    bad_names: dict[str, str] = dataclass_field(default_factory=dict)
    #: a listed folder's images -> their size and mtime (a manifest's rows: none)
    stamps: dict[str, storage.Stamp] = dataclass_field(default_factory=dict)


def find_inputs(src: str, *, exclude: str | Sequence[str] | None = None) -> Inputs:
    """What ``list_inputs`` and ``scan_inputs`` read, with the names that are not UTF-8.

    Such an image (a local file named in Latin-1, listed with surrogate escapes) stays an input,
    under its name with those bytes escaped (``caf\\xe9.jpg``: :func:`set_aside_bad_names`), so
    it is counted and recorded as failed (``bad_name``) instead of failing every writer of a
    string column. Files that are not images are ignored whatever their names.
    """
    uris, ignored, repeated, stamps = _scan(src, exclude)
    checked, bad = set_aside_bad_names(uris)
    return Inputs(checked, ignored, repeated, bad, stamps)


def set_aside_bad_names(uris: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``uris`` with each that is not valid UTF-8 replaced by its escaped form, and those -> why.

    The escaped form (``storage.escape_name``) is what the errors table, failed.csv and the
    contact sheet record: every writer takes it. It names no file, and is never read. Order is
    kept; a URI listed twice is listed once.
    """
    out: dict[str, None] = {}
    bad: dict[str, str] = {}
    for uri in uris:
        if storage.valid_utf8(uri):
            out[uri] = None
            continue
        shown = storage.escape_name(uri)
        out[shown] = None
        bad[shown] = bad_name_error(shown)
    return list(out), bad


def bad_name_error(shown: str) -> str:
    """The error recorded for an input whose path (``shown`` escaped) is not valid UTF-8."""
    return (
        f"file path is not valid UTF-8: {shown} (bytes that are not UTF-8 shown as \\xNN); "
        "keeper's tables, CSV and sidecars hold UTF-8 only, so it was not read: rename it "
        "(e.g. convmv -f latin1 -t utf8 --notest FILE, for a Latin-1 name) and run again"
    )


def _scan(
    src: str, exclude: str | Sequence[str] | None
) -> tuple[list[str], int, int, dict[str, storage.Stamp]]:
    if src.lower().endswith(MANIFEST_SUFFIXES):
        uris, repeated = _manifest_uris(src)
        return uris, 0, repeated, {}
    ignored = 0
    uris = []
    stamps: dict[str, storage.Stamp] = {}
    excluded = [exclude] if isinstance(exclude, str) else list(exclude or [])
    # Compared as same_key: an output named ./lib/out or /abs/lib/out is skipped either way.
    skip = folder_keys(excluded)
    base = len(src.rstrip("/")) + 1
    for uri, stamp in storage.list_stamped(src):
        if skip and storage.same_key(uri).startswith(skip):
            continue
        name = uri.rsplit("/", 1)[-1].lower()
        if name.startswith(".") or not_a_library_folder(uri[base:]):
            is_image = False  # hidden files: editor/OS droppings, never photos
        elif name.endswith(IMAGE_SUFFIXES):
            is_image = True
        elif name.endswith(NOT_IMAGE_SUFFIXES):
            is_image = False
        else:
            try:
                is_image = sniff_is_image(storage.read_head(uri, 32))
            except StorageError:
                # Unreadable now (permissions, deleted, an archived S3 object): taken as an
                # input, so its read fails and is recorded with the reason, not lost here.
                is_image = True
        if is_image:
            uris.append(uri)
            stamps[uri] = stamp
        else:
            ignored += 1
    return uris, ignored, 0, stamps


#: Folders a NAS, an OS or a photo tool keeps beside a library, whose images are no photos of it:
#: a Synology's thumbnails of every photo (``@eaDir/IMG_1.JPG/SYNOPHOTO_THUMB_XL.jpg``) and its
#: recycle bin, Windows' recycle bin and volume information (lower case: compared so).
NOT_LIBRARY_FOLDERS = frozenset(
    {"@eadir", "#recycle", "#snapshot", "$recycle.bin", "system volume information"}
)


def not_a_library_folder(relative: str) -> bool:
    """Whether a file at ``relative`` (its path under the input) lies in a hidden folder (a
    ``.Trash-1000``, a ``.thumbnails``) or one of ``NOT_LIBRARY_FOLDERS``."""
    folders = relative.split("/")[:-1]
    return any(f.startswith(".") or f.lower() in NOT_LIBRARY_FOLDERS for f in folders)


def folder_keys(folders: Sequence[str]) -> tuple[str, ...]:
    """What a ``same_key`` under each of ``folders`` starts with (its own key and a slash)."""
    return tuple(storage.same_key(f).rstrip("/") + "/" for f in folders)


def _manifest_uris(src: str) -> tuple[list[str], int]:
    """The manifest's image URIs, each file once, and the count of rows that repeated one."""
    import pandas as pd

    raw = storage.read_bytes(src)
    try:
        if src.lower().endswith(".csv"):
            df = read_csv_strict(raw, source=src, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(io.BytesIO(raw))
    except DataError:
        raise
    except Exception as e:  # pandas raises many parser error types; all mean "not a manifest"
        raise DataError(f"cannot read manifest: {e}", source=src) from e
    if "image_uri" not in df.columns:
        raise DataError(f"manifest has no image_uri column (has {list(df.columns)})", source=src)
    try:
        col = df["image_uri"].fillna("").astype(str).str.strip()
    except UnicodeDecodeError as e:  # a binary column of paths in another encoding
        raise DataError(
            f"image_uri holds a path that is not valid UTF-8 ({e}): a manifest names its images "
            "in UTF-8 (CSV and Parquet strings hold nothing else); rename the files (e.g. convmv "
            "-f latin1 -t utf8 --notest) and write the manifest again",
            source=src,
        ) from e
    bad = [i for i, v in enumerate(col) if not v or v.lower() in ("nan", "none")]
    if bad:
        raise DataError(f"empty image_uri in rows {bad[:10]}", source=src, rows=bad)
    resolved = resolve_image_uris(pd.DataFrame({"image_uri": col}), src)["image_uri"]
    first: dict[str, str] = {}
    for uri in resolved:
        first.setdefault(storage.same_key(uri), uri)
    return list(first.values()), len(resolved) - len(first)


#: What the table record says of how its rows were prepared, and what each record's change did
#: that the record before it did not: decoded to sRGB from the colour space a photo names
#: (keeper_core.color): an ICC profile or HEIF nclx box ("srgb", 2026-12-04), a camera's EXIF
#: mark for Adobe RGB ("srgb/2", 2026-12-05), a CMYK profile and a RAW file's own colour space
#: ("srgb/3", 2026-12-05); measured a photo with transparency's quality features where it is
#: opaque ("srgb/4", 2026-12-05: its pixels are as before). Tables recorded before colour
#: management have no entry.
_COLOR_CHANGES = (
    (
        "srgb",
        "converted photos tagged with another colour space (Display P3, Adobe RGB: an ICC "
        "profile or HEIF nclx box) to sRGB",
    ),
    (
        "srgb/2",
        "converted untagged camera JPEGs whose EXIF says Adobe RGB (ColorSpace uncalibrated, "
        "interoperability index R03) to sRGB",
    ),
    (
        "srgb/3",
        "converted CMYK photos with an embedded CMYK profile (read with PIL's CMYK formula), and "
        "RAW files whose preview names no colour space while the RAW's own metadata does (Adobe "
        "RGB in its EXIF or a Nikon or Canon maker note, a DNG's PreviewColorSpace), to sRGB",
    ),
    (
        "srgb/4",
        "measured the quality features of photos with transparency (PNG, WebP or TIFF cut-outs) "
        "over their opaque pixels, no longer counting the transparent area as white highlights",
    ),
)
COLOR_RECORD = _COLOR_CHANGES[-1][0]


def _unconverted(record: object) -> str:
    """What a table of ``record`` holds prepared the older way: every change after it (all of
    them for no record, or one this keeper does not know)."""
    names = [name for name, _ in _COLOR_CHANGES]
    start = names.index(record) + 1 if record in names else 0
    return "; and ".join(what for _, what in _COLOR_CHANGES[start:])


def check_table_meta(
    dst: str, spec: str, embed_dim: int, *, record: bool = True, weights: str | None = None
) -> None:
    """Refuse to mix model specs, or one spec's changed weights, in one DST; record the spec and
    the weights' version (``weights``: ``keeper_core.models.weights_version``) on first use.

    ``plan`` checks first (``record=False``, before any work) and records the spec only once the
    inputs are listed and there is something to embed, so a run that fails on its input leaves
    no record naming a spec the table does not hold. A record without a weights version (an older
    table, a checkpoint the driver could not see) is checked by its spec alone.

    Raises:
        DataError: DST holds embeddings of another spec, or of the same spec's checkpoint before
            it was replaced, or its record is not readable JSON.
    """
    meta_uri = storage.join(dst, TABLE_META)
    if storage.exists(meta_uri):
        try:
            meta = json.loads(storage.read_bytes(meta_uri))
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            meta = e
        if not isinstance(meta, dict):
            why = f"not valid JSON ({meta})" if isinstance(meta, ValueError) else "not a mapping"
            raise DataError(
                f"{meta_uri} is {why}: it records the model spec of the embeddings in {dst}; "
                f"restore it, or remove it if {dst} holds no embeddings of another spec"
            )
        if meta.get("model_spec") != spec:
            raise DataError(
                f"{dst} holds embeddings of {meta.get('model_spec')!r}; this run uses {spec!r}. "
                "Embeddings of two specs never mix: choose another output."
            )
        if weights:
            check_weights(spec, meta.get("weights_version"), dst, now=weights)
        check_table_preprocessing(spec, meta.get("preprocess"), dst)
        if record and meta.get("color") != COLOR_RECORD:
            what = _unconverted(meta.get("color"))
            log.warning(
                "%s was started before keeper %s; its rows for such photos were prepared without "
                "that, new rows with it. Re-embed into a new output to have every row prepared "
                "alike.",
                dst,
                what,
            )
        return
    if not record:
        return
    meta = {
        "model_spec": spec,
        "embed_dim": embed_dim,
        "format": 1,
        "color": COLOR_RECORD,
        "preprocess": preprocess_record(spec),
        "created": _now(),
    }
    if weights:
        meta["weights_version"] = weights
    storage.write_bytes(meta_uri, json.dumps(meta, indent=2).encode())


def _now(timespec: str = "seconds") -> str:
    return datetime.now(UTC).isoformat(timespec=timespec)


def _part_name(uris: Sequence[str]) -> str:
    # Deterministic: a retried task that sees the same rows overwrites its own part.
    digest = hashlib.sha256("\n".join(sorted(uris)).encode()).hexdigest()[:32]
    return f"part-{digest}.parquet"


# --------------------------------------------------------------------------------------------
# The stages (plain functions and callable classes: Ray Data runs them, tests can too)


@cache
def _preparation(
    spec: str,
    draft: bool,
    limits: tuple[tuple[str, int], ...],
    decode: str = "auto",
    preprocess: PreprocessConfig | None = None,
) -> ImagePreparation:
    # Decode tasks run on CPUs: "auto" is never the GPU here (device=None). With the driver's
    # preprocess config, neither torch nor open_clip is imported in this process.
    return ImagePreparation(
        spec,
        limits=DecodeLimits(**dict(limits)),
        draft=draft,
        decoder=resolve_decoder(decode),
        preprocess=preprocess,
    )


def node_id() -> str:
    """The Ray node this code runs on ("local" outside Ray): where each image was handled."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def prepare_batch(
    batch: dict[str, np.ndarray],
    *,
    spec: str,
    limits: dict[str, int],
    draft: bool,
    errors_dir: str,
    run_id: str,
    capture: bool = False,
    thumbnails: str | None = None,
    decode: str = "auto",
    preprocess: PreprocessConfig | None = None,
) -> dict[str, np.ndarray]:
    """Read, decode, measure and resize a batch of image URIs (a CPU task).

    keeper_core's ImagePreparation does the image work (the Serve ingress calls the same). Bad
    images are written to ``errors_dir`` with their stage and reason, and left out of the
    output: the model stage only sees images that decoded. With ``capture``, each image's
    capture metadata is read from the bytes already in hand; with ``thumbnails``, a thumbnail
    is written from the pixels already decoded (neither reads or decodes the file again).
    ``preprocess`` (``preprocess_config(spec)``, computed by the driver) keeps torch and
    open_clip out of the task's process: ~2.5 s and ~0.7 GiB a worker (docs/benchmarks.md).
    """
    prep = _preparation(spec, draft, tuple(sorted(limits.items())), decode, preprocess)
    offsets, sizes = _members(batch)
    carried: dict[str, list[str]] = {c: [] for c in SAMPLE_COLUMNS if c in batch}
    ok_uris, ids, contents, pixels, decoded, times = [], [], [], [], [], []
    rows: list[int] = []
    captures: list[dict[str, Any]] = []
    hashes: list[int] = []
    failed: list[dict[str, Any]] = []
    for i, uri in enumerate(str(u) for u in batch["image_uri"]):
        t0 = time.perf_counter()
        stage = "read"
        member = bool(offsets[i] >= 0)
        try:
            data = _read(
                uri,
                int(offsets[i]),
                int(sizes[i]),
                limits["max_bytes"],
                limits.get("max_raw_bytes", 0),
            )
            stage = "decode"
            image = prep.decode(data, source=uri)
            stage = "preprocess"
            # Each image's results are kept apart until it has passed every step: one that
            # fails after some (a thumbnail that cannot be written) must leave no pixels, hash
            # or capture row behind, or every later image of the batch takes its neighbour's.
            resized = prep.resize(image)
            image_id, content_id = file_ids(data, uri)
            image_hash = dhash(image.image)
            if capture:
                mtime = _no_mtime if member else file_mtime(uri)
                captured = capture_row(read_capture(data, mtime=mtime, source=uri))
            if thumbnails:
                stage = "thumbnail"
                write_thumbnail(thumbnails, image_id, image.image)
        except StorageError as e:
            reason = "unreadable" if stage == "read" else "write_failed"
            failed.append(_failure(uri, run_id, stage, reason, e, retryable=e.retryable))
        except ImageDecodeError as e:
            failed.append(_failure(uri, run_id, stage, e.reason, e, retryable=False))
        except DataError as e:  # a member past the end of its shard (a shard cut short)
            failed.append(_failure(uri, run_id, stage, "unreadable", e, retryable=False))
        except Exception as e:  # one image must never take the job down: record and go on
            failed.append(_failure(uri, run_id, stage, "internal", e, retryable=False))
        else:
            ok_uris.append(uri)
            ids.append(image_id)
            contents.append(content_id)
            rows.append(i)
            decoded.append(image)
            pixels.append(resized)
            hashes.append(image_hash)
            if capture:
                captures.append(captured)
            times.append(time.perf_counter() - t0)
            for c, values in carried.items():
                values.append(str(batch[c][i]))
    write_errors(errors_dir, failed, stamps=batch)
    t0 = time.perf_counter()
    feats = prep.quality(decoded)
    per_image = (time.perf_counter() - t0) / max(len(decoded), 1)
    out: dict[str, np.ndarray] = {
        "image_uri": np.array(ok_uris, dtype=object),
        "image_id": np.array(ids, dtype=object),
        CONTENT_ID: np.array(contents, dtype=object),
        **_stamps(batch, rows),
        "pixel_values": np.stack(pixels)
        if pixels
        else np.zeros((0, 3, prep.image_size, prep.image_size), np.uint8),
        "t_decode": np.array(times, dtype=np.float64) + per_image,
        "dhash": np.array(hashes, dtype=np.int64),
        "decode_node": np.array([node_id()] * len(ok_uris), dtype=object),
    }
    for j, name in enumerate(FEATURE_NAMES):
        dtype = np.int32 if name in ("width", "height") else np.float32
        out[name] = feats[:, j].astype(dtype)
    if capture:
        out.update(capture_arrays(captures))
    for c, values in carried.items():
        out[c] = np.array(values, dtype=object)  # "" for none: embedding_table writes null
    return out


def prepare_arguments(cfg: EmbedConfig, dst: str, run_id: str) -> dict[str, Any]:
    """``prepare_batch``'s keyword arguments for a run of ``cfg`` into ``dst``.

    What the decode stage of every placement is given (tasks, the model actors, and the
    hand-written loop that ``benchmarks/embed.py`` measures the job against).
    """
    limits = {
        "max_pixels": cfg.max_pixels,
        "max_bytes": cfg.max_bytes,
        "max_raw_bytes": cfg.max_raw_bytes,
        "max_jpeg_scans": cfg.max_jpeg_scans,
        "min_side": cfg.min_side,
    }
    return {
        "spec": cfg.model,
        "limits": limits,
        "draft": cfg.draft,
        "errors_dir": storage.join(dst, ERRORS),
        "run_id": run_id,
        "capture": cfg.capture,
        "thumbnails": cfg.thumbnails,
        "decode": cfg.decode,
        "preprocess": preprocess_config(cfg.model),  # open_clip's configs, read here once
    }


def _members(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Where each WebDataset member lies in its shard: (offsets, sizes); -1 for plain files."""
    n = len(batch["image_uri"])
    offsets = np.asarray(batch["offset"], np.int64) if "offset" in batch else np.full(n, -1)
    sizes = np.asarray(batch["size"], np.int64) if "size" in batch else np.full(n, -1)
    return offsets, sizes


def _read(uri: str, offset: int, size: int, max_bytes: int, max_raw_bytes: int = 0) -> bytes:
    """One image's bytes: a shard member (at most ``max_bytes``) or a whole file.

    A file is read at most up to the larger of ``max_bytes`` and ``max_raw_bytes`` (no file
    over both can decode), so a huge one is refused as ``too_large`` without being held in
    memory whole: the decode tasks' memory is reserved for that much, not for any file.
    """
    if offset >= 0:
        return read_member(uri, offset, size, max_bytes=max_bytes)
    cap = max(max_bytes, max_raw_bytes)
    try:
        return storage.read_bytes(uri, max_bytes=cap)
    except storage.TooLargeError as e:
        size_txt = f"{e.size} bytes" if e.size is not None else f"more than {cap} bytes"
        raise ImageDecodeError("too_large", f"{size_txt} > limit {cap}", source=uri) from e


def _read_failure(uri: str, run_id: str, e: Exception) -> dict[str, Any]:
    if isinstance(e, StorageError):
        return _failure(uri, run_id, "read", "unreadable", e, retryable=e.retryable)
    if isinstance(e, DataError):  # a member past the end of its shard (a shard cut short)
        return _failure(uri, run_id, "read", "unreadable", e, retryable=False)
    if isinstance(e, ImageDecodeError):  # too_large: refused before (or instead of) the read
        return _failure(uri, run_id, "read", e.reason, e, retryable=False)
    return _failure(uri, run_id, "read", "internal", e, retryable=False)


def prepare_on_device(
    batch: dict[str, np.ndarray],
    *,
    prep: DevicePreparation,
    max_bytes: int,
    errors_dir: str,
    run_id: str,
    capture: bool = False,
    reader: ThreadPoolExecutor | None = None,
    max_raw_bytes: int = 0,
) -> dict[str, Any]:
    """``prepare_batch``'s output, decoded and measured on the model's device (decode=gpu).

    Bytes are read on ``reader``'s threads (I/O), the batch is decoded at once by
    ``prep``'s decoder (nvJPEG), resized and measured there (keeper_core.device_preparation);
    ``pixel_values`` stays on the device for the model. Capture metadata is read from the
    bytes on the CPU. Bad images are written to ``errors_dir`` as in ``prepare_batch``.
    """
    t0 = time.perf_counter()
    uris = [str(u) for u in batch["image_uri"]]
    offsets, sizes = _members(batch)

    def read(i: int) -> bytes | Exception:
        try:
            return _read(uris[i], int(offsets[i]), int(sizes[i]), max_bytes, max_raw_bytes)
        except Exception as e:  # recorded below, per image
            return e

    blobs = list(reader.map(read, range(len(uris))) if reader else map(read, range(len(uris))))
    failed = [
        _read_failure(uris[i], run_id, b) for i, b in enumerate(blobs) if not isinstance(b, bytes)
    ]
    read_ok = [i for i, b in enumerate(blobs) if isinstance(b, bytes)]
    done = prep.prepare([(blobs[i], uris[i]) for i in read_ok])  # type: ignore[misc]
    for j, e in done.errors:
        failed.append(_failure(uris[read_ok[j]], run_id, "decode", e.reason, e, retryable=False))
    write_errors(errors_dir, failed, stamps=batch)
    rows = [read_ok[j] for j in done.ok]
    data = [blobs[i] for i in rows]
    ids = [file_ids(d, uris[i]) for i, d in zip(rows, data, strict=True)]  # type: ignore[arg-type]
    per_image = (time.perf_counter() - t0) / max(len(rows), 1)
    feats = done.features.float().cpu().numpy()
    feats[:, FEATURE_NAMES.index("width")] = done.width
    feats[:, FEATURE_NAMES.index("height")] = done.height
    out: dict[str, Any] = {
        "image_uri": np.array([uris[i] for i in rows], dtype=object),
        "image_id": np.array([i for i, _ in ids], dtype=object),
        CONTENT_ID: np.array([c for _, c in ids], dtype=object),
        **_stamps(batch, rows),
        "pixel_values": done.pixels,
        "t_decode": np.full(len(rows), per_image),
        "dhash": np.array(done.dhash, dtype=np.int64),
        "decode_node": np.array([node_id()] * len(rows), dtype=object),
    }
    for j, name in enumerate(FEATURE_NAMES):
        out[name] = feats[:, j].astype(np.int32 if name in ("width", "height") else np.float32)
    if capture:
        out.update(
            capture_arrays(
                [
                    capture_row(
                        read_capture(
                            d,  # type: ignore[arg-type]
                            mtime=_no_mtime if offsets[i] >= 0 else file_mtime(uris[i]),
                            source=uris[i],
                        )
                    )
                    for i, d in zip(rows, data, strict=True)
                ]
            )
        )
    for c in SAMPLE_COLUMNS:
        if c in batch:
            out[c] = np.array([str(batch[c][i]) for i in rows], dtype=object)
    return out


def _stamps(batch: dict[str, np.ndarray], rows: Sequence[int]) -> dict[str, np.ndarray]:
    """The listed stamps of ``batch``'s ``rows`` (-1: none), for the table."""
    return {
        c: np.asarray(batch[c], np.int64)[list(rows)]
        if c in batch
        else np.full(len(rows), -1, np.int64)
        for c in STAMP_COLUMNS
    }


def write_errors(
    errors_dir: str, rows: list[dict[str, Any]], *, stamps: dict[str, np.ndarray] | None = None
) -> str | None:
    """Failure rows (``_failure``'s) as one part of the errors table; nothing when none. With
    ``stamps`` (the input batch), each row gets its file's listed stamp. Returns the part written
    (named by its URIs: it replaces a part of the same URIs, an earlier attempt's)."""
    if rows and stamps is not None and STAMP_COLUMNS[0] in stamps:
        at = {str(u): i for i, u in enumerate(stamps["image_uri"])}
        for r in rows:
            i = at.get(r["image_uri"])
            for c in STAMP_COLUMNS:
                v = int(stamps[c][i]) if i is not None else -1
                r[c] = v if v >= 0 else None
    if not rows:
        return None
    table = pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
    part = storage.join(errors_dir, _part_name(table["image_uri"].to_pylist()))
    storage.write_parquet(table, part)
    return part


def _no_mtime() -> float | None:
    return None  # a shard member's tar mtime is not indexed; the shard's is not the photo's


def write_thumbnail(folder: str, image_id: str, image: Image.Image) -> None:
    """The contact sheet's thumbnail of one decoded image, under ``folder``, named by its id."""
    storage.write_bytes(
        storage.join(folder, thumbnail_name(image_id)),
        thumbnail_jpeg(image),
        durable=False,  # a cache: only a machine crash could leave it empty
    )


def file_mtime(uri: str) -> Callable[[], float | None]:
    """The file's modification time, asked for only when EXIF has no capture time (S3: a HEAD)."""

    def get() -> float | None:
        try:
            return storage.object_info(uri).mtime
        except StorageError:
            return None

    return get


def capture_arrays(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Capture rows as numpy columns that cross Ray Data's batches intact.

    Missing strings travel as "" and a missing sequence number as NaN (object arrays of
    None would become pickled Python objects in Arrow); ``embedding_table`` restores nulls.
    """
    out: dict[str, np.ndarray] = {}
    for name, dtype in CAPTURE_COLUMNS.items():
        values = [r[name] for r in rows]
        if pa.types.is_string(dtype):
            out[name] = np.array(["" if v is None else str(v) for v in values], dtype=object)
        else:
            out[name] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return out


def _failure(
    uri: str, run_id: str, stage: str, reason: str, e: Exception, *, retryable: bool
) -> dict[str, Any]:
    error = str(e) if isinstance(e, KeeperError) else f"{type(e).__name__}: {e}"
    return {
        "image_uri": uri,
        "stage": stage,
        "reason": reason,
        "error": error,
        "retryable": retryable,
        "run_id": run_id,
        # to the microsecond: the errors table keeps a URI's latest attempt by it, and two
        # attempts within one second (a killed run's, then the next run's) must not tie
        "at": _now("microseconds"),
    }


def node_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class PipelineError(RuntimeError):
    """The embed pipeline stopped: a stage raised (one bad image never does; it is recorded).

    The message is the stage's error, Ray's remote traceback included. Parts written before the
    error stay, and a re-run embeds only what they lack.
    """


class EmbedStage:
    """The actor-pool stage: keeper_core.ClipEmbedder, timed.

    With ``prepare`` (decode_placement=actor) a batch arrives as input items and is read,
    decoded and measured here by ``prepare_batch`` (its keyword arguments), then embedded.
    Ray Data runs ``decode_calls + 1`` calls of one actor at once, so batches are decoded while
    another is embedded. The model is built and every forward runs on one thread of the actor
    (``keeper_core.torch_thread``), one at a time: the model's threads are not split between two
    batches, and OpenMP keeps one team of threads (a model built on one thread and run on others
    took a batch-1 ViT-B-32 forward from 70 to 112 ms on 2 cores).
    """

    def __init__(
        self,
        spec: str,
        batch_size: int,
        threads: int | None = None,
        node_actors: int = 0,
        prepare: dict[str, Any] | None = None,
    ) -> None:
        if node_actors:  # a CPU-only run: share this node's cores among the actors
            threads = max(1, node_cores() // node_actors)
        self.threads = threads
        self.node = node_id()
        self.prepare = prepare
        self.torch_thread = TorchThread("embed")
        self.embedder = self.torch_thread.call(_load_embedder, spec, batch_size, threads)
        self.on_device: DevicePreparation | None = None
        if prepare is not None and prepare.get("decode") in DEVICE_DECODERS:
            from keeper_core.device_preparation import DevicePreparation

            device = str(self.embedder.clip.device)
            if self.embedder.clip.device.type != "cuda":
                raise ConfigError(
                    f"decode={prepare['decode']}: this model actor sees no CUDA device (its model is on "
                    f"{device}); GPU decode needs actors on GPU nodes (num_gpus_per_worker)"
                )
            self.on_device = DevicePreparation(
                spec,
                device=device,
                limits=DecodeLimits(**prepare["limits"]),
                draft=prepare["draft"],
                decoder=resolve_decoder(prepare["decode"], device=device),
            )
            self._reader = ThreadPoolExecutor(max_workers=16, thread_name_prefix="read")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.on_device is not None and self.prepare is not None:
            batch = prepare_on_device(
                batch,
                prep=self.on_device,
                max_bytes=self.prepare["limits"]["max_bytes"],
                max_raw_bytes=self.prepare["limits"]["max_raw_bytes"],
                errors_dir=self.prepare["errors_dir"],
                run_id=self.prepare["run_id"],
                capture=self.prepare["capture"],
                reader=self._reader,
            )
        elif self.prepare is not None:
            batch = prepare_batch(batch, **self.prepare)
        n = len(batch["image_uri"])
        out, t_embed = self.torch_thread.call(self._embed, batch)
        out.pop("pixel_values", None)
        out["t_embed"] = np.full(n, t_embed / max(n, 1))
        out["embed_node"] = np.array([self.node] * n, dtype=object)
        return out

    def _embed(self, batch: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """On the torch thread: the batch embedded, and the seconds the forward took."""
        t0 = time.perf_counter()
        if not len(batch["image_uri"]):
            return {**batch, "embedding": np.zeros((0, 1), np.float32)}, 0.0
        out = self.embedder(batch)
        return out, time.perf_counter() - t0


def _load_embedder(spec: str, batch_size: int, threads: int | None) -> ClipEmbedder:
    if threads:
        # Ray pins a CPU actor's torch to max(1, floor(num_cpus)) threads (OMP_NUM_THREADS).
        pin_torch_threads(threads)
    from keeper_core.embedding import ClipEmbedder

    return ClipEmbedder(spec, batch_size=batch_size)


def embedding_table(batch: dict[str, np.ndarray], spec: str) -> pa.Table:
    """A batch as the embedding table's Arrow schema (embedding: fixed_size_list<float32>)."""
    emb = np.ascontiguousarray(batch["embedding"], dtype=np.float32)
    n, dim = emb.shape
    cols: dict[str, pa.Array] = {
        "image_id": pa.array([str(x) for x in batch["image_id"]], pa.string()),
        "image_uri": pa.array([str(x) for x in batch["image_uri"]], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
        "model_spec": pa.array([spec] * n, pa.string()),
    }
    for name in FEATURE_NAMES:
        dtype = pa.int32() if name in ("width", "height") else pa.float32()
        cols[name] = pa.array(np.asarray(batch[name]), dtype)
    if "dhash" in batch:  # absent from tables written before keeper pick (read as null)
        cols["dhash"] = pa.array(np.asarray(batch["dhash"], dtype=np.int64), pa.int64())
    if CONTENT_ID in batch:
        cols[CONTENT_ID] = pa.array([str(x) for x in batch[CONTENT_ID]], pa.string())
    for name in STAMP_COLUMNS:
        if name in batch:
            values = np.asarray(batch[name], dtype=np.int64)
            cols[name] = pa.array(values, pa.int64(), mask=values < 0)
    for name in SAMPLE_COLUMNS:
        if name in batch:  # a WebDataset corpus only
            cols[name] = pa.array([str(v) or None for v in batch[name]], pa.string())
    for name, dtype in CAPTURE_COLUMNS.items():
        if name not in batch:  # capture=False: the columns are absent, as in older tables
            continue
        values = np.asarray(batch[name])
        if pa.types.is_string(dtype):
            cols[name] = pa.array([str(v) or None for v in values], dtype)
        else:
            floats = values.astype(np.float64)
            missing = np.isnan(floats)
            if pa.types.is_integer(dtype):
                floats = np.where(missing, 0, floats)
            cols[name] = pa.array(floats.astype(dtype.to_pandas_dtype()), dtype, mask=missing)
    return pa.table(cols)


def write_batch(batch: dict[str, np.ndarray], *, spec: str, embeddings_dir: str) -> dict[str, Any]:
    """Write one Parquet part; return one tally row for the driver."""
    n = len(batch["image_uri"])
    t0 = time.perf_counter()
    if n:
        table = embedding_table(batch, spec)
        storage.write_parquet(
            table, storage.join(embeddings_dir, _part_name(table["image_uri"].to_pylist()))
        )
    return {
        "rows": np.array([n]),
        "t_decode": np.array([float(np.sum(batch["t_decode"]))]),
        "t_embed": np.array([float(np.sum(batch["t_embed"]))]),
        "t_write": np.array([time.perf_counter() - t0]),
        # Images embedded by the node that decoded them and the node that embedded them.
        "nodes": np.array(
            [
                json.dumps(
                    {
                        stage: Counter(str(x) for x in batch.get(f"{stage}_node", ()))
                        for stage in ("decode", "embed")
                    }
                )
            ],
            dtype=object,
        ),
    }


# --------------------------------------------------------------------------------------------
# The job: plan -> execute -> summarise


class Counts(BaseModel):
    """What happened to the inputs. ``in = skipped + attempted``; ``attempted = embedded + failed
    + lost`` (lost: neither embedded nor recorded, which only a bug or a killed job leaves)."""

    in_: int = Field(alias="in")
    skipped: int = Field(description="already_embedded + failed_before (not retried)")
    already_embedded: int
    failed_before: int = Field(description="recorded failures this run did not retry")
    retried: int = Field(
        description="earlier failures attempted again this run (retryable, retry_errors, or "
        "the file changed since)"
    )
    changed: int = Field(
        default=0,
        description="files embedded or failed before whose content changed since (an edit "
        "saved over the photo, a card's reused name): the old row removed, attempted again "
        "(or, when it now holds another photo the table has, that row copied: see copied)",
    )
    restamped: int = Field(
        default=0,
        description="files whose size or mtime changed but not their content (metadata saved "
        "into the file, a touch, a copy): read to check, kept as embedded",
    )
    moved: int = Field(
        default=0,
        description="of already_embedded: files the table held under a name no longer listed "
        "(moved or renamed since): the row copied, not embedded again; the old name's row "
        "removed when it was under the input",
    )
    copied: int = Field(
        default=0,
        description="of already_embedded: new files holding what a row of a file still listed "
        "was made from (a card imported twice, a folder duplicated): the row copied, not "
        "embedded again",
    )
    twins: int = Field(
        default=0,
        description="of attempted: new files holding what another new file of this run holds "
        "(a card imported into two folders at once, a photo saved under two names): that one "
        "embedded, its row copied to these (or its failure recorded for them)",
    )
    gone: int = Field(
        default=0,
        description="files under a listed folder the table holds rows of (embedded or failed) "
        "that this run found neither under their name nor moved: deleted, or on a disk not "
        "mounted. Not inputs: outside ``in``",
    )
    pruned: int = Field(
        default=0,
        description="rows of gone files removed by prune=true",
    )
    stamped: int = Field(
        default=0,
        description="rows of a table written before keeper kept file stamps, given their "
        "file's stamp as it is now (changes before this run cannot be seen)",
    )
    attempted: int
    embedded: int
    failed: int
    retryable_failed: int = Field(description="failures of this run the next run retries")
    lost: int
    duplicates_removed: int
    errors_cleared: int = Field(description="error rows removed because the image is embedded")
    non_image_files_ignored: int
    manifest_rows_repeated: int = Field(
        default=0, description="manifest rows naming an image an earlier row named: embedded once"
    )
    sample_problems: dict[str, int] = Field(
        default_factory=dict,
        description="WebDataset input: members dropped from samples, by reason (a duplicate or "
        "unsupported member, a caption or metadata member unreadable or too long)",
    )

    model_config = ConfigDict(populate_by_name=True)


class EmbedSummary(BaseModel):
    """A run's outcome; written to DST/_SUMMARY.json and DST/_runs/RUN_ID.json."""

    run_id: str
    status: Literal["ok", "failed"]
    model_spec: str
    image_size: int
    input: str
    output: str
    counts: Counts
    table: dict[str, int] = Field(description="embedded, failed, parts: the whole table")
    failed_fraction: float = Field(description="failed / (embedded + failed) over the table")
    failed_fraction_this_run: float
    max_failure_fraction: float
    errors_by_reason: dict[str, int]
    seconds: dict[str, float]
    images_per_s: float | None
    seconds_to_first_part: float | None = Field(
        description="start-up (workers, actors, model load) shows as the wait for the first part"
    )
    worker_seconds: dict[str, float]
    nodes: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="images embedded this run by Ray node id: decode (the node that read and "
        "decoded them) and embed (the node of the model actor)",
    )
    cluster: str
    versions: dict[str, str]
    finished: str

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2, by_alias=True).encode()


@dataclass
class Plan:
    """What a run will do, from one read of what DST already holds."""

    run_id: str
    dst: str
    inputs: list[str]
    ignored: int
    #: manifest rows that named an image an earlier row named (embedded once)
    repeated: int
    #: WebDataset input: samples' problems by reason (keeper_core.webdataset.SAMPLE_PROBLEMS)
    #: other than a missing image (counted in ``ignored``)
    sample_problems: dict[str, int]
    embedded: EmbeddedParts
    errors: ErrorRows
    todo: list[str]
    retried: int
    failed_before: int
    duplicates_removed: int
    errors_cleared: int
    seconds: dict[str, float]
    #: WebDataset input: each image URI's place in its shard, caption and metadata
    members: dict[str, dict[str, Any]] = dataclass_field(default_factory=dict)
    #: WebDataset input: shards whose index stopped early (corrupt or cut short) -> why; the
    #: shard's URI is an input that fails, so its unread rest is counted, not silently lost
    index_failures: dict[str, str] = dataclass_field(default_factory=dict)
    #: inputs to attempt whose path is not valid UTF-8 (escaped, as in ``inputs``) -> why: they
    #: fail as ``bad_name`` without being read (:func:`set_aside_bad_names`)
    bad_names: dict[str, str] = dataclass_field(default_factory=dict)
    #: a listed folder's inputs -> their stamp (kept in the table with each row)
    stamps: dict[str, storage.Stamp] = dataclass_field(default_factory=dict)
    #: what :func:`check_changes` found
    changes: Changes = dataclass_field(default_factory=lambda: Changes(set(), 0, 0))
    #: inputs whose content the table held under a name no longer listed (:func:`reuse_moved`)
    moved: int = 0
    #: inputs holding what a row of a listed file was made from (:func:`reuse_moved`)
    copied: int = 0
    #: inputs holding what another input of this run holds -> that input (:func:`find_twins`):
    #: not in ``todo``; they get its outcome once the pipeline has run (:func:`copy_twins`)
    twins: dict[str, Twin] = dataclass_field(default_factory=dict)
    #: files under a listed folder the table held rows of, not listed and not found moved
    gone: int = 0
    #: rows of gone files removed (``prune``)
    pruned: int = 0


@dataclass
class Execution:
    """What the pipeline did: a tally row per written part, and when the first one came."""

    tallies: list[dict[str, Any]]
    cluster: str = ""
    seconds_to_first_part: float | None = None
    seconds: dict[str, float] = dataclass_field(default_factory=dict)


def plan(cfg: EmbedConfig) -> Plan:
    """List SRC, read DST's parts once, and decide what to embed.

    Embedded images are skipped. Recorded failures are retried when they were retryable (a
    timeout, an unreachable store) or when ``retry_errors`` is set; a corrupt file is not read
    again unless asked. Duplicates left by a killed run are removed first. DST's record of its
    spec (``_KEEPER_TABLE.json``) is checked first and written only once the inputs are listed
    and there is something to embed.

    Raises:
        DataError: DST holds another spec's embeddings, or SRC lists no image at all.
        StorageError: SRC cannot be listed.
    """
    t0 = time.perf_counter()
    dst = cfg.output.rstrip("/")
    dim = embed_dim(cfg.model)
    weights = weights_version(cfg.model)
    # another spec, or a replaced checkpoint: refused now
    check_table_meta(dst, cfg.model, embed_dim=dim, record=False, weights=weights)
    members: dict[str, dict[str, Any]] = {}
    index_failures: dict[str, str] = {}
    repeated = 0
    sample_problems: dict[str, int] = {}
    bad_names: dict[str, str] = {}
    stamps: dict[str, storage.Stamp] = {}
    shards = names_shards(cfg.input)  # a .tar or a brace pattern: nothing to list first
    # What keeper writes is never an input: the output, and thumbnails kept under the input.
    not_inputs = [dst, *cfg.exclude, *([cfg.thumbnails] if cfg.thumbnails else [])]
    a_folder = not shards and not cfg.input.lower().endswith(MANIFEST_SUFFIXES)
    if cfg.prune and not a_folder:
        raise ConfigError(_prune_needs_a_folder(cfg.input))
    if not shards:
        found = find_inputs(cfg.input, exclude=not_inputs)
        inputs, ignored, repeated = found.uris, found.ignored, found.repeated
        bad_names, stamps = found.bad_names, found.stamps
        # A folder of shards has no loose image: only then is it listed again, for its shards.
        shards = not inputs and ignored > 0 and is_webdataset(cfg.input)
    if shards:
        if cfg.prune:
            raise ConfigError(_prune_needs_a_folder(cfg.input))
        a_folder = False
        listed, ignored, members, index_failures, sample_problems = list_webdataset(
            cfg.input, storage.join(dst, SHARDS)
        )
        inputs, bad_names = set_aside_bad_names(listed)
    if not inputs:
        raise DataError(
            f"no images found under {cfg.input} ({_nothing_found(cfg.input, ignored, bool(shards))})"
        )
    # Compared as same_key: a library embedded as `photos/` is not embedded again when named
    # `/home/me/photos` (a million URIs: 0.2 s absolute, already normal; ~0.7 s otherwise).
    keys = [storage.same_key(u) for u in inputs]
    embedded = EmbeddedParts.read(storage.join(dst, EMBEDDINGS))
    # Rows and no record of their spec (a table copied without it, its record deleted): their
    # own model_spec column says what they are, before a record names this run's spec.
    held = embedded.model_specs()
    if held - {cfg.model} and not storage.exists(storage.join(dst, TABLE_META)):
        raise DataError(
            f"{dst} holds embeddings of {sorted(held)} (and no {TABLE_META} recording it); this "
            f"run uses {cfg.model!r}. Embeddings of two specs never mix: choose another output."
        )
    removed = embedded.dedupe()  # a job killed after a retried write may have left a duplicate
    errors = ErrorRows.read(storage.join(dst, ERRORS))
    # A table written before successes cleared theirs.
    cleared = errors.remove({storage.same_key(u) for u in embedded.uris()})
    if members:  # a shard cut short, whole again: its own failure names no input now
        whole = {str(m["shard"]) for m in members.values()} - set(index_failures)
        cleared += errors.remove({storage.same_key(u) for u in whole})
    removed += errors.dedupe()
    # Every file listed, ``limit`` or not: a file past it is not gone.
    gone = (
        find_gone(embedded, errors, cfg.input, stamps, set(keys), not_inputs)
        if a_folder
        else Gone(set(), set(), 0)
    )
    if cfg.limit:
        inputs, keys = inputs[: cfg.limit], keys[: cfg.limit]
    this_run = {u: stamps[u] for u in inputs if u in stamps}  # (``limit``: not the rest)
    now = {k: stamps[u] for u, k in zip(inputs, keys, strict=True) if u in stamps}
    cap = max(cfg.max_bytes, cfg.max_raw_bytes)
    changes = check_changes(embedded, this_run, now, cap=cap)
    done = embedded.uris()  # less the photos saved over since (check_changes)
    rows = errors.rows()
    failed_changed = _stamp_changed(rows, now)
    retry = rows["retryable"].astype(bool).to_numpy() | cfg.retry_errors | failed_changed
    done_keys = {storage.same_key(u) for u in done}
    keep_failed = {storage.same_key(u) for u in rows.loc[~retry, "image_uri"].astype(str)}
    keep_failed -= done_keys  # failed under one spelling, embedded under another
    retried = {storage.same_key(u) for u in rows.loc[retry, "image_uri"].astype(str)}
    skip = done_keys | keep_failed
    todo = [u for u, k in zip(inputs, keys, strict=True) if k not in skip]
    moved, copied = reuse_moved(
        embedded, todo, stamps, changes.unlisted, cap=cap, copies=cfg.find_copies
    )
    todo = [u for u in todo if u not in moved and u not in copied]
    twins = (
        find_twins([u for u in todo if u not in bad_names], stamps, cap=cap)
        if cfg.find_copies
        else {}
    )
    todo = [u for u in todo if u not in twins]
    # A photo moved within the input: its row now lives under the new name, and the old name's
    # row goes (one not under the input is another input's file, or a copy's: it stays).
    renamed = set(moved.values()) & gone.embedded
    if renamed:
        embedded.remove(renamed)
    lost = gone.rows - renamed
    pruned = 0
    if cfg.prune and lost:
        check_prune(lost, gone.under, cfg, embedded)
        failed_gone = {storage.same_key(u) for u in lost & gone.failed}
        pruned = embedded.remove(lost & gone.embedded) + errors.remove(failed_gone)
    attempt = set(todo)  # looked up per bad name and failed shard: a list would be B x N
    if todo:  # the spec is recorded once there is something to embed with it
        check_table_meta(dst, cfg.model, embed_dim=dim, weights=weights)
    return Plan(
        run_id=f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
        dst=dst,
        inputs=inputs,
        ignored=ignored,
        repeated=repeated,
        sample_problems=sample_problems,
        embedded=embedded,
        errors=errors,
        todo=todo,
        retried=sum(1 for k in keys if k in retried and k not in skip),
        failed_before=sum(1 for k in keys if k in keep_failed),
        duplicates_removed=removed,
        errors_cleared=cleared,
        seconds={"plan": time.perf_counter() - t0},
        members=members,
        index_failures={u: e for u, e in index_failures.items() if u in attempt},
        bad_names={u: e for u, e in bad_names.items() if u in attempt},
        stamps=stamps,
        changes=Changes(
            changes.changed | set(rows.loc[failed_changed, "image_uri"].astype(str)),
            changes.restamped,
            changes.stamped,
        ),
        moved=len(moved),
        copied=len(copied),
        twins=twins,
        gone=len(lost),
        pruned=pruned,
    )


@dataclass(frozen=True)
class Changes:
    """Embedded files whose stamp changed since, sorted out by :func:`check_changes`."""

    changed: set[str]  # table URIs whose content changed: their rows are removed
    restamped: int  # content unchanged: their rows have the new stamp
    stamped: int  # rows without a stamp (an older table) given the file's
    #: file size -> the table's rows of that size whose file this run did not list (moved,
    #: renamed, deleted, or on a disk not mounted): what :func:`reuse_moved` looks among
    unlisted: dict[int, list[str]] = dataclass_field(default_factory=dict)


def check_changes(
    embedded: EmbeddedParts,
    listed: dict[str, storage.Stamp],
    by_key: dict[str, storage.Stamp],
    *,
    cap: int,
) -> Changes:
    """Sort the rows of files listed again (``listed`` by URI, ``by_key`` by ``same_key``) whose
    stamp changed: changed content (the row is removed, so the file is embedded again) or not
    (the row takes the new stamp). Rows without a stamp take the file's as it is now.

    Only files whose stamp changed are read, ``cap`` bytes at most, several at once. A photo
    tool's metadata save changes the stamp, not the content (``content_digest`` leaves a JPEG's
    metadata segments out); a file that cannot be read now, or is over ``cap``, counts as
    changed and its attempt records why.
    """
    if not listed:  # a manifest or shards: nothing listed, nothing to compare
        return Changes(set(), 0, 0)
    suspects: dict[str, storage.Stamp] = {}
    first: dict[str, storage.Stamp] = {}
    unlisted: dict[int, list[str]] = {}
    for uri, was in embedded.stamped():
        st = listed.get(uri) or by_key.get(storage.same_key(uri))
        if st is None and was is not None:
            unlisted.setdefault(was.size, []).append(uri)
        if st is None or st == was:
            continue
        if was is None:
            first[uri] = st
        else:
            suspects[uri] = st
    if suspects:
        log.info("%d embedded files' size or time changed: reading them to compare", len(suspects))
    ids = embedded.ids(set(suspects))

    def same_content(uri: str, data: bytes) -> bool:
        """What its row was made from: its content_id (one hash), else, in a row written before
        that was kept, its image_id (the whole file)."""
        image_id, content_id = ids.get(uri, (None, None))
        if content_id is not None:
            return content_digest(data, uri) == content_id
        return hashlib.sha256(data).hexdigest() == image_id

    # A file that cannot be read now (too large, gone) counts as changed: its attempt says why.
    same = _read_each(suspects, same_content, cap=cap)
    changed = {u for u, ok in same.items() if not ok}
    restamp = {u: suspects[u] for u, ok in same.items() if ok}
    if changed or restamp or first:
        embedded.update(changed, {**restamp, **first})
    return Changes(changed, len(restamp), len(first), unlisted)


def reuse_moved(
    embedded: EmbeddedParts,
    todo: Sequence[str],
    stamps: dict[str, storage.Stamp],
    unlisted: dict[int, list[str]],
    *,
    cap: int,
    copies: bool = True,
) -> tuple[dict[str, str], dict[str, str]]:
    """Inputs to embed that hold what a row was made from, whose row is copied under the input's
    URI and stamp instead of decoding and embedding it again: ``(moved, copied)``, each input URI
    -> the row's URI.

    - moved: a row of a file no longer listed (``unlisted``: a photo moved or renamed since, a
      folder reorganised). The old row stays here; :func:`plan` removes it when it was under the
      input folder (the file is not there), and keeps one of another input's file (a copy).
    - copied: a row of a file still listed (a card imported twice, a folder duplicated), of a
      size at most :data:`COPY_SIZE_ROWS` rows share (:func:`_copy_candidates`).

    Only an input of the same size as such a row is read (once, ``cap`` bytes at most, several at
    once) and matched by its ``content_id`` (or, for rows written before that was kept, its
    ``image_id``), a row no longer listed first; a new photo of another size costs nothing.
    ``copies`` False: rows of listed files are not looked among (moved photos are).
    """
    by_size = {size: list(names) for size, names in unlisted.items()}
    listed = _copy_candidates(embedded, todo, stamps) if copies else {}
    for size, names in listed.items():
        by_size.setdefault(size, []).extend(names)
    maybe = [u for u in todo if u in stamps and stamps[u].size in by_size]
    # A new photo whose size only happens to be a listed file's (1 in 6 at a million camera
    # JPEGs, measured: benchmarks/prune_scale.py) is not read whole: its end first.
    check = [u for u in maybe if stamps[u].size not in unlisted]
    if check:
        ends_differ = set(check) - _ends_match(check, stamps, listed)
        maybe = [u for u in maybe if u not in ends_differ]
    if not maybe:
        return {}, {}
    rows = {r for u in maybe for r in by_size[stamps[u].size]}
    gone = {r for u in maybe for r in unlisted.get(stamps[u].size, ())}
    ids = embedded.ids(rows)
    by_content: dict[str, str] = {}
    by_bytes: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: (r not in gone, r)):  # a moved photo's row first
        image_id, content_id = ids.get(r, (None, None))
        if content_id is not None:
            by_content.setdefault(content_id, r)
        elif image_id is not None:
            by_bytes.setdefault(image_id, r)

    def match(uri: str, data: bytes) -> tuple[str, str] | None:
        image_id, content_id = file_ids(data, uri)
        row = by_content.get(content_id) or by_bytes.get(image_id)
        return (row, image_id) if row else None

    # An input that cannot be read now is attempted as any other: its attempt says why.
    matched = {
        u: m for u, m in _read_each({u: stamps[u] for u in maybe}, match, cap=cap).items() if m
    }
    found = {u: r for u, (r, _) in matched.items()}
    if found:
        embedded.copy_rows(
            found,
            {u: stamps[u] for u in found},
            _part_name(list(found)),
            image_ids={u: i for u, (_, i) in matched.items()},
        )
    moved = {u: r for u, r in found.items() if r in gone}
    return moved, {u: r for u, r in found.items() if u not in moved}


#: Bytes at the end of a file compared before it is read whole to look for a copy: a JPEG ends
#: in its compressed pixels, which two photos never share (its metadata is at its start).
COPY_TAIL_BYTES = 16 * 1024


def _ends_match(
    inputs: Sequence[str], stamps: dict[str, storage.Stamp], rows_by_size: dict[int, list[str]]
) -> set[str]:
    """The ``inputs`` whose last :data:`COPY_TAIL_BYTES` are those of a file of one of the rows
    of their size (read as the row's file is now, on threads: a small read a file, a ranged GET
    on S3). A file that cannot be read now matches nothing."""
    size = {u: stamps[u].size for u in inputs}
    size.update({r: size[u] for u in inputs for r in rows_by_size[size[u]]})
    rows = sorted(set(size) - set(inputs))
    row_ends = {e for e in _ends(rows, size).values() if e is not None}
    return {u for u, e in _ends(inputs, size).items() if e is not None and e in row_ends}


def _ends(uris: Sequence[str], size: dict[str, int]) -> dict[str, bytes | None]:
    """Each file's last :data:`COPY_TAIL_BYTES` (of its listed ``size``) as a 16-byte digest,
    read on threads (a small read a file, a ranged GET on S3); None for one that cannot be read
    now (gone, shorter or unreadable since listed)."""

    def end(uri: str) -> bytes | None:
        n = min(size[uri], COPY_TAIL_BYTES)
        try:
            return hashlib.blake2b(
                storage.read_range(uri, size[uri] - n, n), digest_size=16
            ).digest()
        except (StorageError, DataError) as e:
            log.info("%s: end not read to look for a copy (%s)", uri, e)
            return None

    return dict(zip(uris, storage.map_in_threads(end, list(uris), _END_THREADS), strict=True))


#: A file size shared by more rows than this is a fixed-size format's (uncompressed or
#: fixed-rate RAW, BMP: every frame of a camera the same size): a new file of that size is not
#: read to look for a copy, or every new frame of that camera would be read twice.
COPY_SIZE_ROWS = 4


def _copy_candidates(
    embedded: EmbeddedParts, todo: Sequence[str], stamps: dict[str, storage.Stamp]
) -> dict[int, list[str]]:
    """File size -> the table's rows of that size, for the sizes of ``todo``'s inputs that at
    most :data:`COPY_SIZE_ROWS` rows share. The rows' sizes are compared as one array (the
    table's stamps), not a row at a time."""
    sizes = {stamps[u].size for u in todo if u in stamps}
    return _rows_by_size(embedded, sizes, at_most=COPY_SIZE_ROWS)


def _rows_by_size(
    embedded: EmbeddedParts, sizes: set[int], *, at_most: int | None = None
) -> dict[int, list[str]]:
    """File size -> the table's rows of that size, for ``sizes`` (those more than ``at_most``
    rows share left out). The rows' sizes are compared as one array (the table's stamps), not a
    row at a time."""
    want = np.fromiter(sizes, dtype=np.int64, count=len(sizes))
    parts = [p for p in embedded.by_part if len(embedded.by_part[p])]
    if not len(want) or not parts:
        return {}
    have = np.concatenate([embedded.stamps[p][:, 0] for p in parts])
    hit = np.flatnonzero(np.isin(have, want))
    if at_most is not None and len(hit):
        values, counts = np.unique(have[hit], return_counts=True)
        hit = hit[np.isin(have[hit], values[counts <= at_most])]
    ends = np.cumsum([len(embedded.by_part[p]) for p in parts])
    by_size: dict[int, list[str]] = {}
    for i in hit.tolist():
        k = int(np.searchsorted(ends, i, side="right"))
        row = embedded.by_part[parts[k]][i - (int(ends[k - 1]) if k else 0)]
        by_size.setdefault(int(have[i]), []).append(row)
    return by_size


class Twin(NamedTuple):
    """An input holding what another input of the same run holds (:func:`find_twins`)."""

    of: str  # the input embedded for both
    image_id: str  # the twin's own (its bytes may differ in metadata only)


#: Inputs of one run sharing a size that are looked at for twins: a card imported twice keeps
#: groups of up to 4 same-size photos; more is a fixed-size format's (every RAW frame alike).
TWIN_SIZE_INPUTS = 2 * COPY_SIZE_ROWS


def find_twins(
    todo: Sequence[str], stamps: dict[str, storage.Stamp], *, cap: int
) -> dict[str, Twin]:
    """Inputs to embed holding what another input to embed holds (a card imported into two
    folders at once, one photo saved under two names): each -> the one of them the pipeline
    embeds (the first by URI), whose row :func:`copy_twins` copies once it is written, and its
    own ``image_id``.

    Looked for as :func:`reuse_moved` looks for copies of rows: among listed inputs whose size at
    most :data:`TWIN_SIZE_INPUTS` of them share, their ends compared first; only those whose size
    and end another's are read whole (``cap`` bytes at most) and matched by ``content_id``. A
    new photo of a size no other has costs nothing.
    """
    sized = [u for u in todo if u in stamps]
    if len(sized) < 2:
        return {}
    sizes = np.fromiter((stamps[u].size for u in sized), np.int64, len(sized))
    values, counts = np.unique(sizes, return_counts=True)
    shared = np.isin(sizes, values[(counts > 1) & (counts <= TWIN_SIZE_INPUTS)])
    maybe = [sized[i] for i in np.flatnonzero(shared).tolist()]
    if not maybe:
        return {}
    log.info(
        "%d new files share their size with another: reading their last %d KB to look for "
        "copies (find_copies=false does not)",
        len(maybe),
        COPY_TAIL_BYTES // 1024,
    )
    same_end: dict[tuple[int, bytes], list[str]] = {}
    for u, e in _ends(maybe, {u: stamps[u].size for u in maybe}).items():
        if e is not None:
            same_end.setdefault((stamps[u].size, e), []).append(u)
    whole = {u: stamps[u] for g in same_end.values() if len(g) > 1 for u in g}
    read = _read_each(whole, lambda uri, data: file_ids(data, uri), cap=cap)
    ids = {u: i for u, i in read.items() if i is not None}
    alike: dict[str, list[str]] = {}
    for u in sorted(ids):  # one that cannot be read now is attempted itself
        alike.setdefault(ids[u][1], []).append(u)
    return {t: Twin(g[0], ids[t][0]) for g in alike.values() for t in g[1:]}


def copy_twins(
    p: Plan, embedded: EmbeddedParts, embedded_uris: set[str], errors: ErrorRows
) -> tuple[set[str], ErrorRows]:
    """Give each of the plan's twins (:func:`find_twins`) what the input it holds the content of
    got this run: that row, copied under the twin's URI and stamp, or that failure, recorded
    for the twin (the same bytes fail the same way; a retryable one is tried again by the next
    run, twins and all). Returns the twins now embedded and the errors table with the failures.
    A twin whose original was lost (neither written nor failed) is lost with it."""
    if not p.twins:
        return set(), errors
    copied = {t: w.of for t, w in p.twins.items() if w.of in embedded_uris}
    if copied:
        embedded.copy_rows(
            copied,
            {t: p.stamps[t] for t in copied},
            _part_name(list(copied)),
            image_ids={t: p.twins[t].image_id for t in copied},
        )
    originals = {w.of for t, w in p.twins.items() if t not in copied}
    failed: dict[str, dict[str, Any]] = {}
    for part, df in sorted(errors.by_part.items()):  # the parts holding their failures, whole
        if originals.isdisjoint(df["image_uri"].tolist()):
            continue
        for r in storage.read_parquet(part).to_pylist():
            if r["image_uri"] in originals and r.get("run_id") == p.run_id:
                failed[r["image_uri"]] = r
    twin_failures = [
        {
            **_failure(
                t,
                p.run_id,
                str(r["stage"]),
                str(r["reason"]),
                DataError(f"the same content as {o}, which failed: {r['error']}"),
                retryable=bool(r["retryable"]),
            ),
            **dict(zip(STAMP_COLUMNS, p.stamps[t], strict=True)),
        }
        for t, (o, _) in sorted(p.twins.items())
        if (r := failed.get(o)) is not None
    ]
    if twin_failures:
        written = write_errors(errors.folder, twin_failures)
        errors = errors.reread(lambda part, _: part == written)
    return set(copied), errors


@dataclass(frozen=True)
class Gone:
    """The table's rows of files under a listed folder that its listing lacks (deleted, moved or
    renamed, or on a disk not mounted), and how many rows the table held under it."""

    embedded: set[str]
    failed: set[str]
    under: int

    @property
    def rows(self) -> set[str]:
        return self.embedded | self.failed


def find_gone(
    embedded: EmbeddedParts,
    errors: ErrorRows,
    src: str,
    listed: Container[str],
    keys: set[str],
    exclude: Sequence[str],
) -> Gone:
    """The rows (embedded or failed) under folder ``src`` whose file its listing (``listed``, and
    as ``same_key``: ``keys``) lacks. Rows under an ``exclude``d folder are not gone: this run
    did not look there. Costs a set lookup a row; ``same_key`` only for a row not listed as
    written."""
    (prefix,) = folder_keys([src])
    skip = folder_keys(exclude)
    under = 0

    def missing(uris: Iterator[str]) -> set[str]:
        nonlocal under
        out: set[str] = set()
        for u in uris:
            if u in listed:
                under += 1
                continue
            k = storage.same_key(u)
            if k in keys:
                under += 1
            elif k.startswith(prefix) and not (skip and k.startswith(skip)):
                under += 1
                out.add(u)
        return out

    rows = (u for uris in embedded.by_part.values() for u in uris)
    failed = (str(u) for df in errors.by_part.values() for u in df["image_uri"])
    return Gone(missing(rows), missing(failed), under)


def held_elsewhere(embedded: EmbeddedParts, rows: set[str]) -> set[str]:
    """Of ``rows``, those whose content another row of the table holds (by ``content_id``, or
    ``image_id`` for rows written before it was kept): old names of photos moved, whose rows an
    earlier keeper (which kept both) copied under the new names. Rows of the same file size are
    compared, so it reads the ids of the parts holding those (rows without a stamp cannot be
    matched). Only a prune over its limit asks (:func:`check_prune`)."""
    if not rows:
        return set()
    sizes = {u: st.size for u, st in embedded.stamped() if st is not None and u in rows}
    same = _rows_by_size(embedded, set(sizes.values()))
    others = {r for names in same.values() for r in names if r not in rows}
    if not others:
        return set()
    ids = embedded.ids(set(sizes) | others)
    have = {i for p in others for i in ids.get(p, (None, None)) if i is not None}
    return {u for u in sizes if any(i in have for i in ids.get(u, (None, None)) if i is not None)}


def check_prune(lost: set[str], under: int, cfg: EmbedConfig, embedded: EmbeddedParts) -> None:
    """Refuse a prune that would remove more than ``max_prune_fraction`` of the input's rows for
    files not found (``lost``): a disk not mounted, an S3 prefix not yet synced and an unplugged
    card list like folders emptied. Rows whose content another row holds (:func:`held_elsewhere`,
    looked for only when over the limit) are not counted. None of their rows has been removed
    when this raises.

    Raises:
        DataError: naming the count, the share and the folders that lost the most.
    """
    if len(lost) <= cfg.max_prune_fraction * under:
        return
    lost = lost - held_elsewhere(embedded, lost)
    if len(lost) <= cfg.max_prune_fraction * under:
        return
    folders = Counter(u.rsplit("/", 1)[0] + "/" for u in lost).most_common(3)
    where = ", ".join(f"{f} ({n})" for f, n in folders)
    raise DataError(
        f"prune: {len(lost)} of the table's {under} rows under {cfg.input} are of files this run "
        f"did not find, under their name or moved ({len(lost) / under:.0%}, over "
        f"max_prune_fraction {cfg.max_prune_fraction:.0%}), most under {where}. None of their "
        "rows was removed: a disk that is not mounted lists like a folder emptied. If those "
        "files are gone, run again with max_prune_fraction=1; to keep their rows, without prune"
    )


def _prune_needs_a_folder(src: str) -> str:
    return (
        f"prune removes the rows of files a listed folder no longer holds, and {src} is a "
        "manifest or WebDataset shards, which are not listed: write the table anew from the "
        "manifest as it is now (another output), or run without prune"
    )


T = TypeVar("T")
_CHECK_THREADS = 8  # files the plan reads at once (I/O: requests on S3)
#: ends of files (:data:`COPY_TAIL_BYTES`) the plan reads at once: a request's latency, not its
#: bytes, is what such a read costs on S3, and 32 of them hold 512 KB
_END_THREADS = 32
#: The bytes those reads hold at once in the driver: 8 RAW files of 100 MB would hold 800 MB.
_CHECK_BYTES = 512 * 1024 * 1024


def _read_each(
    files: dict[str, storage.Stamp], fn: Callable[[str, bytes], T], *, cap: int
) -> dict[str, T | None]:
    """``fn(uri, bytes)`` of each file (``cap`` bytes at most), ``_CHECK_THREADS`` at once and
    within ``_CHECK_BYTES`` held (sized by the listed stamps); None for one that cannot be read
    now (over ``cap``, gone, unreadable)."""
    budget = ReadBudget(_CHECK_BYTES)

    def one(uri: str) -> T | None:
        try:
            with budget.taken(files[uri].size):
                return fn(uri, storage.read_bytes(uri, max_bytes=cap))
        except StorageError as e:
            log.info("%s: not read to compare (%s)", uri, e)
            return None

    return dict(zip(files, storage.map_in_threads(one, list(files), _CHECK_THREADS), strict=True))


class ReadBudget:
    """At most ``limit`` bytes of files held at once by threads that read them whole (a file
    larger than ``limit`` is read alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._free = threading.Condition()

    @contextmanager
    def taken(self, size: int) -> Iterator[None]:
        n = min(max(size, 0), self.limit)
        with self._free:
            self._free.wait_for(lambda: self.held + n <= self.limit)
            self.held += n
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._free:
                self.held -= n
                self._free.notify_all()


def _stamp_changed(rows: pd.DataFrame, now: dict[str, storage.Stamp]) -> np.ndarray:
    """Whether each error row's file was failed at another stamp than it has now (tried again)."""
    import pandas as pd

    out = np.zeros(len(rows), dtype=bool)
    if not now or not len(rows):
        return out
    sizes, mtimes = (rows[c].tolist() for c in STAMP_COLUMNS)
    for i, uri in enumerate(rows["image_uri"].astype(str).tolist()):
        st = now.get(storage.same_key(uri))
        if st is None or pd.isna(sizes[i]) or pd.isna(mtimes[i]):
            continue
        out[i] = st != (int(sizes[i]), int(mtimes[i]))
    return out


def _nothing_found(src: str, ignored: int, shards: bool) -> str:
    """Why an input listed no image, for ``plan``'s error."""
    if shards:
        return f"WebDataset shards without an image member: {ignored} samples without an image"
    if src.lower().endswith(MANIFEST_SUFFIXES):
        return "the manifest lists no image_uri"
    if ignored:
        return (
            f"{ignored} file(s), none an image: keeper embeds files named "
            f"{', '.join(IMAGE_SUFFIXES[:4])}, ... or starting with an image signature"
        )
    return "no files there, the output and exclude folders aside"


def list_webdataset(
    src: str, cache_dir: str, *, threads: int = 16
) -> tuple[list[str], int, dict[str, dict[str, Any]], dict[str, str], dict[str, int]]:
    """A WebDataset corpus's images: (URIs, samples without an image, members, index failures,
    the samples' other problems by reason: a duplicate or unsupported member, a caption or
    metadata member unreadable or too long; the image is embedded without what was dropped).

    Each shard is indexed once (its tar headers and the small caption/metadata members) and the
    index cached under ``cache_dir``; a re-run reads the cached index after one HEAD. Shards are
    indexed on ``threads`` threads (I/O bound). A shard whose index stopped early keeps the
    samples before the fault, and its own URI becomes an input that fails with the reason.

    Names that are not valid UTF-8 (a shard's path, a member's name) come back as listed:
    ``plan`` sets them aside (:func:`set_aside_bad_names`). Such a shard is not indexed (its
    cached index is named by its URI): its own URI is the input, failed ``bad_name``.
    """
    listed = list_shards(src)
    shards = [s for s in listed if storage.valid_utf8(s)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        indexes = list(pool.map(lambda s: load_or_index(s, cache_dir), shards))
    uris: list[str] = [s for s in listed if not storage.valid_utf8(s)]
    members: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    problems: Counter[str] = Counter()
    ignored = 0
    for index in indexes:
        for row in index.rows():
            uris.append(row["image_uri"])
            members[row["image_uri"]] = row
        ignored += len(index.missing_image())
        problems.update(p.reason for p in index.problems() if p.reason != "missing_image")
        if index.error:
            uris.append(index.shard)
            failures[index.shard] = index.error
    return uris, ignored, members, failures, dict(sorted(problems.items()))


def record_planned_failures(p: Plan) -> list[str]:
    """Record this run's inputs that fail before any is read; returns the URIs to read.

    Shards whose index stopped early (``corrupt_shard``, stage ``index``) and paths that are not
    valid UTF-8 (``bad_name``, stage ``list``; not retryable: the name stays bad until renamed).
    """
    write_errors(
        storage.join(p.dst, ERRORS),
        [
            *(
                _failure(u, p.run_id, "index", "corrupt_shard", DataError(e), retryable=False)
                for u, e in p.index_failures.items()
            ),
            *(
                _failure(u, p.run_id, "list", BAD_NAME, DataError(e), retryable=False)
                for u, e in p.bad_names.items()
            ),
        ],
    )
    return [u for u in p.todo if u not in p.index_failures and u not in p.bad_names]


def execute(cfg: EmbedConfig, p: Plan) -> Execution:
    """Stream ``p.todo`` through decode tasks -> model actors -> part writers on Ray Data."""
    if not p.todo:
        return Execution(tallies=[])
    items = [_item(u, p.members, p.stamps) for u in record_planned_failures(p)]
    if not items:  # every input to attempt failed at the plan: Ray is not needed
        return Execution(tallies=[])
    import ray.data

    from keeper_train.cluster import init_ray

    t0 = time.perf_counter()
    cpus = cfg.stage_cpus()
    cluster = init_ray(cfg.ray_address)
    seconds = {"ray_init": time.perf_counter() - t0}
    prepare = prepare_arguments(cfg, p.dst, p.run_id)
    in_actor = cfg.placement == "actor"
    # What one image in decode holds: a max_pixels image (3 bytes a pixel) beside its bytes.
    decode_memory = 3 * cfg.max_pixels + max(cfg.max_bytes, cfg.max_raw_bytes)
    # Blocks of ~decode_batch_size URIs: enough shards to keep every CPU busy and to stream.
    blocks = max(1, min(len(items) // cfg.decode_batch_size, 10_000))
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=blocks)
    if not in_actor:
        ds = ds.map_batches(
            prepare_batch,  # type: ignore[arg-type]  # keyword-only stage arguments
            batch_size=cfg.decode_batch_size,
            batch_format="numpy",
            fn_kwargs=prepare,
            compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency),
            num_cpus=cpus.decode,
            resources=cfg.decode_resources or None,
            # A decode task holds a worker's baseline (no torch: ~0.25 GiB) and one image.
            # Requesting that memory also keeps Ray Data from fusing decode into the model
            # actors (it fuses task->actor maps whose remote args match, as on a CPU-only
            # cluster), which would serialise decode and inference in one process.
            memory=WORKER_BASELINE_BYTES + decode_memory,
        )
    calls = cfg.actor_decode_calls + 1 if in_actor else 1
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={
            "spec": cfg.model,
            "batch_size": cfg.batch_size,
            "threads": cpus.model_threads,
            # The actors of one node: all of them on a one-node cluster, which is where a
            # CPU-only run usually is; on several nodes they under-use the cores (set
            # model_threads).
            "node_actors": cfg.concurrency if cpus.node_threads else 0,
            "prepare": prepare if in_actor else None,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=cfg.concurrency,
            # decode_placement=actor: calls decode concurrently with one that embeds
            max_concurrent_calls_per_actor=calls,
            max_tasks_in_flight_per_actor=max(2, calls + 1),
            enable_true_multi_threading=in_actor,
        ),
        num_gpus=cfg.num_gpus_per_worker,
        num_cpus=cpus.actor,
        resources=cfg.actor_resources or None,
        # The model (and with decode_placement=actor the images its decoding calls hold): what
        # Ray schedules by, and what keeps Ray Data from warning that the actor uses more than
        # it asked for.
        memory=actor_memory(cfg.model) + (calls - 1) * decode_memory,
    )
    ds = ds.map_batches(
        write_batch,  # type: ignore[arg-type]  # keyword-only stage arguments
        batch_size=cfg.rows_per_file,
        batch_format="numpy",
        fn_kwargs={"spec": cfg.model, "embeddings_dir": storage.join(p.dst, EMBEDDINGS)},
        # I/O bound: it reserves no CPU, so that it runs while decode and the actors hold
        # every CPU (with 0.25 it waited for decode to end on a 2-CPU node). Not capped: a cap
        # of two tasks measured slower (47 against 52-57 img/s, keeper-tiny on 2 cores), and
        # its tasks are bounded by the rows the model stage has produced.
        num_cpus=0,
    )
    tallies: list[dict[str, Any]] = []
    first = None
    with actor_pool_released(EmbedStage):  # the model actors go with the run, however it ends
        t_pipe = time.perf_counter()
        try:
            for row in ds.iter_rows():
                if first is None:
                    first = time.perf_counter() - t_pipe
                tallies.append(row)
        except Exception as e:
            raise PipelineError(f"the embed pipeline failed: {type(e).__name__}: {e}") from e
        seconds["pipeline"] = time.perf_counter() - t_pipe
    return Execution(tallies, cluster, first, seconds)


def _item(
    uri: str, members: dict[str, dict[str, Any]], stamps: dict[str, storage.Stamp]
) -> dict[str, Any]:
    """One input row of the pipeline: a listed file says its stamp, a WebDataset member where
    it lies."""
    if not members:
        st = stamps.get(uri)
        return {"image_uri": uri, **dict(zip(STAMP_COLUMNS, st or (-1, -1), strict=True))}
    m = members[uri]
    return {
        "image_uri": uri,
        "offset": m["offset"],
        "size": m["size"],
        "caption": m["caption"] or "",
        "metadata": m["metadata"] or "",
    }


def summarise(cfg: EmbedConfig, p: Plan, ex: Execution, t_start: float) -> EmbedSummary:
    """Read the parts written this run (only those), restore the table's invariants, count."""
    import ray

    t0 = time.perf_counter()
    embedded = EmbeddedParts.read(p.embedded.folder, known=p.embedded)
    removed = embedded.dedupe()
    emb_all = embedded.uris()
    todo = set(p.todo) | set(p.twins)
    # A retried failure that fails again can be rewritten to the part the plan read it from:
    # those parts are read again (else its new row goes unseen, and the image is counted lost).
    errors = p.errors.reread(lambda _, rows: not todo.isdisjoint(rows["image_uri"].tolist()))
    twins_embedded, errors = copy_twins(p, embedded, emb_all, errors)
    emb_all |= twins_embedded
    # An image that failed once and then succeeded is embedded (under whichever spelling).
    cleared = errors.remove({storage.same_key(u) for u in emb_all})
    removed += errors.dedupe()
    rows = errors.rows()
    this_run = rows[(rows["run_id"] == p.run_id).to_numpy() & in_set(rows["image_uri"], todo)]
    n_embedded = len(emb_all & todo)
    n_failed = len(this_run)
    attempted = len(todo)
    lost = attempted - n_embedded - n_failed
    table_n = len(emb_all) + len(rows)
    compacted = errors.compact(ERRORS_SCHEMA, _part_name(rows["image_uri"].astype(str).tolist()))
    if compacted:
        log.info("errors table: %d parts rewritten as one", compacted)
    # Judged on the whole table, so a re-run after exit 3 (which skips recorded errors) still
    # reports the table as failing until the errors are dealt with (retry_errors, or new input).
    frac = len(rows) / table_n if table_n else 0.0
    seconds = {**p.seconds, **ex.seconds, "finalize": time.perf_counter() - t0}
    seconds["total"] = time.perf_counter() - t_start
    pipe_s = seconds.get("pipeline", 0.0)
    already = len(p.inputs) - attempted - p.failed_before
    return EmbedSummary(
        run_id=p.run_id,
        status="ok" if lost == 0 and frac <= cfg.max_failure_fraction else "failed",
        model_spec=cfg.model,
        image_size=preprocess_config(cfg.model).image_size,
        input=cfg.input,
        output=p.dst,
        counts=Counts(
            in_=len(p.inputs),
            skipped=len(p.inputs) - attempted,
            already_embedded=already,
            failed_before=p.failed_before,
            retried=p.retried,
            changed=len(p.changes.changed),
            restamped=p.changes.restamped,
            stamped=p.changes.stamped,
            moved=p.moved,
            copied=p.copied,
            twins=len(p.twins),
            gone=p.gone,
            pruned=p.pruned,
            attempted=attempted,
            embedded=n_embedded,
            failed=n_failed,
            retryable_failed=int(this_run["retryable"].astype(bool).sum()),
            lost=lost,
            duplicates_removed=p.duplicates_removed + removed,
            errors_cleared=p.errors_cleared + cleared,
            non_image_files_ignored=p.ignored,
            manifest_rows_repeated=p.repeated,
            sample_problems=p.sample_problems,
        ),
        table={
            "embedded": len(emb_all),
            "failed": len(rows),
            "parts": len(embedded.by_part),
            "error_parts": len(errors.by_part),
            "error_parts_compacted": compacted,
        },
        failed_fraction=round(frac, 6),
        failed_fraction_this_run=round(n_failed / attempted, 6) if attempted else 0.0,
        max_failure_fraction=cfg.max_failure_fraction,
        errors_by_reason=dict(Counter(this_run["reason"].astype(str))),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        images_per_s=round((n_embedded - len(twins_embedded)) / pipe_s, 2) if pipe_s else None,
        seconds_to_first_part=round(ex.seconds_to_first_part, 3)
        if ex.seconds_to_first_part is not None
        else None,
        worker_seconds={
            "read_decode_features": round(sum(float(t["t_decode"]) for t in ex.tallies), 3),
            "embed": round(sum(float(t["t_embed"]) for t in ex.tallies), 3),
            "write": round(sum(float(t["t_write"]) for t in ex.tallies), 3),
        },
        nodes=node_counts(ex.tallies),
        cluster=ex.cluster,
        versions={
            "keeper_core": _version("keeper-core"),
            "keeper_train": _version("keeper-train"),
            "ray": ray.__version__,
            "torch": _version("torch"),
            "open_clip": _version("open_clip_torch"),
        },
        finished=_now(),
    )


def node_counts(tallies: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The write tallies' per-node counts summed: {"decode": {node: n}, "embed": {node: n}}."""
    out: dict[str, Counter[str]] = {"decode": Counter(), "embed": Counter()}
    for t in tallies:
        for stage, counts in json.loads(str(t["nodes"])).items():
            out[stage].update(counts)
    return {stage: dict(sorted(c.items())) for stage, c in out.items()}


def run(cfg: EmbedConfig) -> EmbedSummary:
    """Run the job; returns the summary (also written to DST/_SUMMARY.json).

    Raises:
        BusyError: another run is writing DST (it holds DST/_LOCK.json: ``run_lock``).
    """
    with run_lock.holding(cfg.output, job="keeper embed"):
        return _run(cfg)


def _run(cfg: EmbedConfig) -> EmbedSummary:
    t_start = time.perf_counter()
    p = plan(cfg)
    log.info(
        "%d inputs: %d to embed (%d retried, %d changed since; %d more hold what one of them "
        "holds), %d already embedded, %d failed before",
        len(p.inputs),
        len(p.todo),
        p.retried,
        len(p.changes.changed),
        len(p.twins),
        len(p.inputs) - len(p.todo) - len(p.twins) - p.failed_before,
        p.failed_before,
    )
    summary = summarise(cfg, p, execute(cfg, p), t_start)
    body = summary.to_json()
    storage.write_bytes(storage.join(p.dst, SUMMARY), body)
    storage.write_bytes(storage.join(p.dst, "_runs", f"{p.run_id}.json"), body)
    return summary


def _version(dist: str) -> str:
    # keeper may run as uploaded source (a runtime_env working_dir) without package metadata.
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


def format_summary(s: EmbedSummary) -> str:
    """The one-screen summary printed at the end of a run."""
    c = s.counts
    retried = f", {c.retried} of them retried" if c.retried else ""
    lines = [
        f"keeper embed  {s.status.upper()}  run {s.run_id}",
        f"  model    {s.model_spec}  ({s.image_size} px)",
        f"  input    {s.input}",
        f"  output   {s.output}",
        f"  images   {c.in_} in = {c.already_embedded} already embedded + {c.failed_before} "
        f"failed before (not retried) + {c.attempted} attempted{retried}"
        + (
            f" ({c.manifest_rows_repeated} more manifest rows named an image already listed)"
            if c.manifest_rows_repeated
            else ""
        ),
        *(
            [
                f"  changed  {c.changed} file(s) changed since the last run: their old rows "
                "removed, the new content embedded"
                + (f"; {c.restamped} with only new metadata or times: kept" if c.restamped else "")
            ]
            if c.changed or c.restamped
            else []
        ),
        *(
            [
                f"  moved    {c.moved} file(s) the table held under a name no longer listed: "
                "their rows carried over, not embedded again"
            ]
            if c.moved
            else []
        ),
        *(
            [
                f"  copied   {c.copied} new file(s) held a photo the table holds: their rows "
                "copied, not embedded again"
            ]
            if c.copied
            else []
        ),
        *(
            [
                f"  twins    {c.twins} of the attempted held what another new file holds: "
                "embedded once, the row copied"
            ]
            if c.twins
            else []
        ),
        *(
            [
                f"  gone     {c.gone} file(s) of earlier runs under the input not found (deleted, "
                "or on a disk not mounted): "
                + ("their rows removed" if c.pruned else "their rows kept; prune=true removes them")
            ]
            if c.gone
            else []
        ),
        *([f"  pruned   {c.pruned} row(s) of files no longer listed removed"] if c.pruned else []),
        f"  attempt  {c.attempted} = {c.embedded} embedded + {c.failed} failed"
        + (
            f" ({c.retryable_failed} retryable: the next run tries them again)"
            if c.retryable_failed
            else ""
        )
        + (f" + {c.lost} LOST" if c.lost else ""),
        f"  failed   {s.failed_fraction:.1%} of the table (limit "
        f"{s.max_failure_fraction:.1%}), {s.failed_fraction_this_run:.1%} of this run"
        + (f"  by reason: {s.errors_by_reason}" if s.errors_by_reason else ""),
        f"  table    {s.table['embedded']} embeddings in {s.table['parts']} part(s), "
        f"{s.table['failed']} errors",
        *(
            [f"  shards   members dropped from samples: {c.sample_problems}"]
            if c.sample_problems
            else []
        ),
        "  seconds  " + "  ".join(f"{k} {v:.1f}" for k, v in s.seconds.items()),
    ]
    if s.images_per_s:
        first = s.seconds_to_first_part or 0.0
        w = s.worker_seconds
        lines += [
            f"  speed    {s.images_per_s:.1f} img/s over the pipeline "
            f"(first part written after {first:.1f}s)",
            f"  workers  decode+features {w['read_decode_features']:.1f}s  "
            f"embed {w['embed']:.1f}s  write {w['write']:.1f}s (summed over workers)",
        ]
    if len(s.nodes.get("decode", {})) > 1 or len(s.nodes.get("embed", {})) > 1:
        lines += [
            f"  nodes    {stage:<6} on {len(by_node)}: "
            + ", ".join(f"{node[:8]} {n}" for node, n in by_node.items())
            for stage, by_node in s.nodes.items()
        ]
    if ModelSpec.parse(s.model_spec).is_random:
        lines.append("  NOTE     random weights: these embeddings carry no meaning beyond tests")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.embed --config FILE [key=value ...]``."""
    return job_main(
        argv,
        job="embed",
        description=__doc__.split("\n")[0],
        model=EmbedConfig,
        run=run,
        describe=format_summary,
        exit_code=lambda s: 0 if s.status == "ok" else EXIT_TOO_MANY_FAILURES,
        example="model=ViT-B-32:random",
    )


if __name__ == "__main__":
    # Re-import by module name so Ray pickles the stage functions by reference
    # (keeper_train.jobs.embed.prepare_batch), not as attributes of __main__.
    from keeper_train.jobs import embed

    sys.exit(embed.main())
