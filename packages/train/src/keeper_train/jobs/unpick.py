"""Take keeper's marks back out of a photo library: undo what a ``keeper pick`` run wrote into XMP.

    keeper pick --input ~/Pictures/wedding --output ~/culls/wedding --xmp beside
    keeper unpick --run ~/culls/wedding --dry-run    # what it would change, changing nothing
    keeper unpick --run ~/culls/wedding
    python -m keeper_train.jobs.unpick run=PICK_OUTPUT dry_run=true

    plan      the run's _SUMMARY.json and picks.parquet, and where its XMP went, as
              ``keeper feedback-from-xmp`` finds it (``xmp_feedback.plan``: pick's mode, naming
              and input root; a RAW+JPEG pair's one sidecar belongs to the RAW); with
              ``xmp=embed`` the JPEGs themselves, and a sidecar an earlier ``--xmp beside`` run
              left beside one (pick updated it too)
    remove    from each sidecar (``handback.remove_from_sidecar``) and each JPEG
              (``jpeg_xmp.remove_jpeg_xmp``): keeper's namespace (group, rank, decision,
              reasons, its record), and ``xmp:Rating`` / ``xmp:Label`` where they still hold
              what keeper set; a rating or label a person gave, before or after the run, stays,
              as does every other field. A sidecar left with nothing in it is deleted (keeper
              made it: the photo had none); a JPEG left with an empty packet loses its XMP
              segment, and is then byte for byte the file it was before keeper wrote into it.
              A file holding none of keeper's fields is not written.
    restamp   the run's embedding table learns the new stamps of the JPEGs rewritten (their
              pixels did not change), so the next ``keeper pick`` does not read them again

Every file is counted once: cleaned + deleted + untouched + absent + failed = files. A file that
cannot be changed (read-only, changed while read, not XMP exiv2 can parse) is listed with its
reason and the others are done; the exit code is then 1. ``--dry-run`` reads everything and
writes nothing. With ``xmp=mirror`` the mirrored sidecars are where pick wrote (under OUTPUT/xmp,
or the folder it was given, which may be the library's own), and they are undone the same way.
The run's tables and contact sheet are not touched: they are the record of what it decided;
delete the output folder to be rid of them. With ``keepers=true`` (``--keepers``) the run's
``--copy-keepers`` / ``--link-keepers`` folder is taken back too
(``handback.remove_keepers_export``): every copy its record names that is still byte for byte
what keeper wrote, every link to an original at its own path (any run's), and the folders that
leaves empty; a copy changed since, and a file keeper did not put there, stay and are listed.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from keeper_core import run_lock, storage
from keeper_core.corpus import EMBEDDINGS
from keeper_core.errors import ConfigError, KeeperError
from keeper_core.handback import XmpRemoval, name_key, remove_from_sidecar, remove_keepers_export
from keeper_core.jpeg_xmp import remove_jpeg_xmp
from keeper_core.progress import Progress
from keeper_train.config import job_main
from keeper_train.jobs.xmp_feedback import PickRun, PickRunXmp, plan, run_input_root
from keeper_train.table import restamp_written

log = logging.getLogger("keeper.unpick")

OUTCOMES = ("cleaned", "deleted", "untouched", "absent")


class UnpickConfig(PickRunXmp):
    """Everything ``keeper unpick`` takes. Unknown keys are errors."""

    dry_run: bool = Field(
        False, description="read every file and say what would change; write none"
    )
    keepers: bool = Field(
        False,
        description="also take back the run's --copy-keepers / --link-keepers folder: keeper's "
        "copies still as it made them (any run's, by its record), its links to the originals "
        "(any run's), and the folders that leaves empty; a copy changed since, and any other "
        "file, stay",
    )


class UnpickFailure(BaseModel):
    """A file whose keeper fields could not be removed, and why (it is left as it was)."""

    uri: str
    reason: str


class KeepersTaken(BaseModel):
    """What ``keepers=true`` took back from the run's keepers folder."""

    folder: str
    removed: int = Field(description="keeper's copies (still as it made them) and links")
    absent: int = Field(description="recorded or kept, and not there")
    left: list[UnpickFailure] = Field(
        default_factory=list, description="files left: changed since, or not keeper's"
    )
    folders_removed: int = Field(description="folders the removals left empty")
    record_problem: str | None = None


