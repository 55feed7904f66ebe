"""keeper embed notices a photo saved over in place (Ray is never started).

A file's row keeps its stamp (size, mtime) and content digest. A re-run reads only the files whose
stamp changed: new content is embedded again (its old row removed first, so the table never holds
two rows of one file); the same content under a new stamp (a rating saved into a JPEG, a touch)
takes the new stamp and is not read again.
"""

from __future__ import annotations

import io
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from keeper_core import storage
from keeper_core.embedded_xmp import content_digest
from keeper_core.errors import ConfigError, DataError
from keeper_train import table as table_mod
from keeper_train.jobs import embed
from keeper_train.jobs.embed import EmbedConfig, Execution, plan, summarise

SPEC = "keeper-tiny:random"


def jpeg(colour: tuple[int, int, int], *, xmp: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return (
        data if xmp is None else with_segment(data, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp)
    )


def with_segment(data: bytes, marker: int, body: bytes) -> bytes:
    """``data`` (a JPEG) with one more segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body + data[2:]


@pytest.fixture
def library(tmp_path: Path) -> list[Path]:
    """Two JPEGs and a PNG, as a card's folder holds them."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "a.jpg").write_bytes(jpeg((200, 30, 30)))
    (lib / "b.jpg").write_bytes(jpeg((30, 200, 30)))
    Image.new("RGB", (32, 24), (30, 30, 200)).save(lib / "c.png")
    return sorted(lib.iterdir())


@pytest.fixture
def images_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files other than Parquet parts ``storage.read_bytes`` reads from now on, in order."""
    read: list[str] = []
    real = storage.read_bytes

    def counting(uri: str, **kw: Any) -> bytes:
        if not uri.endswith(".parquet"):
            read.append(uri)
        return real(uri, **kw)

    monkeypatch.setattr(storage, "read_bytes", counting)
    return read


def write_table(dst: Path, files: list[Path], *, stamps: bool = True, ids: bool = True) -> None:
    """Rows as keeper embed writes them for ``files`` as they are now (``stamps``/``ids`` False:
    as a table written before keeper kept them)."""
    rows: dict[str, list[Any]] = {"image_uri": [str(f) for f in files]}
    datas = [f.read_bytes() for f in files]
    rows["image_id"] = [embed.file_ids(d, str(f))[0] for d, f in zip(datas, files, strict=True)]
    if ids:
        rows[embed.CONTENT_ID] = [
            embed.file_ids(d, str(f))[1] for d, f in zip(datas, files, strict=True)
        ]
    if stamps:
        rows["file_size"] = [f.stat().st_size for f in files]
        rows["file_mtime_ns"] = [f.stat().st_mtime_ns for f in files]
    storage.write_parquet(pa.table(rows), str(dst / embed.EMBEDDINGS / "part-a.parquet"))


def later(f: Path, data: bytes | None = None) -> None:
    """Write ``data`` over ``f`` (or just touch it), its mtime a second later than before."""
    st = f.stat()
    if data is not None:
        f.write_bytes(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def table_rows(dst: Path) -> dict[str, dict[str, Any]]:
    t = storage.read_parquet(str(dst / embed.EMBEDDINGS)).to_pylist()
    return {r["image_uri"]: r for r in t}


def config(lib: list[Path], dst: Path, **over: Any) -> EmbedConfig:
    return EmbedConfig(input=str(lib[0].parent), output=str(dst), model=SPEC, **over)


def test_an_unchanged_library_reads_no_file(
    library: list[Path], tmp_path: Path, images_read: list[str]
) -> None:
    dst = tmp_path / "out"
    write_table(dst, library)
    p = plan(config(library, dst))
    assert p.todo == []
    assert images_read == []
    assert (len(p.changes.changed), p.changes.restamped, p.changes.stamped) == (0, 0, 0)


def test_a_photo_saved_over_is_embedded_again_and_its_old_row_goes(
    library: list[Path], tmp_path: Path
) -> None:
    a, b, c = library
    dst = tmp_path / "out"
    write_table(dst, library)
    old_id = table_rows(dst)[str(a)]["image_id"]
    later(a, jpeg((10, 10, 10)))  # an edit saved over the original
    Image.new("RGB", (32, 24), (1, 2, 3)).save(c)  # a card's reused name
    os.utime(c, ns=(0, c.stat().st_mtime_ns + 1_000_000_000))
    cfg = config(library, dst)
    p = plan(cfg)
    assert p.todo == [str(a), str(c)]
    assert p.changes.changed == {str(a), str(c)}
    assert list(table_rows(dst)) == [str(b)]  # removed before the run embeds them again
    # The run embeds them (their new rows, as the writer stage writes them): counts add up.
    storage.write_parquet(
        pa.table({"image_uri": [str(a), str(c)], "image_id": ["new-a", "new-c"]}),
        str(dst / embed.EMBEDDINGS / "part-b.parquet"),
    )
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    k = s.counts
    assert (k.in_, k.already_embedded, k.attempted, k.embedded, k.changed, k.lost) == (
        3,
        1,
        2,
        2,
        2,
        0,
    )
    assert table_rows(dst)[str(a)]["image_id"] == "new-a" != old_id
    assert s.table["embedded"] == 3  # one row per file, never two
    assert "2 file(s) changed since the last run" in embed.format_summary(s)


def test_metadata_saved_into_a_jpeg_or_a_touch_is_not_a_new_photo(
    library: list[Path], tmp_path: Path, images_read: list[str]
) -> None:
    a, b, c = library
    dst = tmp_path / "out"
    write_table(dst, library)
    before = table_rows(dst)
    packet = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><xmp:Rating>5</xmp:Rating></x:xmpmeta>'
    later(a, with_segment(a.read_bytes(), 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + packet))
    later(b, with_segment(b.read_bytes(), 0xFE, b"a comment"))
    later(c)  # touched: same bytes
    p = plan(config(library, dst))
    assert p.todo == []
    assert (p.changes.changed, p.changes.restamped) == (set(), 3)
    after = table_rows(dst)
    for f in library:  # the new stamp, the same row otherwise
        assert after[str(f)]["file_mtime_ns"] == f.stat().st_mtime_ns
        assert after[str(f)]["file_size"] == f.stat().st_size
        assert after[str(f)]["image_id"] == before[str(f)]["image_id"]
    # ... so the next run reads none of them again.
    images_read.clear()
    assert plan(config(library, dst)).changes.restamped == 0
    assert images_read == []


def test_a_table_from_before_stamps_is_stamped_once_then_watched(
    library: list[Path], tmp_path: Path
) -> None:
    a, b, _ = library
    dst = tmp_path / "out"
    write_table(dst, library, stamps=False, ids=False)
    p = plan(config(library, dst))
    assert (p.todo, p.changes.stamped) == ([], 3)  # changes before this run cannot be seen
    assert all(r["file_size"] is not None for r in table_rows(dst).values())
    later(a, jpeg((0, 0, 0)))
    later(b)  # same bytes: the row's image_id (sha256 of the whole file) still matches
    p = plan(config(library, dst))
    assert (p.todo, p.changes.restamped, p.changes.stamped) == ([str(a)], 1, 0)


def test_a_failed_file_replaced_is_tried_again(library: list[Path], tmp_path: Path) -> None:
    a, b, c = library
    dst = tmp_path / "out"
    write_table(dst, [b])
    failed = {
        "stage": "decode",
        "reason": "truncated",
        "error": "x",
        "retryable": False,
        "run_id": "old",
        "at": "2026-01-01T00:00:00+00:00",
    }
    st_a = a.stat()
    rows = [
        failed
        | {"image_uri": str(a), "file_size": st_a.st_size, "file_mtime_ns": st_a.st_mtime_ns},
        failed | {"image_uri": str(c)},  # failed before stamps were kept: not retried
    ]
    storage.write_parquet(
        pa.Table.from_pylist(rows, schema=embed.ERRORS_SCHEMA),
        str(dst / embed.ERRORS / "part-e.parquet"),
    )
    p = plan(config(library, dst))
    assert (p.todo, p.failed_before) == ([], 2)  # nothing changed: a corrupt file is not re-read
    later(a, jpeg((5, 5, 5)))  # the photographer copied a good file over the truncated one
    later(c, jpeg((6, 6, 6)))
    p = plan(config(library, dst))
    assert (p.todo, p.retried, p.failed_before, p.changes.changed) == ([str(a)], 1, 1, {str(a)})


def test_a_file_grown_past_the_limit_counts_as_changed(library: list[Path], tmp_path: Path) -> None:
    a, *_ = library
    dst = tmp_path / "out"
    write_table(dst, library)
    later(a, a.read_bytes() + b"\0" * 4096)
    p = plan(config(library, dst, max_bytes=2048, max_raw_bytes=2048))
    assert p.todo == [str(a)]  # its attempt fails as too_large, with the reason


def test_prepare_batch_keeps_the_stamp_and_content_id(library: list[Path], tmp_path: Path) -> None:
    a, b, _ = library
    b.write_bytes(b"not a photo")
    batch = {
        "image_uri": [str(a), str(b)],
        "file_size": [11, 12],
        "file_mtime_ns": [21, 22],
    }
    args = embed.prepare_arguments(config(library, tmp_path / "out"), str(tmp_path / "out"), "r")
    out = embed.prepare_batch(
        {k: pytest.importorskip("numpy").array(v) for k, v in batch.items()}, **args
    )
    assert list(out["image_uri"]) == [str(a)]
    assert (list(out["file_size"]), list(out["file_mtime_ns"])) == ([11], [21])
    assert list(out[embed.CONTENT_ID]) == [content_digest(a.read_bytes())]
    err = storage.read_parquet(str(tmp_path / "out" / embed.ERRORS)).to_pylist()
    assert [(r["image_uri"], r["file_size"], r["file_mtime_ns"]) for r in err] == [(str(b), 12, 22)]


def test_list_stamped_gives_each_file_its_size_and_mtime(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jpg").write_bytes(b"12345")
    (tmp_path / "y.jpg").write_bytes(b"1")
    got = storage.list_stamped(str(tmp_path))
    assert [(u, s.size) for u, s in got] == [
        (str(tmp_path / "d" / "x.jpg"), 5),
        (str(tmp_path / "y.jpg"), 1),
    ]
    assert got[1][1].mtime_ns == (tmp_path / "y.jpg").stat().st_mtime_ns
    assert [u for u, _ in got] == storage.list_files(str(tmp_path))


def test_update_rewrites_each_touched_part_once(tmp_path: Path) -> None:
    folder = tmp_path / "emb"
    for name, uris in (("part-a.parquet", ["u1", "u2"]), ("part-b.parquet", ["u3"])):
        storage.write_parquet(pa.table({"image_uri": uris, "image_id": uris}), str(folder / name))
    parts = table_mod.EmbeddedParts.read(str(folder))
    parts.update({"u1", "u3"}, {"u2": storage.Stamp(7, 8)})
    assert parts.by_part == {str(folder / "part-a.parquet"): ["u2"]}
    assert not (folder / "part-b.parquet").exists()
    assert storage.read_parquet(str(folder)).to_pylist() == [
        {"image_uri": "u2", "image_id": "u2", "file_size": 7, "file_mtime_ns": 8}
    ]
    assert list(parts.stamped()) == [("u2", (7, 8))]
    assert parts.ids({"u2", "u9"}) == {"u2": ("u2", None)}


def test_keepers_own_jpeg_writes_are_restamped_at_once(library: list[Path], tmp_path: Path) -> None:
    """``--xmp embed``: the rows of the JPEGs keeper wrote into take the stamps it wrote, so the
    next plan reads none of them; one changed by someone else since it was embedded does not."""
    from keeper_core.jpeg_xmp import write_jpeg_xmp

    a, b, _ = library
    dst = tmp_path / "out"
    write_table(dst, library)
    later(b, jpeg((1, 1, 1)))  # an edit after the embed, before keeper writes its XMP
    written = {}
    for f in (a, b):
        w = write_jpeg_xmp(str(f), rating=3, label=None, keeper_fields={"rank": "1"})
        assert w.stamp == (f.stat().st_size, f.stat().st_mtime_ns)
        assert w.content_id == content_digest(f.read_bytes())
        written[str(f)] = (w.stamp, w.content_id)
    folder = str(dst / embed.EMBEDDINGS)
    assert table_mod.restamp_written(folder, written) == 1
    assert table_mod.restamp_written(folder, written) == 0  # nothing left to do
    p = plan(config(library, dst))
    assert (p.todo, p.changes.restamped) == ([str(b)], 0)


def test_a_backfilled_thumbnail_is_named_by_the_rows_image_id(
    library: list[Path], tmp_path: Path
) -> None:
    """A JPEG keeper wrote its XMP into after it was embedded hashes to another sha256 than its
    row's image_id: its thumbnail goes under the row's id, where the contact sheet looks."""
    import pandas as pd

    from keeper_core.contact_sheet import thumbnail_name
    from keeper_train.jobs import pick

    a, *_ = library
    out = tmp_path / "picks"
    row_id = "0" * 64  # the id embed gave the file before keeper wrote into it
    pick.backfill_batch(
        pd.DataFrame({"image_uri": [str(a)], "image_id": [row_id]}), thumbnails=str(out)
    )
    assert (out / thumbnail_name(row_id)).is_file()


def test_a_run_with_a_limit_leaves_the_rows_past_it_alone(
    library: list[Path], tmp_path: Path
) -> None:
    *_, c = library
    dst = tmp_path / "out"
    write_table(dst, library)
    later(c, jpeg((9, 9, 9)))
    p = plan(config(library, dst, limit=1))  # this run's inputs: a only
    assert (p.todo, p.changes.changed) == ([], set())
    assert str(c) in table_rows(dst)  # the next run without a limit embeds it again
    assert plan(config(library, dst)).todo == [str(c)]


def test_a_photo_moved_or_renamed_keeps_its_row_under_the_new_name(
    library: list[Path], tmp_path: Path, images_read: list[str]
) -> None:
    a, b, _ = library
    dst = tmp_path / "out"
    write_table(dst, library)
    storage.write_parquet(  # the job's other columns, carried with the copy
        storage.read_parquet(str(dst / embed.EMBEDDINGS)).append_column(
            "sharpness", pa.array([1.5, 2.5, 3.5], pa.float32())
        ),
        str(dst / embed.EMBEDDINGS / "part-a.parquet"),
    )
    (a.parent / "2026").mkdir()
    moved = a.parent / "2026" / "IMG_a.jpg"
    a.rename(moved)  # a folder reorganised: same bytes, another name
    # A new photo of the size of b's row, after b was deleted: other content, embedded.
    size = b.stat().st_size
    b.unlink()
    other = jpeg((250, 250, 0))
    new = a.parent / "new.jpg"
    new.write_bytes(other[:size] if len(other) >= size else other + b"\0" * (size - len(other)))
    images_read.clear()
    cfg = config(library, dst)
    p = plan(cfg)
    assert p.todo == [str(new)]
    assert p.moved == 1
    # only the inputs of a missing row's size were read, each once
    assert sorted(images_read) == sorted([str(moved), str(new)])
    rows = table_rows(dst)
    assert rows[str(moved)]["image_id"] == embed.file_ids(moved.read_bytes(), str(moved))[0]
    assert str(a) not in rows  # the old name's row goes: the file is not in the folder
    assert rows[str(moved)]["sharpness"] == 1.5
    assert rows[str(moved)]["file_mtime_ns"] == moved.stat().st_mtime_ns
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    assert (s.counts.moved, s.counts.already_embedded, s.counts.attempted) == (1, 2, 1)
    assert "1 file(s) the table held under a name no longer listed" in embed.format_summary(s)
    assert plan(cfg).moved == 0  # the next run finds it embedded under its new name


def test_a_moved_photo_matches_an_older_row_by_its_bytes(
    library: list[Path], tmp_path: Path
) -> None:
    a, *_ = library
    dst = tmp_path / "out"
    write_table(dst, library, ids=False)  # rows from before content_id: image_id only
    moved = a.with_name("renamed.jpg")
    a.rename(moved)
    assert plan(config(library, dst)).moved == 1


def test_the_contact_sheet_says_what_changed_since_the_last_run() -> None:
    from keeper_train.jobs import pick

    base = dict.fromkeys(embed.Counts.model_fields, 0) | {"sample_problems": {}}
    counts = embed.Counts.model_validate({**base, "in": 10})
    assert pick.since_last_run(counts) is None
    note = pick.since_last_run(counts.model_copy(update={"changed": 3, "moved": 98}))
    assert note == (
        "since the last run: 3 photo(s) saved over in place, measured and judged again; "
        "98 photo(s) moved or renamed, found by their content (not embedded again)"
    )
    assert pick.since_last_run(counts.model_copy(update={"copied": 2})) == (
        "since the last run: 2 new photo(s) were copies of photos already embedded (their rows "
        "copied, not embedded again)"
    )
    assert pick.gone_note(counts) is None
    assert pick.gone_note(counts.model_copy(update={"gone": 2})) == (
        "2 photo(s) of earlier runs no longer in the folder (deleted, or on a disk not mounted): "
        "their rows stay in the table until a run with --prune"
    )
    assert pick.gone_note(counts.model_copy(update={"gone": 2, "pruned": 2})) == (
        "2 photo(s) of earlier runs no longer in the folder (deleted, or on a disk not mounted): "
        "their rows removed from the table (prune)"
    )


def test_the_files_read_to_compare_are_held_within_a_budget(
    library: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 RAW files of 100 MB read at once would hold 800 MB in the driver: the reads wait for
    room in ``_CHECK_BYTES`` (a file over it is read alone)."""
    import threading

    budgets: list[embed.ReadBudget] = []

    class Watched(embed.ReadBudget):
        def __init__(self, limit: int) -> None:
            super().__init__(limit)
            budgets.append(self)

    lib = tmp_path / "big"
    lib.mkdir()
    files = []
    for i in range(8):
        f = lib / f"{i}.jpg"
        f.write_bytes(jpeg((i, i, i)) + b"\0" * 3000)
        files.append(f)
    dst = tmp_path / "out"
    write_table(dst, files)
    for f in files:
        later(f)
    size = files[0].stat().st_size
    monkeypatch.setattr(embed, "ReadBudget", Watched)
    monkeypatch.setattr(embed, "_CHECK_BYTES", 2 * size + 10)
    slow = storage.read_bytes

    def read(uri: str, **kw: Any) -> bytes:
        if not uri.endswith(".parquet"):
            time.sleep(0.02)  # long enough for the 8 threads to pile up
        return slow(uri, **kw)

    monkeypatch.setattr(storage, "read_bytes", read)
    p = plan(config(files, dst))
    assert p.changes.restamped == 8
    assert budgets[0].peak <= 2 * size + 10
    assert budgets[0].held == 0
    # one file over the whole budget is read alone, not refused or deadlocked
    big = embed.ReadBudget(10)
    done = threading.Event()
    t = threading.Thread(target=lambda: (big.taken(5).__enter__(), done.set()), daemon=True)
    with big.taken(1_000):
        assert big.held == 10
        t.start()
        assert not done.wait(0.05)  # waits while the big one is held
    assert done.wait(5)
    t.join(5)


def error_row(dst: Path, uri: str) -> None:
    storage.write_parquet(
        pa.table({"image_uri": [uri], "reason": ["corrupt"], "retryable": [False]}),
        str(dst / embed.ERRORS / "part-e.parquet"),
    )


def test_files_gone_from_the_folder_are_counted_and_their_rows_kept(
    library: list[Path], tmp_path: Path
) -> None:
    a, b, c = library
    dst = tmp_path / "out"
    write_table(dst, library)
    b.unlink()
    cfg = config(library, dst)
    p = plan(cfg)
    assert (p.gone, p.pruned, p.todo) == (1, 0, [])
    assert set(table_rows(dst)) == {str(a), str(b), str(c)}  # a disk not mounted is no deletion
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    assert (s.counts.gone, s.counts.in_, s.counts.already_embedded) == (1, 2, 2)
    assert "1 file(s) of earlier runs under the input not found" in embed.format_summary(s)
    assert "prune=true removes them" in embed.format_summary(s)


def test_prune_removes_the_rows_of_files_gone_and_of_moved_files_old_names(
    tmp_path: Path,
) -> None:
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    (lib / "skip").mkdir()
    files = []
    for i in range(8):
        f = lib / ("sub" if i % 2 else ".") / f"{i}.jpg"
        f.write_bytes(jpeg((i * 30, 10, 10)))
        files.append(f.resolve())
    kept = lib / "skip" / "x.jpg"  # under an excluded folder: this run does not look there
    kept.write_bytes(jpeg((1, 1, 1)))
    outside = tmp_path / "elsewhere.jpg"  # another input's row, in the same table
    outside.write_bytes(jpeg((2, 2, 2)))
    dst = tmp_path / "out"
    write_table(dst, [*files, kept.resolve(), outside.resolve()])
    bad = lib / "sub" / "bad.jpg"
    error_row(dst, str(bad))  # a corrupt file that failed, deleted since
    files[0].unlink()
    moved = lib / "sub" / "renamed.jpg"
    files[1].rename(moved)
    cfg = config([files[0]], dst, prune=True, exclude=[str(lib / "skip")])
    cfg = cfg.model_copy(update={"input": str(lib)})
    p = plan(cfg)
    assert (p.todo, p.moved, p.gone, p.pruned) == ([], 1, 2, 2)
    rows = table_rows(dst)
    assert str(files[0]) not in rows
    assert str(files[1]) not in rows
    assert str(moved) in rows  # its row lives on under the new name
    assert {str(kept.resolve()), str(outside.resolve())} <= set(rows)
    assert table_mod.list_parts(str(dst / embed.ERRORS)) == []  # its one row gone, the part too
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    assert (s.counts.gone, s.counts.pruned, s.table["embedded"], s.table["failed"]) == (2, 2, 9, 0)
    assert "2 row(s) of files no longer listed removed" in embed.format_summary(s)
    again = plan(cfg)
    assert (again.gone, again.pruned, again.moved) == (0, 0, 0)


def test_prune_refuses_to_empty_a_folder_that_may_be_a_disk_not_mounted(
    tmp_path: Path,
) -> None:
    lib = tmp_path / "lib"
    (lib / "card").mkdir(parents=True)
    files = []
    for i in range(8):
        f = lib / ("card" if i < 3 else ".") / f"{i}.jpg"
        f.write_bytes(jpeg((i * 30, 50, 50)))
        files.append(f)
    dst = tmp_path / "out"
    write_table(dst, files)
    before = table_rows(dst)
    for f in files[:3]:
        f.unlink()
    (lib / "card").rmdir()  # 3 of 8 (38 %) gone: over the 25 % limit
    cfg = EmbedConfig(input=str(lib), output=str(dst), model=SPEC, prune=True)
    with pytest.raises(DataError, match=r"3 of the table's 8 rows .* \(38%, over") as e:
        plan(cfg)
    assert f"most under {lib / 'card'}/ (3)" in str(e.value)
    assert "max_prune_fraction=1" in str(e.value)
    assert table_rows(dst).keys() == before.keys()  # nothing removed
    assert plan(cfg.model_copy(update={"max_prune_fraction": 1.0})).pruned == 3
    assert len(table_rows(dst)) == 5


def test_prune_needs_a_listed_folder(library: list[Path], tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_uri\n" + "\n".join(str(f) for f in library) + "\n")
    cfg = EmbedConfig(input=str(manifest), output=str(tmp_path / "out"), model=SPEC, prune=True)
    with pytest.raises(ConfigError, match="manifest or WebDataset shards, which are not listed"):
        plan(cfg)


def test_a_run_with_a_limit_prunes_nothing_past_it(library: list[Path], tmp_path: Path) -> None:
    dst = tmp_path / "out"
    write_table(dst, library)
    p = plan(config(library, dst, limit=1, prune=True))
    assert (p.gone, p.pruned) == (0, 0)
    assert len(table_rows(dst)) == 3


def test_a_folder_reorganised_moves_its_rows(tmp_path: Path) -> None:
    """Every photo moved into dated folders: each row goes to its new name (none embedded again,
    none left under the old one); a row of another input's file, matched by a copy, stays."""
    lib = tmp_path / "lib"
    lib.mkdir()
    files = []
    for i in range(4):
        f = lib / f"{i}.jpg"
        f.write_bytes(jpeg((i * 60, 90, 90)))
        files.append(f)
    other = tmp_path / "other" / "x.jpg"  # another library's photo, in the same table
    other.parent.mkdir()
    other.write_bytes(jpeg((5, 200, 5)))
    dst = tmp_path / "out"
    write_table(dst, [*files, other])
    (lib / "2026").mkdir()
    for f in files:
        f.rename(lib / "2026" / f.name)
    (lib / "2026" / "x-copy.jpg").write_bytes(other.read_bytes())
    cfg = EmbedConfig(input=str(lib), output=str(dst), model=SPEC)
    p = plan(cfg)
    assert (p.moved, p.gone, p.todo) == (5, 0, [])
    assert sorted(table_rows(dst)) == sorted(
        [str(lib / "2026" / f.name) for f in files] + [str(lib / "2026" / "x-copy.jpg"), str(other)]
    )


def test_a_prune_over_its_limit_leaves_out_rows_whose_content_is_held_elsewhere(
    tmp_path: Path,
) -> None:
    """A table from the keeper before moved rows were moved (it copied them, keeping the old
    name's row too): half its rows are old names. Over the limit by count, but their content is
    in the table under the new names: pruned, not refused."""
    lib = tmp_path / "lib"
    (lib / "2026").mkdir(parents=True)
    files = []
    for i in range(4):
        f = lib / f"{i}.jpg"
        f.write_bytes(jpeg((i * 60, 90, 90)))
        files.append(f)
    dst = tmp_path / "out"
    write_table(dst, files)
    for f in files:
        f.rename(lib / "2026" / f.name)
    new = [lib / "2026" / f.name for f in files]
    rows = storage.read_parquet(str(dst / embed.EMBEDDINGS))
    copies = rows.set_column(0, "image_uri", pa.array([str(f) for f in new]))
    storage.write_parquet(copies, str(dst / embed.EMBEDDINGS / "part-b.parquet"))
    cfg = EmbedConfig(input=str(lib), output=str(dst), model=SPEC, prune=True)
    p = plan(cfg)
    assert (p.moved, p.gone, p.pruned) == (0, 4, 4)
    assert sorted(table_rows(dst)) == sorted(str(f) for f in new)


def test_thumbnails_of_photos_the_table_no_longer_holds_are_removed(tmp_path: Path) -> None:
    from keeper_train.jobs import pick

    out = tmp_path / "out"
    kept, stale = "ab" * 32, "cd" * 32
    for name in (f"thumbs/ab/{kept}.jpg", f"thumbs/cd/{stale}.jpg", "thumbs/README.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    have = pick._thumbnails(str(out))
    assert pick.remove_stale_thumbnails(str(out), have, [kept]) == 1
    assert have == {f"thumbs/ab/{kept}.jpg", "thumbs/README.txt"}
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["README.txt", f"{kept}.jpg"]
    assert pick.remove_stale_thumbnails(str(out), have, [kept]) == 0


def test_a_copy_of_a_photo_the_table_holds_is_not_embedded_again(
    library: list[Path], tmp_path: Path, images_read: list[str]
) -> None:
    a, b, _ = library
    dst = tmp_path / "out"
    write_table(dst, library)
    (a.parent / "import-2").mkdir()
    copy = a.parent / "import-2" / a.name  # the card imported twice
    copy.write_bytes(a.read_bytes())
    other = a.parent / "import-2" / "new.jpg"  # a new photo of b's size: not a copy
    data = jpeg((250, 250, 0))
    size = b.stat().st_size
    other.write_bytes(data[:size] if len(data) >= size else data + b"\0" * (size - len(data)))
    images_read.clear()
    cfg = config(library, dst)
    p = plan(cfg)
    assert (p.todo, p.copied, p.moved) == ([str(other)], 1, 0)
    assert images_read == [str(copy)]  # the other's end is not b's: not read whole
    rows = table_rows(dst)
    assert rows[str(copy)]["image_id"] == rows[str(a)]["image_id"]  # both stay: both are there
    assert rows[str(copy)]["file_mtime_ns"] == copy.stat().st_mtime_ns
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    assert (s.counts.copied, s.counts.already_embedded, s.counts.attempted) == (1, 4, 1)
    assert "1 new file(s) held a photo the table holds" in embed.format_summary(s)


def test_a_file_ending_as_a_photo_does_is_read_whole_and_not_taken_for_it(
    tmp_path: Path, images_read: list[str]
) -> None:
    """Same size, same last 16 KB, other content: the end only decides what is read whole."""
    import random

    lib = tmp_path / "lib"
    lib.mkdir()
    tail = random.Random(0).randbytes(embed.COPY_TAIL_BYTES + 100)
    first, second = jpeg((10, 200, 10)), jpeg((200, 10, 200))
    width = max(len(first), len(second))
    old = lib / "old.jpg"
    old.write_bytes(first.ljust(width, b"\0") + tail)
    dst = tmp_path / "out"
    write_table(dst, [old])
    new = lib / "new.jpg"
    new.write_bytes(second.ljust(width, b"\0") + tail)
    images_read.clear()
    p = plan(EmbedConfig(input=str(lib), output=str(dst), model=SPEC))
    assert (p.todo, p.copied) == ([str(new)], 0)
    assert images_read == [str(new)]


def test_a_file_size_many_rows_share_is_not_read_for_copies(
    tmp_path: Path, images_read: list[str]
) -> None:
    """Uncompressed RAW frames are all one size: a new frame of that size is not read in the
    driver to look for a copy (it would be read twice), even when it is one."""
    lib = tmp_path / "lib"
    lib.mkdir()
    files = []
    for i in range(embed.COPY_SIZE_ROWS + 1):
        f = lib / f"{i}.jpg"
        f.write_bytes(jpeg((i * 40, 0, 0))[:600].ljust(600, b"\0"))
        files.append(f)
    dst = tmp_path / "out"
    write_table(dst, files)
    (lib / "copy.jpg").write_bytes(files[0].read_bytes())
    images_read.clear()
    p = plan(EmbedConfig(input=str(lib), output=str(dst), model=SPEC))
    assert (p.todo, p.copied) == ([str(lib / "copy.jpg")], 0)
    assert images_read == []


def test_copies_among_a_runs_new_photos_are_embedded_once(
    library: list[Path], tmp_path: Path, images_read: list[str]
) -> None:
    """A card imported into two folders before keeper ever ran: each photo is decoded and
    embedded once, and the copy gets its row (its own URI and stamp) once that row is written."""
    a, b, c = library
    (a.parent / "backup").mkdir()
    twins = {}
    for f in (a, c):
        t = a.parent / "backup" / f.name
        t.write_bytes(f.read_bytes())
        first, second = sorted([str(f), str(t)])  # the first by URI is embedded
        twins[second] = first
    other = a.parent / "backup" / "new.png"  # c's size, another photo: not a twin
    size = c.stat().st_size
    other.write_bytes(c.read_bytes()[: size - 20] + bytes(20))
    dst = tmp_path / "out"
    cfg = config(library, dst)
    p = plan(cfg)
    assert {t: w.of for t, w in p.twins.items()} == twins
    assert sorted(p.todo) == sorted([*twins.values(), str(b), str(other)])
    # other, whose end differs, is not read whole
    assert sorted(u for u in images_read if u.startswith(str(a.parent))) == sorted(
        [*twins, *twins.values()]
    )
    write_table(dst, [Path(u) for u in p.todo])  # what the pipeline writes
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    c_ = s.counts
    assert (c_.in_, c_.attempted, c_.embedded, c_.failed, c_.lost, c_.twins) == (6, 6, 6, 0, 0, 2)
    rows = table_rows(dst)
    for t, o in twins.items():
        assert rows[t]["content_id"] == rows[o]["content_id"]
        assert rows[t]["file_mtime_ns"] == Path(t).stat().st_mtime_ns
    assert "2 of the attempted held what another new file holds" in embed.format_summary(s)
    images_read.clear()
    assert plan(cfg).todo == []  # and the next run finds every file embedded
    assert [u for u in images_read if u.startswith(str(a.parent))] == []


def test_a_twin_of_a_photo_that_fails_gets_its_failure(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    bad = jpeg((9, 9, 9))[:-300]  # cut short
    (lib / "a.jpg").write_bytes(bad)
    (lib / "b.jpg").write_bytes(bad)
    dst = tmp_path / "out"
    cfg = EmbedConfig(input=str(lib), output=str(dst), model=SPEC)
    p = plan(cfg)
    assert p.todo == [str(lib / "a.jpg")]
    assert {t: w.of for t, w in p.twins.items()} == {str(lib / "b.jpg"): str(lib / "a.jpg")}
    failure = embed._failure(
        str(lib / "a.jpg"), p.run_id, "decode", "corrupt", DataError("truncated"), retryable=False
    )
    embed.write_errors(str(dst / embed.ERRORS), [failure])
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    assert (s.counts.attempted, s.counts.failed, s.counts.lost, s.counts.twins) == (2, 2, 0, 1)
    assert s.errors_by_reason == {"corrupt": 2}
    rows = {r["image_uri"]: r for r in storage.read_parquet(str(dst / embed.ERRORS)).to_pylist()}
    twin = rows[str(lib / "b.jpg")]
    assert (twin["stage"], twin["retryable"]) == ("decode", False)
    assert twin["error"] == f"the same content as {lib / 'a.jpg'}, which failed: truncated"
    assert twin["file_size"] == (lib / "b.jpg").stat().st_size
    assert plan(cfg).todo == []  # not retried: a corrupt file is not read again unless asked


def test_new_files_of_a_size_many_share_are_not_read_for_twins(
    tmp_path: Path, images_read: list[str]
) -> None:
    """A camera's fixed-size RAW frames all share a size: a first run reads none of them in the
    driver, copies or not."""
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(embed.TWIN_SIZE_INPUTS):
        (lib / f"{i}.jpg").write_bytes(jpeg((i * 20, 0, 0))[:600].ljust(600, b"\0"))
    (lib / "copy.jpg").write_bytes((lib / "0.jpg").read_bytes())
    p = plan(EmbedConfig(input=str(lib), output=str(tmp_path / "out"), model=SPEC))
    assert (len(p.todo), p.twins) == (embed.TWIN_SIZE_INPUTS + 1, {})
    assert images_read == []


def test_a_twin_differing_in_metadata_only_keeps_its_own_image_id(
    tmp_path: Path, images_read: list[str]
) -> None:
    """Two files of one photo, rated differently (an XMP packet of the same length): one
    content, embedded once; each row holds its own file's sha256."""
    import numpy as np

    lib = tmp_path / "lib"
    lib.mkdir()
    buf = io.BytesIO()  # noise: larger than the end compared, so the XMP is not in it
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), np.uint8)).save(
        buf, "JPEG", quality=95
    )
    assert len(buf.getvalue()) > embed.COPY_TAIL_BYTES
    for name, rating in (("a.jpg", b"3"), ("b.jpg", b"5")):
        xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>Rating=" + rating + b"</x>"
        (lib / name).write_bytes(with_segment(buf.getvalue(), 0xE1, xmp))
    a, b = lib / "a.jpg", lib / "b.jpg"
    dst = tmp_path / "out"
    cfg = EmbedConfig(input=str(lib), output=str(dst), model=SPEC)
    p = plan(cfg)
    assert (p.todo, list(p.twins)) == ([str(a)], [str(b)])
    write_table(dst, [a])
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    assert (s.counts.embedded, s.counts.twins) == (2, 1)
    rows = table_rows(dst)
    assert rows[str(b)]["image_id"] == embed.file_ids(b.read_bytes())[0] != rows[str(a)]["image_id"]
    assert rows[str(b)]["content_id"] == rows[str(a)]["content_id"]


def test_find_copies_false_reads_nothing_to_look_for_copies(
    library: list[Path], tmp_path: Path, images_read: list[str]
) -> None:
    a, b, c = library
    dst = tmp_path / "out"
    write_table(dst, [a, b])
    (a.parent / "backup").mkdir()
    for f in (a, c):  # a copy of a row's file, and two copies of a new one
        (a.parent / "backup" / f.name).write_bytes(f.read_bytes())
    images_read.clear()
    p = plan(config(library, dst, find_copies=False))
    assert (len(p.todo), p.copied, p.twins) == (3, 0, {})
    assert [u for u in images_read if u.startswith(str(a.parent))] == []
    p = plan(config(library, dst))
    assert (len(p.todo), p.copied, len(p.twins)) == (1, 1, 1)


def test_a_copied_row_timed_by_its_files_mtime_takes_the_new_files(tmp_path: Path) -> None:
    """A photo with no EXIF time is timed by its file: its copy (another file, another mtime)
    is not timed by the original's. An EXIF time is the photo's, and travels with it."""
    folder = tmp_path / embed.EMBEDDINGS
    storage.write_parquet(
        pa.table(
            {
                "image_uri": ["/lib/a.png", "/lib/b.jpg"],
                "image_id": ["ia", "ib"],
                "file_size": [10, 20],
                "file_mtime_ns": [1, 2],
                "capture_time": ["2020-01-01T00:00:00+00:00", "2021-05-01T10:00:00"],
                "capture_ts": [1577836800.0, 1619863200.0],
                "time_source": ["mtime", "exif"],
            }
        ),
        str(folder / "part-a.parquet"),
    )
    parts = table_mod.EmbeddedParts.read(str(folder))
    when = 1_700_000_000_250_000_000  # 2023-11-14T22:13:20.25Z
    parts.copy_rows(
        {"/copy/a.png": "/lib/a.png", "/copy/b.jpg": "/lib/b.jpg"},
        {"/copy/a.png": storage.Stamp(10, when), "/copy/b.jpg": storage.Stamp(20, when)},
        "part-b.parquet",
        image_ids={"/copy/b.jpg": "ib2"},
    )
    rows = {r["image_uri"]: r for r in storage.read_parquet(str(folder)).to_pylist()}
    a, b = rows["/copy/a.png"], rows["/copy/b.jpg"]
    assert (a["capture_ts"], a["capture_time"]) == (
        1_700_000_000.25,
        "2023-11-14T22:13:20.250000+00:00",
    )
    assert (b["capture_ts"], b["capture_time"]) == (1619863200.0, "2021-05-01T10:00:00")
    assert (a["image_id"], b["image_id"], b["file_mtime_ns"]) == ("ia", "ib2", when)


def test_twins_left_by_a_killed_run_are_copied_by_the_next(
    library: list[Path], tmp_path: Path
) -> None:
    """Killed after the pipeline wrote the originals' rows, before their twins got theirs: the
    next run finds each twin a copy of a row, and embeds nothing."""
    a, _, c = library
    (a.parent / "backup").mkdir()
    for f in (a, c):
        (a.parent / "backup" / f.name).write_bytes(f.read_bytes())
    dst = tmp_path / "out"
    cfg = config(library, dst)
    p = plan(cfg)
    assert len(p.twins) == 2
    write_table(dst, [Path(u) for u in p.todo])  # the pipeline's rows; no summarise: killed
    again = plan(cfg)
    assert (again.todo, again.copied, again.twins) == ([], 2, {})
    assert set(table_rows(dst)) == {*p.todo, *p.twins}


def fail(dst: Path, p: embed.Plan, uris: list[str]) -> None:
    """What the pipeline writes for ``uris`` that do not decode: one part, each with its stamp."""
    rows = [
        embed._failure(u, p.run_id, "decode", "corrupt", DataError("truncated"), retryable=False)
        for u in uris
    ]
    stamps = {
        "image_uri": np.array(uris, dtype=object),
        **{
            c: np.array([p.stamps[u][k] for u in uris], dtype=np.int64)
            for k, c in enumerate(table_mod.STAMP_COLUMNS)
        },
    }
    embed.write_errors(str(dst / embed.ERRORS), rows, stamps=stamps)


def test_a_retried_failure_is_counted_whatever_part_it_lands_in(tmp_path: Path) -> None:
    """Two attempts at one file within a second: the errors table keeps the later one (its time
    is to the microsecond), not the one in the larger part, so the run's failure is counted."""
    lib = tmp_path / "lib"
    lib.mkdir()
    bad = jpeg((9, 9, 9))[:-300]
    for name in ("w.jpg", "x.jpg"):
        (lib / name).write_bytes(bad + name.encode())  # two corrupt files, not copies
    dst = tmp_path / "out"
    cfg = EmbedConfig(input=str(lib), output=str(dst), model=SPEC)
    p = plan(cfg)
    fail(dst, p, p.todo)  # one part of two rows
    assert summarise(cfg, p, Execution(tallies=[]), time.perf_counter()).counts.failed == 2
    later(lib / "x.jpg")  # its stamp changed: attempted again, alone, within the same second
    p = plan(cfg)
    assert p.todo == [str(lib / "x.jpg")]
    fail(dst, p, p.todo)
    c = summarise(cfg, p, Execution(tallies=[]), time.perf_counter()).counts
    assert (c.attempted, c.failed, c.lost) == (1, 1, 0)
    rows = storage.read_parquet(str(dst / embed.ERRORS)).to_pylist()
    x = [r for r in rows if r["image_uri"] == str(lib / "x.jpg")]
    assert [r["run_id"] for r in x] == [p.run_id]
    assert x[0]["file_mtime_ns"] == (lib / "x.jpg").stat().st_mtime_ns


def test_a_twin_failing_where_it_failed_before_is_counted(tmp_path: Path) -> None:
    """A corrupt file that failed alone gets a copy named before it and is touched: the copy is
    attempted, the file is its twin, and the twin's failure replaces its earlier one (a part of
    the same name), which the run must read back, not the part as the plan saw it."""
    lib = tmp_path / "lib"
    lib.mkdir()
    bad = jpeg((9, 9, 9))[:-300]
    (lib / "b.jpg").write_bytes(bad)
    dst = tmp_path / "out"
    cfg = EmbedConfig(input=str(lib), output=str(dst), model=SPEC)
    p = plan(cfg)
    fail(dst, p, p.todo)
    summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    (lib / "a.jpg").write_bytes(bad)
    later(lib / "b.jpg")
    p = plan(cfg)
    assert (p.todo, {t: w.of for t, w in p.twins.items()}) == (
        [str(lib / "a.jpg")],
        {str(lib / "b.jpg"): str(lib / "a.jpg")},
    )
    fail(dst, p, p.todo)
    c = summarise(cfg, p, Execution(tallies=[]), time.perf_counter()).counts
    assert (c.attempted, c.failed, c.twins, c.lost) == (2, 2, 1, 0)
    rows = storage.read_parquet(str(dst / embed.ERRORS)).to_pylist()
    assert sorted((r["image_uri"], r["run_id"]) for r in rows) == [
        (str(lib / "a.jpg"), p.run_id),
        (str(lib / "b.jpg"), p.run_id),
    ]


def test_an_image_whose_thumbnail_cannot_be_written_leaves_nothing_in_the_batch(
    tmp_path: Path,
) -> None:
    # Its pixels, hash and capture row were kept: every later image took its neighbour's
    # pixels, and Ray Data refused the uneven batch (the whole job failed, nothing written).
    from PIL import Image

    from keeper_core.contact_sheet import thumbnail_name
    from keeper_core.embedded_xmp import file_ids

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    uris = []
    for i, colour in enumerate(colours):
        path = tmp_path / "lib" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 48), colour).save(path, "JPEG")
        uris.append(str(path))
    thumbs = tmp_path / "thumbs"
    # A folder where the first image's thumbnail goes: its write fails.
    (thumbs / thumbnail_name(file_ids(Path(uris[0]).read_bytes())[0])).mkdir(parents=True)
    cfg = embed.EmbedConfig(
        input=str(tmp_path / "lib"), output=str(tmp_path / "out"), thumbnails=str(thumbs)
    )
    args = embed.prepare_arguments(cfg, str(tmp_path / "out"), "r")
    np = pytest.importorskip("numpy")
    out = embed.prepare_batch({"image_uri": np.array(uris, dtype=object)}, **args)
    assert list(out["image_uri"]) == uris[1:]
    n = {k: len(v) for k, v in out.items()}
    assert set(n.values()) == {2}, n  # every column one row per image kept
    means = out["pixel_values"].reshape(2, 3, -1).mean(axis=2)
    assert [int(np.argmax(m)) for m in means] == [1, 2]  # green, then blue: their own pixels
    err = storage.read_parquet(str(tmp_path / "out" / embed.ERRORS)).to_pylist()
    assert [(r["image_uri"], r["stage"], r["reason"]) for r in err] == [
        (uris[0], "thumbnail", "write_failed")
    ]


def test_thumbnails_kept_under_the_input_are_no_inputs(library: list[Path], tmp_path: Path) -> None:
    thumbs = library[0].parent / "thumbs"
    thumbs.mkdir()
    (thumbs / "ab12.jpg").write_bytes(jpeg((9, 9, 9)))  # one written by an earlier run
    p = plan(config(library, tmp_path / "out", thumbnails=str(thumbs)))
    assert sorted(p.inputs) == [str(x) for x in library]
