"""Read a photographer's culls back from the XMP sidecars of a ``keeper pick`` run, as feedback.

    keeper pick --input ~/Pictures/wedding --output ~/culls/wedding --xmp beside
    # ... rate, reject and label in Lightroom, darktable or Capture One ...
    keeper feedback-from-xmp --run ~/culls/wedding --feedback ~/keeper-feedback
    keeper feedback-export --feedback ~/keeper-feedback --output ~/fb-export
    python -m keeper_train.jobs.xmp_feedback run=RUN feedback=ROOT client=ana

    plan      the run's _SUMMARY.json and picks.parquet; where its sidecars are (``plan_sidecars``
              with the run's mode, naming and input root, so a RAW+JPEG pair's one sidecar
              belongs to the RAW, as when pick wrote it); a run with xmp=embed wrote a JPEG's
              XMP into the file itself (``jpeg_xmp.embeds_into``), where it is read, the
              others' beside them
    read      each sidecar (one request on S3: ``storage.read_if_exists``); a missing one is
              counted, an unreadable one recorded with its reason; a person's rating is one
              that differs from keeper's record (``keeper:xmp``), or any rating in a sidecar
              keeper never wrote. A photo
              without a sidecar is read from the XMP packet in its own file
              (``embedded_xmp``: JPEG, TIFF, DNG, HEIC, where Lightroom writes those formats'
              ratings); a file that cannot be followed to its packet is recorded like an
              unreadable sidecar
    decide    per group, from the person's ratings: -1 -> rejected; a person's rating >= 1
              above every other photo's rating in the group -> picked-as-keeper; other >= 1
              -> accepted; 0 (unrated) -> nothing
    write     offers of each decided group (route ``review``, the embeddings from the run's
              table: what the review page logs for the run) and the events that make this
              client's standing decisions say what the ratings now say, under ROOT/offers and
              ROOT/events: a decision where it differs, ``undone`` where a rating that made one
              was taken back

The decisions refer to the run as the review page's do (``run-`` + 24 hex of the SHA-256 of its
``_SUMMARY.json``), so ``keeper feedback-export`` and ``keeper ab-report`` take them like review
decisions. Running it again writes only what changed in the sidecars since: an image whose
standing decision (this client's) already says the same gets no event, and an image already
offered for the run gets no offer. Event ids are a hash of the run, client, image, action, the
rating read and the image's event count in the log (plus one for each earlier event of this
write), so a write retried is counted once.

A rating taken back (the sidecar back at keeper's value, or its rating removed; a group's unique
top turned into a tie is a change of decision, not a take-back) is undone: for an image
whose rating was read and now makes no decision, one ``undone`` for each decision on top of this
client's standing ones that this job wrote (ids ``xmp-``), as ``feedback.decisions`` folds them
(undo pops the decision before it), so nothing of the ratings' stands and a decision made on the
review page under the same client, beneath them, stands again. A decision changed by a new rating
is the new action alone: the latest event is the standing one, no ``undone`` needed. An image whose
sidecar is missing or unreadable, without a readable packet in its file, is left as it stands: no
rating read is not a rating taken back.

A person's rating in the sidecar wins: a photo's file is read when its sidecar is missing, or
when the sidecar still holds keeper's own rating (``keeper_owns``): Lightroom writes a JPEG's,
TIFF's or DNG's rating into the file and never reads its sidecar, so beside keeper's untouched
sidecar the file's rating, where it has one, is the person's (counted in ``in_file``). A rating
in a file is read by the sidecars' rule (``keeper_owns``): keeper writes into a file only with
``keeper pick --xmp embed``, and then records what it set beside it (``keeper:xmp``), so a rating
still equal to that record is keeper's, and one changed since (in Lightroom) is the person's.
Every other rating in a file is a person's, in a photo tool or in camera (cameras write
``xmp:Rating`` into a JPEG's XMP): an in-camera rating counts as a rating given before keeper
ran does in a sidecar keeper never wrote. The photographer rated
the photo either way; the file's mtime would not tell the two apart reliably (copies, imports and
unrelated edits set it), and a rule by time would drop a Lightroom rating given before the pick
run while a sidecar's counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from keeper_core import storage
from keeper_core.errors import ConfigError, DataError, KeeperError, StorageError
from keeper_core.feedback import (
    ACTIONS,
    FeedbackEvent,
    FeedbackLog,
    OfferLog,
    pick_run_complete,
    pick_run_offers,
    read_feedback,
    read_offers,
    run_request_id,
)
from keeper_core.handback import RATING_KEY, SidecarPlan, keeper_owns, plan_sidecars
from keeper_core.jpeg_xmp import embeds_into
from keeper_core.progress import Progress
from keeper_core.quality import FEATURE_NAMES
from keeper_train.config import job_main

log = logging.getLogger("keeper.xmp_feedback")

SUMMARY, PICKS, FAILED = "_SUMMARY.json", "picks.parquet", "failed.csv"
#: Photos whose ratings Lightroom writes into the file and whose sidecars it never reads: read
#: beside a sidecar that still holds keeper's rating (``_beside_keepers``).
IN_FILE_SUFFIXES = (".jpg", ".jpeg", ".tif", ".tiff", ".dng")
KEEPER, ACCEPTED, REJECTED = "picked-as-keeper", "accepted", "rejected"
#: picks.parquet's columns this job and the offers read.
_COLUMNS = ("group_id", "rank", "decision", "score", "image_uri", "image_id")


class PickRunXmp(BaseModel):
    """Where a ``keeper pick`` run put its XMP: what :func:`plan` reads, and what ``keeper
    feedback-from-xmp`` and ``keeper unpick`` take to find it. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(description="the keeper pick output folder (picks.parquet, _SUMMARY.json)")
    xmp: Literal["mirror", "beside", "embed"] | None = Field(
        None,
        description="where pick put the sidecars (default: what the run's summary records; for "
        "a run from before it did, mirror when it names OUTPUT/xmp, else beside when it wrote "
        "sidecars); embed: a JPEG's XMP in the file itself, the other photos' beside them",
    )
    xmp_naming: Literal["basename", "full"] | None = Field(
        None,
        description="pick's xmp_naming: IMG_1.xmp, or IMG_1.CR2.xmp (darktable) (default: what "
        "the run's summary records, else basename)",
    )
    input_root: str | None = Field(
        None,
        description="mirror only: the folder pick mirrored paths from (default: what the run's "
        "summary records; else the run's input folder, or for a manifest the deepest folder "
        "holding its photos and failures)",
    )
    io_threads: int = Field(
        16,
        ge=1,
        le=32,  # the S3 client's pool of connections (storage._cached_client)
        description="photos and sidecars handled at once on S3 or a network file system, where "
        "each request is tens of ms, or where each write is fsynced; on local disks otherwise "
        "one at a time, which is faster there",
    )