class UnpickSummary(BaseModel):
    """What ``keeper unpick`` did (or, with ``dry_run``, would do): ``files == cleaned +
    deleted + untouched + absent + len(failed)``."""

    run: str
    xmp: str
    xmp_naming: str
    dry_run: bool
    photos: int = Field(description="rows of picks.parquet")
    files: int = Field(
        description="the run's sidecars and JPEGs (with xmp=embed also each sidecar an earlier "
        "beside run left by a JPEG, where there is one)"
    )
    in_jpegs: int = Field(0, description="of the files, JPEGs whose own XMP pick wrote (embed)")
    cleaned: int = Field(description="keeper's fields removed, the rest of the file kept")
    deleted: int = Field(
        description="nothing else was in them: sidecars deleted, JPEGs' XMP segments removed"
    )
    untouched: int = Field(description="holding none of keeper's fields: not written")
    absent: int = Field(description="no sidecar there, or a JPEG without XMP (or no JPEG)")
    failed: list[UnpickFailure] = Field(default_factory=list)
    kept_ratings: int = Field(
        description="of the files changed, those where a person's rating or label stays"
    )
    restamped: int = Field(0, description="rows of the run's embedding table given new stamps")
    keepers: KeepersTaken | None = Field(None, description="with keepers=true: the folder's")


def _files(r: PickRun) -> list[tuple[str, bool, bool]]:
    """(uri, is a JPEG, counted only where it is there) of every file to look at."""
    files = [
        (p.image_uri, True, False) if p.in_file else (p.sidecar_uri, False, False) for p in r.plans
    ]
    if r.mode == "embed":
        # pick --xmp embed also updated a sidecar an earlier beside run left by a JPEG, where
        # no plan of its own owns that name
        seen = {name_key(p.sidecar_uri) for p in r.plans if not p.in_file}
        for p in r.plans:
            if p.in_file and name_key(p.sidecar_uri) not in seen:
                seen.add(name_key(p.sidecar_uri))
                files.append((p.sidecar_uri, False, True))  # most JPEGs have none
    return files


def run(cfg: UnpickConfig) -> UnpickSummary:
    """Remove keeper's fields from every file the run wrote XMP into; the summary.

    Raises:
        DataError: not a finished pick run.
        ConfigError: where the sidecars are cannot be told (``xmp_feedback.plan``).
        BusyError: a ``keeper pick`` (or another unpick) is writing the run (``run_lock``).
    """
    with run_lock.holding(cfg.run, job="keeper unpick"):
        return _run(cfg)


def _run(cfg: UnpickConfig) -> UnpickSummary:
    r = plan(cfg)
    dest = (r.summary.get("outputs") or {}).get("keepers")
    if cfg.keepers and not isinstance(dest, str):
        raise ConfigError(
            f"keepers=true, but {cfg.run} made no keepers folder (pick ran without "
            "--copy-keepers or --link-keepers)"
        )
    # The keepers' links first: a JPEG hard-linked into the keepers folder is refused a rewrite
    # (its other name would keep the old bytes) until that link is gone.
    taken, unlinked = (
        _take_keepers(cfg, r, dest) if cfg.keepers and isinstance(dest, str) else (None, [])
    )
    # a dry run removed no link: what it says of the JPEGs is what the real run will do
    links_going = Counter(unlinked) if cfg.dry_run else Counter[str]()
    files, mode, naming = _files(r), r.mode, r.naming
    durable = mode != "mirror"  # beside the originals, a sidecar may hold a person's edits

    def one(file: tuple[str, bool, bool]) -> XmpRemoval | UnpickFailure:
        uri, is_jpeg, _ = file
        try:
            if is_jpeg:
                return remove_jpeg_xmp(uri, dry_run=cfg.dry_run, links_going=links_going[uri])
            return remove_from_sidecar(uri, durable=durable, dry_run=cfg.dry_run)
        except KeeperError as e:
            return UnpickFailure(uri=uri, reason=str(e).removeprefix(f"{uri}: "))

    uris = [u for u, _, _ in files]
    threads = storage.io_threads_for(uris, cfg.io_threads, fsync=durable and not cfg.dry_run)
    outcomes: Counter[str] = Counter()
    failed: list[UnpickFailure] = []
    kept = 0
    rewritten: dict[str, tuple[storage.Stamp, str]] = {}
    progress = Progress("files", len(files), log)
    looked_at = len(files)
    for (uri, _, if_there), done in zip(
        files, storage.map_in_threads(one, files, threads), strict=True
    ):
        progress.step()
        if if_there and isinstance(done, XmpRemoval) and done.outcome == "absent":
            looked_at -= 1
            continue
        if isinstance(done, UnpickFailure):
            log.warning("%s left as it is: %s", uri, done.reason)
            failed.append(done)
            continue
        outcomes[done.outcome] += 1
        kept += int(bool(done.kept))
        if done.stamp is not None and done.content_id is not None:
            rewritten[uri] = (done.stamp, done.content_id)
    progress.done()
    restamped = _restamp(r.summary, rewritten)
    return UnpickSummary(
        run=cfg.run,
        xmp=mode,
        xmp_naming=naming,
        dry_run=cfg.dry_run,
        photos=len(r.rows["image_id"]),
        files=looked_at,
        in_jpegs=sum(p.in_file for p in r.plans),
        failed=failed,
        kept_ratings=kept,
        restamped=restamped,
        keepers=taken,
        **{o: outcomes[o] for o in OUTCOMES},
    )


