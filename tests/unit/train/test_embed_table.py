"""keeper embed's plan and summary over a table written by earlier runs (Ray is never started).

Counts add up after retries (a success removes the image's error row), retryable failures are
retried by default, and a run reads each Parquet part of the table once.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image

from keeper_core import storage
from keeper_train import table as table_mod
from keeper_train.jobs import embed
from keeper_train.jobs.embed import EmbedConfig, Execution, plan, summarise

SPEC = "keeper-tiny:random"


@pytest.fixture
def corpus(tmp_path: Path) -> list[str]:
    """Four small PNGs: u1..u4 (their paths are the image URIs)."""
    uris = []
    for i in range(4):
        p = tmp_path / "in" / f"u{i + 1}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), (60 * i, 10, 10)).save(p)
        uris.append(str(p))
    return uris


def write_embedded(dst: Path, name: str, uris: list[str], *, stamped: bool = False) -> None:
    """Rows of ``uris``; ``stamped``: with their files' stamps now (as keeper embed writes them),
    else as a table written before stamps were kept."""
    cols: dict[str, list[Any]] = {"image_uri": uris}
    if stamped:
        stats = [Path(u).stat() for u in uris]
        cols["file_size"] = [s.st_size for s in stats]
        cols["file_mtime_ns"] = [s.st_mtime_ns for s in stats]
    storage.write_parquet(pa.table(cols), str(dst / embed.EMBEDDINGS / name))


def write_errors(dst: Path, name: str, rows: list[dict[str, Any]], *, legacy: bool = False) -> None:
    full = [
        {"stage": "read", "reason": "unreadable", "error": "x", "at": "2025-01-01T00:00:00+00:00"}
        | r
        for r in rows
    ]
    if legacy:  # written before the retryable column existed
        for r in full:
            r.pop("retryable", None)
        table = pa.Table.from_pylist(full)
    else:
        table = pa.Table.from_pylist(full, schema=embed.ERRORS_SCHEMA)
    storage.write_parquet(table, str(dst / embed.ERRORS / name))


def config(corpus: list[str], dst: Path, **over: Any) -> EmbedConfig:
    return EmbedConfig(input=str(Path(corpus[0]).parent), output=str(dst), model=SPEC, **over)


def error_uris(dst: Path) -> list[str]:
    folder = dst / embed.ERRORS
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return []
    return sorted(storage.read_parquet(str(folder)).column("image_uri").to_pylist())


def test_success_after_failure_clears_the_error_and_counts_add_up(
    corpus: list[str], tmp_path: Path
) -> None:
    u1, u2, u3, u4 = corpus
    dst = tmp_path / "out"
    write_embedded(dst, "part-a.parquet", [u1])
    write_errors(
        dst,
        "part-e.parquet",
        [
            # u1 failed in an earlier run and was embedded later: the error row is stale.
            {"image_uri": u1, "retryable": True, "run_id": "old"},
            {"image_uri": u2, "retryable": False, "run_id": "old", "reason": "truncated"},
            {"image_uri": u3, "retryable": True, "run_id": "old"},
        ],
    )
    cfg = config(corpus, dst)
    p = plan(cfg)
    assert p.errors_cleared == 1
    assert error_uris(dst) == [u2, u3]
    assert p.todo == [u3, u4]  # u3's failure was retryable; u2's (a corrupt file) was not
    assert (p.retried, p.failed_before) == (1, 1)

    # This run: u3 fails in a first task attempt, then Ray retries the task and it succeeds;
    # u4 is embedded at once.
    write_errors(dst, "part-f.parquet", [{"image_uri": u3, "retryable": True, "run_id": p.run_id}])
    write_embedded(dst, "part-b.parquet", [u3, u4])
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    c = s.counts
    assert (c.in_, c.already_embedded, c.failed_before, c.attempted) == (4, 1, 1, 2)
    assert (c.embedded, c.failed, c.lost) == (2, 0, 0)
    assert c.in_ == c.already_embedded + c.failed_before + c.attempted
    assert c.attempted == c.embedded + c.failed + c.lost
    assert c.errors_cleared == 3  # u1's stale row, and both of u3's (old and this run's)
    assert error_uris(dst) == [u2]  # never in both tables
    assert s.table == {
        "embedded": 3,
        "failed": 1,
        "parts": 2,
        "error_parts": 1,
        "error_parts_compacted": 0,
    }
    assert s.status == "failed"  # 1 of 4 failed: above the 5 % limit


def test_a_retried_failure_that_fails_again_is_counted_once(
    corpus: list[str], tmp_path: Path
) -> None:
    u1, *_ = corpus
    dst = tmp_path / "out"
    write_errors(dst, "part-e.parquet", [{"image_uri": u1, "retryable": True, "run_id": "old"}])
    cfg = config(corpus, dst, max_failure_fraction=0.5)
    p = plan(cfg)
    assert u1 in p.todo
    row = {
        "image_uri": u1,
        "retryable": True,
        "run_id": p.run_id,
        "at": "2026-01-01T00:00:00+00:00",
    }
    write_errors(dst, "part-f.parquet", [row])
    write_embedded(dst, "part-b.parquet", corpus[1:])
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    assert (s.counts.embedded, s.counts.failed, s.counts.lost) == (3, 1, 0)
    assert s.counts.retryable_failed == 1
    assert error_uris(dst) == [u1]  # the newer row stays, the older one is gone
    assert s.table["failed"] == 1


def test_a_failure_retried_into_the_part_it_came_from_is_counted(
    corpus: list[str], tmp_path: Path
) -> None:
    # An errors part is named by its URIs: retried with retry_errors and failing the same way
    # again, an image's new row replaces the part the plan read. It is this run's failure.
    u1, *rest = corpus
    dst = tmp_path / "out"
    write_errors(dst, "part-e.parquet", [{"image_uri": u1, "retryable": False, "run_id": "old"}])
    cfg = config(corpus, dst, retry_errors=True, max_failure_fraction=0.5)
    p = plan(cfg)
    assert p.todo == corpus
    row = {"image_uri": u1, "retryable": False, "run_id": p.run_id, "reason": "truncated"}
    write_errors(dst, "part-e.parquet", [row])  # the same name: rewritten
    write_embedded(dst, "part-b.parquet", rest)
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    c = s.counts
    assert (c.attempted, c.embedded, c.failed, c.lost) == (4, 3, 1, 0)
    assert s.errors_by_reason == {"truncated": 1}
    assert s.status == "ok"


def test_permanent_failures_are_retried_only_when_asked(corpus: list[str], tmp_path: Path) -> None:
    u1, u2, *_ = corpus
    dst = tmp_path / "out"
    write_errors(dst, "part-e.parquet", [{"image_uri": u1, "retryable": False, "run_id": "old"}])
    write_errors(dst, "part-l.parquet", [{"image_uri": u2, "run_id": "old"}], legacy=True)
    assert plan(config(corpus, dst)).todo == corpus[2:]  # a legacy row counts as permanent
    assert plan(config(corpus, dst, retry_errors=True)).todo == corpus


def test_a_run_reads_each_part_once(
    corpus: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "out"
    for i, u in enumerate(corpus[:3]):
        write_embedded(dst, f"part-{i}.parquet", [u], stamped=True)
    write_errors(dst, "part-e.parquet", [{"image_uri": corpus[3], "retryable": False}])
    reads: Counter[str] = Counter()
    real = storage.read_bytes

    def counting(uri: str, **kw: Any) -> bytes:
        if uri.endswith(".parquet"):
            reads[Path(uri).name] += 1
        return real(uri, **kw)

    monkeypatch.setattr(table_mod.storage, "read_bytes", counting)
    cfg = config(corpus, dst)
    p = plan(cfg)
    assert p.todo == []
    write_embedded(dst, "part-new.parquet", [str(tmp_path / "elsewhere.png")])
    summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    # Every part once; the part written after the plan once, by the summary.
    assert reads == Counter(
        {f"part-{i}.parquet": 1 for i in range(3)} | {"part-e.parquet": 1, "part-new.parquet": 1}
    )


def _many_small_error_parts(corpus: list[str], tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    """A table of 2 images embedded and ``n`` failed, each failure in its own errors part (as
    decode tasks write them), the first ten written before the ``retryable`` column existed."""
    dst = tmp_path / "out"
    write_embedded(dst, "part-a.parquet", corpus[:2])
    failed = [f"{tmp_path}/in/gone-{i:03d}.jpg" for i in range(n)]
    for i, u in enumerate(failed):
        row = {"image_uri": u, "retryable": False, "run_id": "old", "error": f"e{i}"}
        write_errors(dst, f"part-{i:03d}.parquet", [row], legacy=i < 10)
    return dst, failed


def test_an_errors_table_of_many_parts_is_rewritten_as_one(
    corpus: list[str], tmp_path: Path
) -> None:
    n = table_mod.COMPACT_OVER + 6
    dst, failed = _many_small_error_parts(corpus, tmp_path, n)
    before = storage.read_parquet(str(dst / embed.ERRORS)).to_pylist()
    cfg = config(corpus, dst)
    p = plan(cfg)
    write_embedded(dst, "part-b.parquet", corpus[2:])
    s = summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    assert (s.table["error_parts"], s.table["error_parts_compacted"]) == (1, n)
    assert len(list((dst / embed.ERRORS).glob("*.parquet"))) == 1
    after = storage.read_parquet(str(dst / embed.ERRORS))
    assert after.schema == embed.ERRORS_SCHEMA  # every column kept, the legacy parts' too
    rows = sorted(after.to_pylist(), key=lambda r: r["image_uri"])
    for r in before:
        if r["retryable"] is None:  # a legacy part's rows: read as not retryable
            r["retryable"] = False
    assert rows == sorted(before, key=lambda r: r["image_uri"])
    assert [r["error"] for r in rows] == [f"e{i}" for i in range(n)]

    again = plan(cfg)  # the next run reads one errors part and finds the same failures
    assert len(again.errors.by_part) == 1
    assert sorted(again.errors.rows()["image_uri"]) == sorted(failed)
    assert again.todo == []


def test_a_compaction_killed_before_its_deletes_loses_and_doubles_nothing(
    corpus: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = table_mod.COMPACT_OVER + 1
    # The new part's name sorts among the old ones' (a hash of the URIs did so by chance: a
    # flaky CI run), so the tie between its rows and theirs is decided by more than the name.
    monkeypatch.setattr(embed, "_part_name", lambda uris: "part-032z.parquet")
    dst, failed = _many_small_error_parts(corpus, tmp_path, n)
    cfg = config(corpus, dst)
    p = plan(cfg)

    def killed(uri: str) -> None:
        raise KeyboardInterrupt  # the run dies once the new part is written

    monkeypatch.setattr(table_mod.storage, "delete", killed)
    with pytest.raises(KeyboardInterrupt):
        summarise(cfg, p, Execution(tallies=[]), time.perf_counter())
    monkeypatch.undo()
    assert len(list((dst / embed.ERRORS).glob("*.parquet"))) == n + 1  # every row twice

    s = summarise(cfg, plan(cfg), Execution(tallies=[]), time.perf_counter())
    assert sorted(error_uris(dst)) == sorted(failed)  # each once
    assert s.table["failed"] == n
    c = s.counts
    assert c.in_ == c.already_embedded + c.failed_before + c.attempted
    assert len(list((dst / embed.ERRORS).glob("*.parquet"))) == 1


def test_a_library_named_another_way_is_not_embedded_again(
    corpus: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table embedded from `in/` (relative, as typed) is the same library as `/abs/in`: the
    plan finds every photo done, and a failure recorded under one spelling stays one."""
    monkeypatch.chdir(tmp_path)
    u1, u2, u3, u4 = corpus
    dst = tmp_path / "out"
    write_embedded(dst, "part-a.parquet", [f"in/{Path(u).name}" for u in (u1, u2)])
    write_errors(dst, "part-e.parquet", [{"image_uri": "in/u3.png", "retryable": False}])
    write_errors(dst, "part-r.parquet", [{"image_uri": "./in/u4.png", "retryable": True}])
    p = plan(config(corpus, dst))  # the input named absolute this time
    assert p.todo == [u4]  # u1, u2 embedded; u3 failed for good; u4's failure is retryable
    assert (p.failed_before, p.retried) == (1, 1)
    assert plan(config(corpus, dst, retry_errors=True)).todo == [u3, u4]