class XmpFeedbackConfig(PickRunXmp):
    """Everything ``keeper feedback-from-xmp`` takes. Unknown keys are errors."""

    feedback: str = Field(description="feedback root to write: ROOT/events and ROOT/offers")
    client: str = Field(
        "xmp",
        min_length=1,
        max_length=256,
        description="who decided (the events' client): the photographer's name, as on /ui",
    )


class SidecarProblem(BaseModel):
    """A sidecar that could not be read, and why (the others are read)."""

    image_uri: str
    sidecar_uri: str
    reason: str


class FileProblem(BaseModel):
    """A photo without a sidecar whose own XMP could not be read, and why."""

    image_uri: str
    reason: str


class XmpFeedbackSummary(BaseModel):
    """What a run read and wrote; ``sidecars == read + missing + len(unreadable)``, and of the
    missing, ``missing == embedded + len(embedded_unreadable) + absent``. With ``xmp=embed`` a
    JPEG's own packet is its sidecar (``in_jpegs`` of them), counted the same way: read, or
    missing (no packet: ``embedded``; no file: ``absent``), or unreadable."""

    run: str
    feedback: str
    request_id: str
    client: str
    xmp: str
    xmp_naming: str
    photos: int = Field(description="rows of picks.parquet")
    sidecars: int = Field(description="sidecars planned (a RAW+JPEG pair shares one)")
    read: int
    missing: int
    unreadable: list[SidecarProblem] = Field(default_factory=list)
    embedded: int = Field(
        0, description="photos without a sidecar whose own file's XMP was read (a packet or none)"
    )
    embedded_packets: int = Field(0, description="...of them, files holding an XMP packet")
    embedded_unreadable: list[FileProblem] = Field(default_factory=list)
    absent: int = Field(0, description="photos with neither a sidecar nor their file")
    in_jpegs: int = Field(
        0,
        description="xmp=embed: of the sidecars planned, JPEGs whose XMP pick wrote into the "
        "file, read from there",
    )
    in_file: int = Field(
        0,
        description="sidecars still holding keeper's rating whose photo's own XMP holds one "
        "(a person's, read in its place: Lightroom rates JPEG, TIFF and DNG in the file)",
    )
    in_file_unreadable: list[FileProblem] = Field(
        default_factory=list,
        description="photos beside keeper's sidecar whose own XMP could not be read (keeper's "
        "rating stands)",
    )
    persons_ratings: int = Field(
        description="sidecars or files' own XMP holding a rating a person gave"
    )
    decisions: dict[str, int] = Field(description="decisions the ratings make, by action")
    already_recorded: int = Field(description="decisions this client's standing ones hold")
    events: dict[str, int] = Field(description="events written, by action (undone aside)")
    undone: int = Field(
        0, description="undone events written: decisions of taken-back ratings, taken back"
    )
    offers: int = Field(description="offer rows written")
    warnings: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------