def _take_keepers(cfg: UnpickConfig, r: PickRun, dest: str) -> tuple[KeepersTaken, list[str]]:
    """keepers=true: keeper's copies and links out of the run's keepers folder; the taken, and
    the originals whose hard links went."""
    uris = [str(u) for u in r.rows["image_uri"]]
    keepers = [u for u, d in zip(uris, r.rows["decision"], strict=True) if d == "keep"]
    done = remove_keepers_export(
        dest,
        keepers,
        input_root=run_input_root(cfg, r.summary, uris),
        dry_run=cfg.dry_run,
        io_threads=cfg.io_threads,
    )
    for path, why in done.left[:5]:
        log.warning("%s left as it is: %s", path, why)
    taken = KeepersTaken(
        folder=dest,
        removed=done.removed,
        absent=done.absent,
        left=[UnpickFailure(uri=p, reason=w) for p, w in done.left],
        folders_removed=done.folders_removed,
        record_problem=done.record_problem,
    )
    return taken, done.unlinked


def _restamp(summary: dict[str, Any], rewritten: dict[str, tuple[storage.Stamp, str]]) -> int:
    """Give the rows of the JPEGs rewritten their new stamps in the run's embedding table (as
    pick does after writing into them); a table that is gone or unreadable is only logged."""
    if not rewritten:
        return 0
    try:
        return restamp_written(storage.join(str(summary["table"]), EMBEDDINGS), rewritten)
    except (KeeperError, KeyError) as e:
        log.warning(
            "the run's embedding table was not restamped (%s): the next keeper pick reads the "
            "%d JPEGs changed again, and finds them unchanged",
            e,
            len(rewritten),
        )
        return 0


def describe(s: UnpickSummary) -> str:
    would = "would be " if s.dry_run else ""
    lines = [
        f"keeper unpick{' (dry run: nothing written)' if s.dry_run else ''}: {s.run} "
        f"(xmp={s.xmp}, {s.xmp_naming})",
        f"  files     {s.files} for {s.photos} photos"
        + (f" ({s.in_jpegs} of them JPEGs holding pick's XMP)" if s.in_jpegs else ""),
        f"  cleaned   {s.cleaned} {would}rewritten without keeper's fields, the rest kept"
        + (f" ({s.kept_ratings} with a person's rating or label left)" if s.kept_ratings else ""),
        f"  deleted   {s.deleted} {would}removed: nothing but keeper's fields in them (sidecars; "
        "a JPEG's XMP segment)",
        f"  untouched {s.untouched} without keeper's fields, {s.absent} not there",
        f"  failed    {len(s.failed)}",
    ]
    lines += [f"            {f.uri}: {f.reason}" for f in s.failed[:5]]
    if len(s.failed) > 5:
        lines.append(f"            ... and {len(s.failed) - 5} more")
    if s.restamped:
        lines.append(f"  table     {s.restamped} rows given the JPEGs' new stamps")
    if s.keepers is not None:
        k = s.keepers
        lines.append(
            f"  keepers   {k.removed} of keeper's copies and links {would}removed from "
            f"{k.folder}, {len(k.left)} left, {k.absent} not there"
            + (f"; {k.folders_removed} emptied folders removed" if k.folders_removed else "")
        )
        lines += [f"            {f.uri}: {f.reason}" for f in k.left[:5]]
        if k.record_problem:
            lines.append(f"            {k.record_problem}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.unpick --config FILE [key=value ...]``."""
    return job_main(
        argv,
        job="unpick",
        description=__doc__.split("\n")[0],
        model=UnpickConfig,
        run=run,
        describe=describe,
        exit_code=lambda s: 1 if s.failed else 0,
        example="run=PICK_OUTPUT dry_run=true",
    )


if __name__ == "__main__":
    sys.exit(main())
