"""keeper_serve.review without Ray: a pick run read, paged and offered as the review page sees it.

Runs are written here as ``keeper pick`` writes them (``_SUMMARY.json``, ``picks.parquet``,
``thumbs/xx/<id>.jpg``); the real job's output is reviewed in a browser in
tests/integration/test_review_ui.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import PICK_RANKER, pick_image_id, write_pick_run

from keeper_core.contact_sheet import thumbnail_name
from keeper_core.errors import DataError
from keeper_core.feedback import OFFERS_SCHEMA
from keeper_serve.config import KeeperAppArgs, ReviewArgs
from keeper_serve.review import (
    ReviewRuns,
    RunUnusable,
    UnknownImage,
    UnknownRun,
    ranker_model,
    read_run,
    run_request_id,
)

RANKER = PICK_RANKER
write_run = write_pick_run
image_id = pick_image_id


def test_a_run_pages_by_group_in_time_order(tmp_path: Path) -> None:
    ids = write_run(tmp_path / "run", [3, 1, 2, 4], thumbs=9)
    run = read_run("demo", str(tmp_path / "run"))
    assert run.request_id == run_request_id((tmp_path / "run" / "_SUMMARY.json").read_bytes())
    assert run.request_id.startswith("run-")
    assert len(run.request_id) == 28
    assert run.info()["groups"] == 4
    assert run.info()["images"] == 10
    page = run.page(1, 2)
    assert page["total"] == 4
    assert page["offset"] == 1
    assert [g["group_id"] for g in page["groups"]] == ["g00001", "g00002"]
    g2 = page["groups"][1]
    assert [im["image_id"] for im in g2["images"]] == ids[4:6]
    assert g2["keeper"] == ids[4]
    assert g2["size"] == 2
    assert g2["images"][0]["thumb"] == f"/v1/review/runs/demo/thumbs/{ids[4]}"
    last = run.page(3, 50)["groups"][0]["images"]
    assert last[-1]["thumb"] is None  # the 10th image has no thumbnail
    assert run.page(4, 50)["groups"] == []


def test_groups_keep_first_appearance_order_and_row_order_inside(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [2, 2])
    t = pq.read_table(tmp_path / "run" / "picks.parquet")
    # Rows of two groups interleaved, in an order no sort by id gives: b first, then a.
    order = [2, 0, 3, 1]
    t = t.take(pa.array(order))
    t = t.set_column(0, "group_id", pa.array(["gb", "ga", "gb", "ga"]))
    pq.write_table(t, tmp_path / "run" / "picks.parquet")
    summary = json.loads((tmp_path / "run" / "_SUMMARY.json").read_text())
    digest = hashlib.sha256((tmp_path / "run" / "picks.parquet").read_bytes()).hexdigest()
    (tmp_path / "run" / "_SUMMARY.json").write_text(json.dumps({**summary, "picks_sha256": digest}))
    run = read_run("x", str(tmp_path / "run"))
    groups = run.page(0, 10)["groups"]
    assert [g["group_id"] for g in groups] == ["gb", "ga"]
    ids = t.column("image_id").to_pylist()
    assert [im["image_id"] for im in groups[0]["images"]] == [ids[0], ids[2]]


def test_thumbnails_only_of_the_runs_images(tmp_path: Path) -> None:
    ids = write_run(tmp_path / "run", [2], thumbs=1)
    run = read_run("demo", str(tmp_path / "run"))
    assert run.thumbnail_uri(ids[0]).endswith(thumbnail_name(ids[0]))
    with pytest.raises(UnknownImage, match="no thumbnail"):
        run.thumbnail_uri(ids[1])
    for bad in (image_id(99), "../../etc/passwd", ids[0].upper(), ids[0][:-1]):
        with pytest.raises(UnknownImage, match="has no image"):
            run.thumbnail_uri(bad)


def test_a_thumbnail_that_is_a_link_is_not_served(tmp_path: Path) -> None:
    # A link in a shared run folder where a thumbnail goes served any file the server reads.
    ids = write_run(tmp_path / "run", [2], thumbs=2)
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = ...")
    link = tmp_path / "run" / thumbnail_name(ids[1])
    link.unlink()
    link.symlink_to(secret)
    run = read_run("demo", str(tmp_path / "run"))
    assert run.thumbnail_uri(ids[0]).endswith(thumbnail_name(ids[0]))
    with pytest.raises(UnknownImage, match="is a link"):
        run.thumbnail_uri(ids[1])


def test_a_run_being_written_again_is_not_read_until_its_summary_lands(tmp_path: Path) -> None:
    # keeper pick writes picks.parquet first and its summary last: a replica reading in between
    # paired the old run's request id and ranker with the new run's rows.
    import shutil

    run = tmp_path / "run"
    write_run(run, [3, 2], finished="2026-12-01T10:00:00Z")
    old = ReviewRuns(ReviewArgs(runs={"r": str(run)}, check_s=0))
    first = old.get("r")
    write_run(tmp_path / "next", [2, 2, 2, 2], finished="2026-12-02T10:00:00Z")
    shutil.copy(tmp_path / "next" / "picks.parquet", run / "picks.parquet")
    new = ReviewRuns(ReviewArgs(runs={"r": str(run)}, check_s=0))  # a replica started now
    with pytest.raises(RunUnusable, match="keeper pick is writing it"):
        new.get("r")
    assert old.get("r") is first  # a replica that read it before serves what it read
    shutil.copy(tmp_path / "next" / "_SUMMARY.json", run / "_SUMMARY.json")  # the run finishes
    assert len(new.get("r").groups) == 4
    assert new.get("r").request_id != first.request_id


def test_offer_rows_fit_the_offers_schema(tmp_path: Path) -> None:
    ids = write_run(tmp_path / "run", [3, 2])
    run = read_run("demo", str(tmp_path / "run"))
    rows = run.offer_rows([1], client="ana")
    assert [r["image_id"] for r in rows] == ids[3:5]
    assert {r["route"] for r in rows} == {"review"}
    assert {r["arm"] for r in rows} == {None}
    assert rows[0]["model"] == "models:/keeper-ranker/3"
    assert [r["rank"] for r in rows] == [0, 1]  # offers count from 0
    assert [r["offered"] for r in rows] == ["keep", "reject"]
    assert rows[0]["group_size"] == 2
    assert rows[0]["client"] == "ana"
    stamp = {"event_id", "received_at", "seq", "writer"}
    assert set(rows[0]) == set(OFFERS_SCHEMA.names) - stamp


def test_offer_rows_carry_the_embeddings_given(tmp_path: Path) -> None:
    ids = write_run(tmp_path / "run", [2])
    run = read_run("demo", str(tmp_path / "run"))
    vec = np.array([0.6, 0.8], np.float32)
    rows = run.offer_rows([0], client=None, embeddings={ids[0]: vec})
    assert rows[0]["embedding"] == pytest.approx([0.6, 0.8])
    assert rows[1]["embedding"] is None  # not in the table: none, and feedback-export says so
    with pytest.raises(DataError, match="names no embedding table"):
        run.embeddings()  # this summary names no table


def test_ranker_model_names_a_version_or_keeps_the_rule() -> None:
    assert ranker_model(RANKER) == "models:/keeper-ranker/3"
    assert ranker_model("zero-shot: sharpness + exposure") == "zero-shot: sharpness + exposure"


def test_unusable_runs_say_why_and_the_others_serve(tmp_path: Path) -> None:
    write_run(tmp_path / "good", [2])
    write_run(tmp_path / "failed", [2], status="failed")
    (tmp_path / "half").mkdir()
    runs = ReviewRuns(
        ReviewArgs(
            runs={
                "good": str(tmp_path / "good"),
                "failed": str(tmp_path / "failed"),
                "half": str(tmp_path / "half"),
            }
        )
    )
    listing = {r["name"]: r for r in runs.listing()}
    assert listing["good"]["error"] is None
    assert listing["good"]["groups"] == 1
    assert "did not finish" in listing["failed"]["error"]
    assert "not a finished keeper pick run" in listing["half"]["error"]
    with pytest.raises(RunUnusable):
        runs.get("half")
    with pytest.raises(UnknownRun, match="configured"):
        runs.get("nope")
    assert ReviewRuns(None).listing() == []


def test_a_run_failed_only_for_unreadable_files_is_reviewed(tmp_path: Path) -> None:
    """A card with a few corrupt files: the run "failed" (over max_failure_fraction), yet every
    photo is picked or listed as failed and none lost, so its picks are reviewed; a run that
    lost photos is not."""
    folder = tmp_path / "run"
    write_run(folder, [2], status="failed")
    summary = json.loads((folder / "_SUMMARY.json").read_text())
    counts = {"in": 5, "picked": 2, "failed": 3, "lost": 0}
    whole = {**summary, "counts": counts, "embed": {"lost": 0}}
    (folder / "_SUMMARY.json").write_text(json.dumps(whole))
    assert read_run("card", str(folder)).rows["decision"] == ["keep", "reject"]
    lost = {**whole, "counts": {**counts, "picked": 1, "lost": 1}, "embed": {"lost": 1}}
    (folder / "_SUMMARY.json").write_text(json.dumps(lost))
    with pytest.raises(RunUnusable, match="did not finish"):
        read_run("card", str(folder))


def test_a_run_written_again_is_read_again(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    write_run(folder, [2])
    runs = ReviewRuns(ReviewArgs(runs={"r": str(folder)}, check_s=0))
    first = runs.get("r")
    assert runs.get("r") is first  # same summary: the same read
    write_run(folder, [2, 2, 2], finished="2026-12-02T10:00:00Z")
    second = runs.get("r")
    assert second.request_id != first.request_id
    assert len(second.groups) == 3
    # A rewrite in progress (summary gone) keeps the last good read serving.
    (folder / "_SUMMARY.json").unlink()
    assert runs.get("r") is second


def test_check_s_bounds_how_often_the_summary_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    write_run(folder, [2])
    runs = ReviewRuns(ReviewArgs(runs={"r": str(folder)}, check_s=3600))
    first = runs.get("r")
    write_run(folder, [2, 2], finished="2026-12-02T10:00:00Z")
    assert runs.get("r") is first  # not looked at again within check_s


def test_ten_thousand_images_in_pages(tmp_path: Path) -> None:
    write_run(tmp_path / "big", [4] * 2500, thumbs=0)
    run = read_run("big", str(tmp_path / "big"))
    assert run.info()["images"] == 10_000
    assert len(run.groups) == 2500
    seen = []
    for offset in range(0, 2500, 200):
        seen += [g["group_id"] for g in run.page(offset, 200)["groups"]]
    assert seen == [f"g{g:05d}" for g in range(2500)]
    page = run.page(2450, 50)
    assert sum(len(g["images"]) for g in page["groups"]) == 200
    assert all(im["thumb"] is None for g in page["groups"] for im in g["images"])


def test_review_needs_feedback_and_safe_run_names() -> None:
    with pytest.raises(ValueError, match="feedback is null"):
        KeeperAppArgs(review={"runs": {"demo": "/tmp/x"}})
    for bad in ("", "../x", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="review run name"):
            ReviewArgs(runs={bad: "/tmp/x"})
    with pytest.raises(ValueError, match="at least 1 item"):
        ReviewArgs(runs={})