# plan: the run, its sidecars


@dataclass
class PickRun:
    """A finished ``keeper pick`` run as read back (``plan``): what feedback-from-xmp and unpick
    work from. ``mode`` and ``naming`` are the sidecars' (``--xmp``, ``--xmp-naming``)."""

    request_id: str
    summary: dict[str, Any]
    rows: dict[str, list[Any]]  # picks.parquet's columns (_COLUMNS + quality features)
    row_of: dict[str, int]  # image_uri -> row
    plans: list[SidecarPlan]
    mode: str
    naming: str


def _read_run(cfg: PickRunXmp) -> tuple[bytes, dict[str, Any], dict[str, list[Any]]]:
    try:
        raw = storage.read_bytes(storage.join(cfg.run, SUMMARY))
        table = storage.read_parquet(storage.join(cfg.run, PICKS))
    except StorageError as e:
        raise DataError(f"not a finished keeper pick run: {e}", source=cfg.run) from e
    try:
        summary = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{SUMMARY} is not JSON: {e}", source=cfg.run) from e
    if not isinstance(summary, dict) or not pick_run_complete(summary):
        status = summary.get("status") if isinstance(summary, dict) else None
        raise DataError(f"{SUMMARY} says the run did not finish ({status!r})", source=cfg.run)
    missing = [c for c in (*_COLUMNS, *FEATURE_NAMES) if c not in table.column_names]
    if missing:
        raise DataError(f"{PICKS} lacks columns {missing}", source=cfg.run)
    rows = {c: table.column(c).to_pylist() for c in (*_COLUMNS, *FEATURE_NAMES)}
    return raw, summary, rows


def _mode(cfg: PickRunXmp, summary: dict[str, Any]) -> str:
    """The sidecars' placement: given, or what the summary shows pick did."""
    if cfg.xmp is not None:
        return cfg.xmp
    if summary.get("xmp") in ("mirror", "beside", "embed"):
        return str(summary["xmp"])
    if summary.get("xmp") == "none":
        raise ConfigError(f"{cfg.run} was picked with xmp=none: it wrote no sidecars to read")
    if "xmp" in (summary.get("outputs") or {}):
        return "mirror"
    sidecars = summary.get("sidecars") or {}
    wrote = sidecars.get("written", 0) + sidecars.get("unchanged", 0)
    if wrote or (summary.get("counts") or {}).get("sidecars_failed"):
        return "beside"
    raise ConfigError(
        f"{cfg.run}/{SUMMARY} shows no sidecars (pick ran with xmp=none?): give xmp=beside or "
        "xmp=mirror if it wrote them"
    )


def run_input_root(cfg: PickRunXmp, summary: dict[str, Any], uris: list[str]) -> str:
    """The folder pick mirrored from: its input folder, or for a manifest the deepest folder
    holding every input (picked or failed: pick's ``input_root``)."""
    if cfg.input_root is not None:
        return cfg.input_root.rstrip("/")
    if summary.get("xmp_root"):
        return str(summary["xmp_root"])
    from keeper_train.jobs.embed import MANIFEST_SUFFIXES
    from keeper_train.jobs.pick import common_folder

    source = str(summary.get("input", ""))
    if not source.lower().endswith(MANIFEST_SUFFIXES):
        return source.rstrip("/")
    failed: list[str] = []
    path = storage.join(cfg.run, FAILED)
    if storage.exists(path):
        import io

        import pandas as pd

        frame = pd.read_csv(io.BytesIO(storage.read_bytes(path)))
        failed = frame["image_uri"].astype(str).tolist() if "image_uri" in frame else []
    return common_folder([*uris, *failed])