def test_error_rows_are_one_files_however_it_is_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Failed as lib/x.jpg (a run from the library's parent), failed again as /abs/lib/x.jpg:
    # one failure; then embedded under the absolute spelling: none. The rows were compared as
    # strings, and the old one stayed failed for ever (a job held at exit 3).
    from keeper_train.jobs import embed as embed_job
    from keeper_train.table import ErrorRows

    monkeypatch.chdir(tmp_path)
    folder = str(tmp_path / "errors")
    absolute = str(tmp_path / "lib" / "x.jpg")
    for uri in ("lib/x.jpg", absolute):
        row = embed_job._failure(
            uri, "r", "decode", "truncated", ValueError("cut"), retryable=False
        )
        embed_job.write_errors(folder, [row])
        time.sleep(0.002)
    errors = ErrorRows.read(folder)
    assert errors.dedupe() == 1
    assert ErrorRows.read(folder).rows()["image_uri"].tolist() == [absolute]  # the latest
    embed_job.write_errors(
        folder,
        [
            embed_job._failure(
                "lib/x.jpg", "r", "decode", "truncated", ValueError(), retryable=False
            )
        ],
    )
    errors = ErrorRows.read(folder)
    assert errors.remove({storage.same_key("./lib/x.jpg")}) == 2
    assert ErrorRows.read(folder).rows().empty


def test_rows_without_a_record_of_their_spec_refuse_another_spec(
    corpus: list[str], tmp_path: Path
) -> None:
    # A table copied without _KEEPER_TABLE.json: a run of another spec recorded its own and
    # mixed two specs' embeddings in one table.
    from support import write_embed_table

    from keeper_core.errors import DataError

    dst = tmp_path / "out"
    write_embed_table(dst, corpus[:1], spec="ViT-B-32:random")
    with pytest.raises(DataError, match=r"holds embeddings of \['ViT-B-32:random'\]"):
        plan(config(corpus, dst))
    assert not (dst / embed.TABLE_META).exists()
    write_embed_table(dst, corpus[:1], spec=SPEC)  # its own spec's rows: planned as ever
    assert plan(config(corpus, dst)).todo == corpus[1:]
