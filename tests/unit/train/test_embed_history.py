"""keeper embed re-run after re-run over a library that photo tools and people keep changing.

Random histories (seeded, so a failure replays; ``KEEPER_HISTORIES=400`` runs more): between
runs, files are added, copied (times kept or reset), moved, swapped, saved over with other
pictures or with another file's bytes, cut short (undecodable), rated by exiv2 (XMP saved into
the file), touched and deleted, and folders are renamed; names from a small pool come round
again; some runs are killed: in the pipeline after writing part of their rows, or at a write or
delete of the table while planning or summing up (before it, or just after). After every run that finishes,
whatever happened before it:

- every file listed has exactly one row, made from the content it holds now (``content_id``), with
  the stamp it has now, and an ``image_id`` that is the hash of some bytes that held that content;
  or, if it does not decode, exactly one failure, with the stamp it has now;
- a row whose file is not listed is one of a file removed since (kept unless ``prune``);
- a second plan straight after finds nothing to do and reads no image (a fixpoint);
- the counts add up.

The pipeline is stood in for by writing the rows (or failures) it would write for ``plan``'s todo
(Ray is never started): what is under test is what decides which files are embedded, copied, moved, restamped
and removed, the part every re-run of a large library goes through.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from support_jpeg import set_rating_as_a_tool_does

from keeper_core import storage
from keeper_core.embedded_xmp import content_digest
from keeper_core.errors import DataError
from keeper_train import table as table_mod
from keeper_train.jobs import embed
from keeper_train.jobs.embed import EmbedConfig, Execution, Plan, plan, summarise

SPEC = "keeper-tiny:random"
#: histories in the suite (a fifth of a second each); KEEPER_HISTORIES=400 looks further
SEEDS = int(os.environ.get("KEEPER_HISTORIES", "16"))


def picture(seed: int) -> bytes:
    """A small JPEG of its own (noise, so no two seeds share bytes or an end)."""
    rng = random.Random(seed)
    img = Image.new("RGB", (24, 16))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(384)])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Library:
    """A folder of photos and the history of what was done to it."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.clock = 1_700_000_000 * 10**9  # every write is a second after the last
        self.pictures = 0
        self.removed: set[str] = set()  # URIs a file was deleted or moved from
        self.hashes: dict[str, set[str]] = {}  # content_id -> sha256 of every file that held it
        self.log: list[str] = []
        for folder in ("card", "sorted"):
            (root / folder).mkdir(parents=True)

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())

    def _write(self, path: Path, data: bytes, mtime_ns: int | None = None) -> None:
        path.write_bytes(data)
        self._written(path, mtime_ns)

    def _written(self, path: Path, mtime_ns: int | None = None) -> None:
        """``path`` was written: its time set (the clock's, or ``mtime_ns``), its bytes noted."""
        self.clock += 10**9
        ns = self.clock if mtime_ns is None else mtime_ns
        os.utime(path, ns=(ns, ns))
        data = path.read_bytes()
        cid = content_digest(data, str(path))
        self.hashes.setdefault(cid, set()).add(hashlib.sha256(data).hexdigest())

    def _new_name(self, folder: str | None = None) -> Path:
        """A name not taken, from a small pool: a card's names come round again."""
        where = self.root / (folder or self.rng.choice(self.folders()))
        free = [p for p in (where / f"IMG_{k:04d}.JPG" for k in range(40)) if not p.exists()]
        return self.rng.choice(free) if free else where / f"IMG_{self.clock}.JPG"

    def folders(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def _fresh(self) -> bytes:
        """A new picture: a JPEG, or now and then a PNG (hashed whole: no metadata left out)."""
        self.pictures += 1
        data = picture(self.pictures)
        if self.rng.random() < 0.2:
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buf, "PNG")
            data = buf.getvalue()
        return data

    def step(self) -> None:
        """One thing a person or a photo tool does."""
        files = self.files()
        ops = ["new", "new"]
        if files:
            ops += ["copy", "copy_keep_time", "move", "save_over", "copy_over", "rate", "touch"]
            ops += ["swap", "rename_folder", "cut_short"]
        if len(files) > 1:  # a folder with no photo left is an error, not a run
            ops.append("delete")
        op = self.rng.choice(ops)
        f = self.rng.choice(files) if files else None
        what = ""
        if op == "new":
            dest = self._new_name()
            self._write(dest, self._fresh())
        elif op in ("copy", "copy_keep_time"):  # cp, cp -p
            assert f is not None
            dest = self._new_name()
            keep = f.stat().st_mtime_ns if op == "copy_keep_time" else None
            self._write(dest, f.read_bytes(), keep)
        elif op == "move":
            assert f is not None
            dest = self._new_name()
            f.rename(dest)  # the time goes with it
            self.removed.add(str(f))
        elif op == "save_over":  # an edit exported over the original
            assert f is not None
            dest = f
            self._write(f, self._fresh())
        elif op == "copy_over":  # another photo's bytes saved over this one (cp -p, time too)
            assert f is not None
            dest = self.rng.choice(files)
            if dest != f:
                self._write(dest, f.read_bytes(), f.stat().st_mtime_ns)
        elif op == "rate":  # a rating saved into the file, as exiv2 (Lightroom's XMP) does
            assert f is not None
            dest = f
            if decodes(f.read_bytes()):  # exiv2 will not write into a file cut short
                set_rating_as_a_tool_does(str(f), self.rng.randrange(1, 6))
                self._written(f)
        elif op == "cut_short":  # a copy that stopped halfway: the photo cannot be decoded
            assert f is not None
            dest = self._new_name() if self.rng.random() < 0.5 else f
            data = f.read_bytes()
            self._write(dest, data[: len(data) // 2])
        elif op == "touch":
            assert f is not None
            dest = f
            self.clock += 10**9
            os.utime(f, ns=(self.clock, self.clock))
        elif op == "swap":  # two names exchanged (mv a t; mv b a; mv t b): times go along
            assert f is not None
            dest = self.rng.choice(files)
            if dest != f:
                tmp = f.with_name("swap.tmp")
                f.rename(tmp)
                dest.rename(f)
                tmp.rename(dest)
        elif op == "rename_folder":  # a folder reorganised: every file in it moves
            assert f is not None
            folder = f.parent
            dest = folder.with_name(f"{folder.name.split('-')[0]}-{self.rng.randrange(1000)}")
            if not dest.exists():
                self.removed.update(str(g) for g in folder.iterdir())
                folder.rename(dest)
        else:
            assert f is not None
            dest = f
            f.unlink()
            self.removed.add(str(f))
        if f is not None:
            what = str(f.relative_to(self.root))
        self.log.append(f"{op} {what} -> {dest.relative_to(self.root) if dest else ''}")


class Killed(BaseException):
    """The process killed (``kill -9``) between two writes: nothing after it runs."""


class Kills:
    """Kills a run at its ``n``-th write or delete of the table (before it, or just after)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.left: int | None = None
        self.after = False
        self.fired = False
        for name in ("write_parquet", "write_bytes", "delete"):
            real = getattr(storage, name)

            def wrapped(*a: Any, real: Any = real, **kw: Any) -> Any:
                if self.left is not None:
                    self.left -= 1
                    if self.left == 0:
                        self.left, self.fired = None, True
                        if self.after:
                            real(*a, **kw)
                        raise Killed
                return real(*a, **kw)

            monkeypatch.setattr(storage, name, wrapped)

    def arm(self, rng: random.Random) -> None:
        self.left, self.after, self.fired = rng.randint(1, 3), rng.random() < 0.5, False

    def disarm(self) -> None:
        self.left = None


def decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except OSError:
        return False
    return True


def pipeline(dst: Path, p: Plan, todo: list[str], run: int) -> None:
    """What keeper embed's pipeline writes for ``todo``: a row for each file as it is now, or, for
    one that does not decode, a failure with its stamp."""
    good, bad = [], []
    for u in todo:
        (good if decodes(Path(u).read_bytes()) else bad).append(u)
    if good:
        ids = [embed.file_ids(Path(u).read_bytes(), u) for u in good]
        rows = {
            "image_uri": good,
            "image_id": [i for i, _ in ids],
            embed.CONTENT_ID: [c for _, c in ids],
            "file_size": [Path(u).stat().st_size for u in good],
            "file_mtime_ns": [Path(u).stat().st_mtime_ns for u in good],
        }
        part = dst / embed.EMBEDDINGS / f"part-{run:03d}.parquet"
        storage.write_parquet(pa.table(rows), str(part))
    failures = [
        embed._failure(u, p.run_id, "decode", "truncated", DataError("cut short"), retryable=False)
        for u in bad
    ]
    stamps = {
        "image_uri": np.array(bad, dtype=object),
        "file_size": np.array([Path(u).stat().st_size for u in bad], dtype=np.int64),
        "file_mtime_ns": np.array([Path(u).stat().st_mtime_ns for u in bad], dtype=np.int64),
    }
    embed.write_errors(str(dst / embed.ERRORS), failures, stamps=stamps)


def table(folder: Path) -> list[dict[str, Any]]:
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return []
    return storage.read_parquet(str(folder)).to_pylist()


def check(lib: Library, dst: Path, *, prune: bool) -> None:
    raw, failed = table(dst / embed.EMBEDDINGS), table(dst / embed.ERRORS)
    uris = [r["image_uri"] for r in raw]
    assert len(uris) == len(set(uris)), "a URI with two rows"
    rows = {r["image_uri"]: r for r in raw}
    listed = {str(f): f for f in lib.files()}
    for uri, f in listed.items():
        data, st = f.read_bytes(), f.stat()
        if not decodes(data):
            assert uri not in rows, f"{uri}: a row of a file that does not decode"
            mine = [r for r in failed if r["image_uri"] == uri]
            assert len(mine) == 1, f"{uri} does not decode: {len(mine)} failures"
            r = mine[0]
            assert (r["file_size"], r["file_mtime_ns"]) == (st.st_size, st.st_mtime_ns), uri
            continue
        assert all(r["image_uri"] != uri for r in failed), f"{uri} decodes and has a failure"
        assert uri in rows, f"{uri} has no row"
        r = rows[uri]
        assert r[embed.CONTENT_ID] == content_digest(data, uri), f"{uri}: a stale row"
        assert (r["file_size"], r["file_mtime_ns"]) == (st.st_size, st.st_mtime_ns), uri
        assert r["image_id"] in lib.hashes[r[embed.CONTENT_ID]], f"{uri}: image_id of no copy"
    extra = (set(rows) | {r["image_uri"] for r in failed}) - set(listed)
    assert extra <= lib.removed, f"rows of files never removed: {sorted(extra - lib.removed)}"
    if prune:
        assert not extra, f"prune left rows of removed files: {sorted(extra)}"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_every_run_leaves_one_row_per_file_made_from_what_it_holds(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    lib = Library(tmp_path / "lib", rng)
    dst = tmp_path / "out"
    prune, find_copies = seed % 2 == 0, seed % 3 != 0
    cfg = EmbedConfig(
        input=str(lib.root),
        output=str(dst),
        model=SPEC,
        prune=prune,
        max_prune_fraction=1.0,
        find_copies=find_copies,
    )
    read: list[str] = []  # photos read, whole or in part (not the table's own files)
    for name in ("read_bytes", "read_range", "read_head"):
        real = getattr(storage, name)

        def counting(uri: str, *a: Any, real: Any = real, **kw: Any) -> Any:
            if uri.startswith(str(lib.root)):
                read.append(uri)
            return real(uri, *a, **kw)

        monkeypatch.setattr(storage, name, counting)
    if seed % 4 == 1:  # the errors table compacted whenever it has more than two parts
        monkeypatch.setattr(table_mod, "COMPACT_OVER", 2)
    for _ in range(4):
        lib.step()
    kills = Kills(monkeypatch)
    for run in range(10):
        history = "\n".join(lib.log)
        if rng.random() < 0.1:  # killed while planning: rows removed or copied, parts deduped
            kills.arm(rng)
        try:
            p = plan(cfg)
        except Killed:
            lib.log.append(f"(run {run} killed in plan)")
            continue
        finally:
            kills.disarm()
        if rng.random() < 0.15:  # killed mid-pipeline: some parts written, no summary
            pipeline(dst, p, p.todo[: rng.randrange(len(p.todo) + 1)], run)
            lib.log.append(f"(run {run} killed in the pipeline)")
            continue
        pipeline(dst, p, p.todo, run)
        if rng.random() < 0.25:  # killed while summing up: twins, errors cleared, compaction
            kills.arm(rng)
        try:
            s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
        except Killed:
            lib.log.append(f"(run {run} killed in summarise)")
            continue
        finally:
            kills.disarm()
        c = s.counts
        assert c.lost == 0, history
        assert c.in_ == len(lib.files()) == c.attempted + c.skipped, history
        assert c.attempted == len(p.todo) + len(p.twins) == c.embedded + c.failed, history
        try:
            check(lib, dst, prune=prune)
        except AssertionError as e:
            raise AssertionError(f"after run {run}, history:\n{history}") from e
        read.clear()
        again = plan(cfg)
        assert (again.todo, again.twins, read) == ([], {}, []), history
        lib.log.append(f"(run {run})")
        for _ in range(rng.randrange(1, 6)):
            lib.step()
    shutil.rmtree(dst)  # and a first run over the library as it ended holds the same rows
    p = plan(cfg)
    pipeline(dst, p, p.todo, 0)
    summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    check(lib, dst, prune=True)