def plan(cfg: PickRunXmp) -> PickRun:
    """The run and one plan per sidecar, as pick placed them.

    Raises:
        DataError: not a finished pick run.
        ConfigError: the run wrote no sidecars and ``xmp`` is not given, or the sidecars'
            placement does not fit the run's images.
    """
    raw, summary, rows = _read_run(cfg)
    mode = _mode(cfg, summary)
    naming = _naming(cfg, summary)
    uris = [str(u) for u in rows["image_uri"]]
    row_of = {u: i for i, u in enumerate(uris)}
    if mode == "mirror":
        out_dir = (summary.get("outputs") or {}).get("xmp") or storage.join(cfg.run, "xmp")
        root = run_input_root(cfg, summary, uris)
    else:
        out_dir, root = None, ""
    plans = plan_sidecars(
        list(row_of),
        input_root=root,
        mode="mirror" if mode == "mirror" else "beside",  # embed: the others' beside them
        out_dir=out_dir,
        naming=naming,
        in_file=embeds_into if mode == "embed" else None,
    )
    return PickRun(run_request_id(raw), summary, rows, row_of, plans, mode, naming)


def _naming(cfg: PickRunXmp, summary: dict[str, Any]) -> Literal["basename", "full"]:
    if cfg.xmp_naming is not None:
        return cfg.xmp_naming
    return "full" if summary.get("xmp_naming") == "full" else "basename"


# --------------------------------------------------------------------------------------------
# read: each sidecar's rating, and whether a person gave it


@dataclass
class _Sidecar:
    """A rating read: from the image's sidecar, or (none there) the XMP in its own file."""

    row: int  # the picks row of the image the sidecar belongs to
    rating: int  # what the sidecar shows (0: none)
    persons: bool  # a person gave it (not keeper's recorded value)
    value: str  # the rating's text, for the event id


def _int(text: str) -> int:
    try:
        n = float(text)  # "5" and "5.0" alike
    except ValueError:
        n = float("nan")
    if not n.is_integer() or not -1 <= n <= 5:
        raise ValueError(f"xmp:Rating {text!r} is not an integer in -1..5")
    return int(n)


def parse_rating(fields: dict[str, Any]) -> tuple[int, bool]:
    """The rating a sidecar shows (0 when none) and whether a person gave it.

    A person's is one keeper does not own (``handback.keeper_owns``, the rule by which keeper
    leaves it in place): different from keeper's record (``keeper:xmp``), or any rating in a
    sidecar without keeper's fields (rated before keeper ran). A rating removed since keeper
    set it reads as 0: no decision.

    Raises:
        ValueError: ``xmp:Rating`` is not an integer in -1..5.
    """
    now = fields.get(RATING_KEY)
    if now is None:
        return 0, False
    return _int(str(now)), not keeper_owns(fields, RATING_KEY)


def file_rating(image_uri: str) -> tuple[int, bool] | None:
    """The rating in the XMP packet inside the image file (0 when the packet has none) and
    whether a person gave it, or None when the file holds no packet.

    A rating other than 0 is a person's unless keeper owns it (``handback.keeper_owns``: the
    file still holds the value keeper recorded writing it with ``keeper pick --xmp embed``); an
    in-camera rating is a person's (see the module docstring).

    Raises:
        KeeperError: the file cannot be read, or its structure or packet is damaged
            (``keeper_core.embedded_xmp``).
        ValueError: ``xmp:Rating`` is not an integer in -1..5.
    """
    from keeper_core.embedded_xmp import read_embedded_xmp

    fields = read_embedded_xmp(image_uri)
    if fields is None:
        return None
    now = fields.get(RATING_KEY)
    if now is None:
        return 0, False
    rating = _int(str(now))
    return rating, rating != 0 and not keeper_owns(fields, RATING_KEY)


@dataclass
class _Read:
    sidecars: list[_Sidecar] = field(default_factory=list)  # sidecars' and files' ratings read
    read: int = 0  # sidecars read
    missing: int = 0
    unreadable: list[SidecarProblem] = field(default_factory=list)
    embedded: int = 0
    embedded_packets: int = 0
    embedded_unreadable: list[FileProblem] = field(default_factory=list)
    absent: int = 0
    in_file: int = (
        0  # of the sidecars read holding keeper's value, files with a rating of their own
    )
    in_file_unreadable: list[FileProblem] = field(default_factory=list)
    in_jpegs: int = 0  # xmp=embed: plans whose XMP is in the JPEG itself

    def add(self, other: _Read) -> None:
        """``other``'s counts added and its lists appended (every field, so none is forgotten)."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                mine.extend(theirs)
            else:
                setattr(self, f.name, mine + theirs)


def read_sidecars(run: PickRun, *, io_threads: int) -> _Read:
    """Each planned sidecar's rating, or where it is missing, the rating in the image file's own
    XMP; missing and unreadable ones counted, not fatal. Read on ``io_threads`` threads, one per
    plan (``storage.map_in_threads``; one at a time where every file is on a local disk:
    ``storage.io_threads_for``), and added up in the plans' order: the same as one at a time.
    """

    out = _Read()
    files = [u for p in run.plans for u in (p.sidecar_uri, p.image_uri)]
    threads = storage.io_threads_for(files, io_threads)
    progress = Progress("sidecars read", len(run.plans), log)
    for one in storage.map_in_threads(lambda p: _read_one(run, p), run.plans, threads):
        out.add(one)
        progress.step()
    progress.done()
    return out


def _read_one(run: PickRun, p: SidecarPlan) -> _Read:
    """One plan's sidecar (or its image file's XMP), into a ``_Read`` of its own: it runs on a
    worker thread, so it changes nothing shared (``run`` is only read)."""
    from keeper_core.handback import parse_xmp_packet

    out = _Read()
    if p.in_file:
        out.in_jpegs += 1
        _read_in_jpeg(run, p, out)
        return out
    try:
        # One request on S3 where an existence check and a read were two (three for a
        # missing sidecar): a million sidecars read back is a million requests fewer.
        data = storage.read_if_exists(p.sidecar_uri)
        if data is None:
            out.missing += 1
            _read_embedded(run, p, out)
            return out
        fields = parse_xmp_packet(data, p.sidecar_uri)
        rating, persons = parse_rating(fields)
    except StorageError as e:
        if _store_failure(e):
            raise
        out.unreadable.append(
            SidecarProblem(image_uri=p.image_uri, sidecar_uri=p.sidecar_uri, reason=str(e))
        )
        return out
    except (KeeperError, ValueError) as e:
        out.unreadable.append(
            SidecarProblem(image_uri=p.image_uri, sidecar_uri=p.sidecar_uri, reason=str(e))
        )
        return out
    out.read += 1
    if not persons and _beside_keepers(run, p, out):
        return out
    out.sidecars.append(_Sidecar(run.row_of[p.image_uri], rating, persons, str(rating)))
    return out


def _store_failure(e: StorageError) -> bool:
    """Whether a sidecar's read failed for the store, not the file: a missing bucket, access
    denied, an endpoint that does not answer or keeps failing after retries. The run stops
    there, as it did when an existence check asked first; a file that is there and cannot be
    read (a folder by that name, an object archived in Glacier) is one unreadable sidecar."""
    return storage.is_s3(e.uri) and (
        e.retryable or e.cause == "bucket does not exist" or e.cause.startswith("access denied")
    )


def _beside_keepers(run: PickRun, p: SidecarPlan, out: _Read) -> bool:
    """Whether the image file's own XMP holds a rating, read into ``out`` in place of the
    sidecar's: the sidecar still holds keeper's value, so a rating in the file is a person's
    (Lightroom writes a JPEG's, TIFF's or DNG's rating there and never reads its sidecar; other
    formats are not read here). A file that cannot be read leaves keeper's value standing, recorded in ``in_file_unreadable``.
    """
    if not p.image_uri.lower().endswith(IN_FILE_SUFFIXES):
        return False  # a RAW's or HEIC's rating goes to its sidecar: no need to read the file
    try:
        got = file_rating(p.image_uri) if storage.exists(p.image_uri) else None
    except (KeeperError, ValueError) as e:
        out.in_file_unreadable.append(FileProblem(image_uri=p.image_uri, reason=str(e)))
        return False
    if got is None or not got[1]:  # no packet, no rating, or keeper's own (an xmp=embed run's)
        return False
    rating = got[0]
    out.in_file += 1
    out.sidecars.append(_Sidecar(run.row_of[p.image_uri], rating, True, str(rating)))
    return True


def _read_embedded(run: PickRun, p: SidecarPlan, out: _Read) -> None:
    """The rating in the XMP packet of ``p``'s image file, into ``out``: only a packet read counts
    as a rating read (a file without one says nothing, as a missing sidecar says nothing)."""
    try:
        if not storage.exists(p.image_uri):
            out.absent += 1
            return
        got = file_rating(p.image_uri)
    except (KeeperError, ValueError) as e:
        out.embedded_unreadable.append(FileProblem(image_uri=p.image_uri, reason=str(e)))
        return
    out.embedded += 1
    if got is not None:
        out.embedded_packets += 1
        rating, persons = got
        out.sidecars.append(_Sidecar(run.row_of[p.image_uri], rating, persons, str(rating)))


def _read_in_jpeg(run: PickRun, p: SidecarPlan, out: _Read) -> None:
    """xmp=embed: the XMP pick wrote into ``p``'s JPEG, read as its sidecar would be. Its
    rating is a person's where it differs from keeper's record (Lightroom changed it in the
    file); a file without a packet is a missing sidecar (``embedded``), a missing file one too
    (``absent``), a damaged one an unreadable sidecar."""
    try:
        if not storage.exists(p.image_uri):
            out.missing += 1
            out.absent += 1
            return
        got = file_rating(p.image_uri)
    except (KeeperError, ValueError) as e:
        out.unreadable.append(
            SidecarProblem(image_uri=p.image_uri, sidecar_uri=p.image_uri, reason=str(e))
        )
        return
    if got is None:  # pick's write failed, or a tool has since dropped the packet
        out.missing += 1
        out.embedded += 1
        return
    out.read += 1
    rating, persons = got
    out.sidecars.append(_Sidecar(run.row_of[p.image_uri], rating, persons, str(rating)))


# --------------------------------------------------------------------------------------------
# decide: ratings -> decisions, per group


def decide(run: PickRun, sidecars: list[_Sidecar]) -> dict[int, str]:
    """picks row -> action, for each sidecar holding a person's rating that makes one.

    -1 is ``rejected``; a person's rating >= 1 is ``picked-as-keeper`` when it is above every
    other rating in its group (the person's or keeper's, as the photo tool shows them: a photo
    the person rated 5 beside keeper's 5 is not shown as the one keeper), else ``accepted``;
    0 (unrated) makes none.
    """
    by_group: dict[str, list[_Sidecar]] = {}
    for s in sidecars:
        by_group.setdefault(str(run.rows["group_id"][s.row]), []).append(s)
    out: dict[int, str] = {}
    for members in by_group.values():
        for s in members:
            if not s.persons or s.rating == 0:
                continue
            if s.rating == -1:
                out[s.row] = REJECTED
                continue
            top = all(s.rating > o.rating for o in members if o is not s)
            out[s.row] = KEEPER if top else ACCEPTED
    return out


# --------------------------------------------------------------------------------------------
# write: offers, then the events that change a standing decision


def _log(root: str, read: Any) -> Any:
    """A log's rows, or None where nothing was written yet (a fresh feedback root)."""
    if not storage.is_s3(root) and not storage.exists(root):
        return None  # an S3 prefix with no keys lists as empty
    if not storage.list_files(root):
        return None
    return read(root)


def _event_id(run: PickRun, client: str, image_id: str, action: str, value: str, n: int) -> str:
    key = "\x1f".join((run.request_id, client, image_id, action, value, str(n)))
    return "xmp-" + hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class _Written:
    events: Counter[str]
    already: int
    offers: int
    warnings: list[str]


@dataclass
class _Standing:
    """This client's events for the run: how many per image, and the decisions in force."""

    count: Counter[str] = field(default_factory=Counter)
    #: image_id -> the decisions an ``undone`` would uncover, oldest first, each with whether
    #: this job wrote it: the stack ``feedback.decisions`` folds, whose top is the standing one
    stack: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)


def _standing(log: Any, run: PickRun, client: str) -> _Standing:
    """Fold the log's events of ``client`` for the run as ``feedback.decisions`` does (oldest
    first; ``undone`` pops the decision before it)."""
    out = _Standing()
    if log is None:
        return out
    cols = log.select(["event_id", "request_id", "image_id", "client", "action"]).to_pylist()
    for r in cols:
        if r["request_id"] != run.request_id or r["client"] != client:
            continue
        image_id = str(r["image_id"])
        out.count[image_id] += 1
        stack = out.stack.setdefault(image_id, [])
        if r["action"] == "undone":
            if stack:
                stack.pop()
        else:
            stack.append((str(r["action"]), str(r["event_id"] or "").startswith("xmp-")))
    return out


def _actions(stack: list[tuple[str, bool]], target: str | None) -> list[str]:
    """The events that make ``stack``'s standing decision ``target`` (None: none of this job's).

    A new action supersedes the one before it (the latest stands); a taken-back rating pops
    every decision on top that this job wrote, down to one made elsewhere (the review page) or
    none.
    """
    top = stack[-1][0] if stack else None
    if target is not None:
        return [] if top == target else [target]
    ours = 0
    for _, mine in reversed(stack):
        if not mine:
            break
        ours += 1
    return ["undone"] * ours


def write_feedback(
    cfg: XmpFeedbackConfig, run: PickRun, sidecars: list[_Sidecar], chosen: dict[int, str]
) -> _Written:
    """Offers of the decided groups not offered yet, then the events that make this client's
    standing decisions of the images read say what their ratings now say (offers first: an
    event is never written without its offer).

    Raises:
        StorageError: the logs cannot be read or written.
    """
    events_root = storage.join(cfg.feedback, "events")
    offers_root = storage.join(cfg.feedback, "offers")
    standing = _standing(_log(events_root, read_feedback), run, cfg.client)
    value_of = {s.row: s.value for s in sidecars}
    ids = run.rows["image_id"]
    new: list[FeedbackEvent] = []
    already = 0
    # Every image a rating was read for: decided ones, and the ones whose rating decides nothing
    # now (taken back); an image not read (missing, unreadable) keeps what stands.
    for row in sorted(value_of):
        image_id = str(ids[row])
        target = chosen.get(row)
        actions = _actions(standing.stack.get(image_id, []), target)
        already += target is not None and not actions
        for k, action in enumerate(actions):
            n = standing.count[image_id] + k
            new.append(
                FeedbackEvent(
                    event_id=_event_id(run, cfg.client, image_id, action, value_of[row], n),
                    request_id=run.request_id,
                    image_id=image_id,
                    action=action,
                    group_id=str(run.rows["group_id"][row]),
                    client=cfg.client,
                )
            )
    offers, warnings = _new_offers(cfg, run, {str(run.rows["group_id"][r]) for r in chosen})
    if offers:
        offer_log = OfferLog(offers_root, writer=f"xmp-{_writer()}")
        offer_log.append_rows(offers)
        offer_log.flush(raise_errors=True)
    if new:
        event_log = FeedbackLog(events_root, writer=f"xmp-{_writer()}")
        event_log.append(new)
        event_log.flush(raise_errors=True)
    return _Written(Counter(e.action for e in new), already, len(offers), warnings)


def _writer() -> str:
    import uuid

    return uuid.uuid4().hex[:12]  # a part name no other writer uses


def _new_offers(
    cfg: XmpFeedbackConfig, run: PickRun, groups: set[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Offer rows of every image of ``groups`` the offers log does not hold for the run yet
    (the review page's, or an earlier run of this job)."""
    offered: set[tuple[str, str]] = set()
    log = _log(storage.join(cfg.feedback, "offers"), read_offers)
    if log is not None:
        cols = log.select(["request_id", "group_id", "image_id"]).to_pylist()
        offered = {
            (str(r["group_id"]), str(r["image_id"]))
            for r in cols
            if r["request_id"] == run.request_id
        }
    gids = run.rows["group_id"]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(gids):
        if str(g) in groups:
            members.setdefault(str(g), []).append(i)
    if not members:
        return [], []
    warnings: list[str] = []
    embeddings = None
    try:
        embeddings = _embeddings(run)
    except KeeperError as e:  # the decisions still count online; export skips them
        warnings.append(f"offers without embeddings (feedback-export cannot train on them): {e}")
    rows = pick_run_offers(
        run.rows,
        list(members.values()),
        request_id=run.request_id,
        summary=run.summary,
        client=cfg.client,
        embeddings=embeddings,
    )
    return [r for r in rows if (r["group_id"], r["image_id"]) not in offered], warnings


def _embeddings(run: PickRun) -> dict[str, Any]:
    """image_id -> embedding, from the table the run was picked from (the summary's table).

    Raises:
        DataError: the summary names no table, or it cannot be read.
    """
    from keeper_core.corpus import read_corpus

    table = run.summary.get("table")
    if not table:
        raise DataError(f"{SUMMARY} names no embedding table")
    corpus = read_corpus(str(table))
    return {k: corpus.embeddings[i] for i, k in enumerate(corpus.image_id)}


# --------------------------------------------------------------------------------------------
# The job: plan -> read -> decide -> write


def run(cfg: XmpFeedbackConfig) -> XmpFeedbackSummary:
    """Read the run's sidecars back and record the person's decisions; the summary.

    Raises:
        DataError: not a finished pick run.
        ConfigError: where the sidecars are cannot be told (see :func:`plan`).
        StorageError: the feedback logs cannot be read or written.
    """
    r = plan(cfg)
    got = read_sidecars(r, io_threads=cfg.io_threads)
    chosen = decide(r, got.sidecars)
    written = write_feedback(cfg, r, got.sidecars, chosen)
    made = Counter(chosen.values())
    return XmpFeedbackSummary(
        run=cfg.run,
        feedback=cfg.feedback,
        request_id=r.request_id,
        client=cfg.client,
        xmp=r.mode,
        xmp_naming=r.naming,
        photos=len(r.rows["image_id"]),
        sidecars=len(r.plans),
        read=got.read,
        missing=got.missing,
        unreadable=got.unreadable,
        embedded=got.embedded,
        embedded_packets=got.embedded_packets,
        embedded_unreadable=got.embedded_unreadable,
        absent=got.absent,
        in_jpegs=got.in_jpegs,
        in_file=got.in_file,
        in_file_unreadable=got.in_file_unreadable,
        persons_ratings=sum(s.persons for s in got.sidecars),
        decisions={a: made[a] for a in ACTIONS if a != "undone"},
        already_recorded=written.already,
        events={a: written.events[a] for a in ACTIONS if a != "undone"},
        undone=written.events["undone"],
        offers=written.offers,
        warnings=written.warnings,
    )


def describe(s: XmpFeedbackSummary) -> str:
    def by_action(c: dict[str, int]) -> str:
        return ", ".join(f"{v} {k}" for k, v in c.items() if v) or "none"

    lines = [
        f"keeper feedback-from-xmp: {s.run} ({s.request_id}, xmp={s.xmp}, {s.xmp_naming}) -> "
        f"{s.feedback} as client {s.client!r}",
        f"  sidecars  {s.sidecars} for {s.photos} photos: {s.read} read, {s.missing} missing, "
        f"{len(s.unreadable)} unreadable",
    ]
    lines += [f"            {p.sidecar_uri}: {p.reason}" for p in s.unreadable[:5]]
    if s.in_jpegs:
        lines.append(f"  in JPEGs  {s.in_jpegs} of them the XMP pick wrote into the JPEG itself")
    if s.missing:
        lines.append(
            f"  in files  {s.missing} photos without a sidecar: {s.embedded} read "
            f"({s.embedded_packets} with XMP), {len(s.embedded_unreadable)} unreadable, "
            f"{s.absent} not there"
        )
        lines += [f"            {p.image_uri}: {p.reason}" for p in s.embedded_unreadable[:5]]
    if s.in_file or s.in_file_unreadable:
        lines.append(
            f"  in files  {s.in_file} ratings in photos beside keeper's own sidecar values, "
            f"{len(s.in_file_unreadable)} unreadable"
        )
        lines += [f"            {p.image_uri}: {p.reason}" for p in s.in_file_unreadable[:5]]
    undone = f", {s.undone} undone" if s.undone else ""
    lines += [
        f"  ratings   {s.persons_ratings} a person's -> decisions: {by_action(s.decisions)}",
        f"  written   events: {by_action(s.events)}{undone} ({s.already_recorded} already "
        f"recorded); {s.offers} offer rows",
    ]
    lines += [f"  WARNING   {w}" for w in s.warnings]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.xmp_feedback --config FILE [key=value ...]``."""
    return job_main(
        argv,
        job="xmp_feedback",
        description=__doc__.split("\n")[0],
        model=XmpFeedbackConfig,
        run=run,
        describe=describe,
        exit_code=lambda _: 0,
        example="run=PICK_OUTPUT feedback=ROOT client=ana",
    )


if __name__ == "__main__":
    sys.exit(main())
