"""Every keeper job that writes an output folder refuses one another run is writing (it holds
OUTPUT/_LOCK.json: keeper_core.run_lock), before any work: exit 2, the holder named, nothing
written. No Ray: the refusal comes first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_xmp_feedback import _write_run

from keeper_core.cli import main as keeper
from keeper_core.run_lock import LOCK_NAME


def _held_by_another_host(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = {"keeper_lock": 1, "job": "keeper pick", "run": "feedc0ffee00", "host": "nas-01",
            "pid": 4242, "started": "2026-12-07T03:00:00+00:00",
            "renewed": "2026-12-07T03:00:00+00:00"}  # fmt: skip
    (folder / LOCK_NAME).write_text(json.dumps(body))


@pytest.mark.parametrize("job", ["embed", "pick"])
def test_a_job_on_an_output_another_run_writes_stops_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], job: str
) -> None:
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    _held_by_another_host(out)
    before = sorted(p.name for p in out.iterdir())

    assert keeper([job, "--input", str(photos), "--output", str(out)]) == 2

    err = capsys.readouterr().err
    assert f"keeper {job}: error: {out} is being written by another run: keeper pick" in err
    assert "host nas-01, pid 4242" in err
    assert f"remove {out / LOCK_NAME}" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written


def test_unpick_waits_for_no_pick_and_leaves_the_sidecars(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, photos = _write_run(tmp_path)
    sidecars = {p.name: p.read_bytes() for p in photos.glob("*.xmp")}
    _held_by_another_host(out)

    assert keeper(["unpick", "--run", str(out)]) == 2

    assert "is being written by another run: keeper pick" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in photos.glob("*.xmp")} == sidecars
    (out / LOCK_NAME).unlink()
    assert keeper(["unpick", "--run", str(out)]) == 0
    assert not list(photos.glob("*.xmp"))
    assert not (out / LOCK_NAME).exists()


#: The other writers: argv given the tmp folder, and the folder each one locks.
WRITERS = {
    "select": (["select", "--table", "{t}/table", "--queries", "{t}/q.yaml", "--output", "{t}/out"], "out"),
    "dedup": (["dedup", "--table", "{t}/table", "--output", "{t}/out"], "out"),
    "index": (["index", "--table", "{t}/table"], "table/index"),
    "export-embeddings": (["export-embeddings", "--table", "{t}/table", "--output", "{t}/out"], "out"),
    "feedback-export": (["feedback-export", "--feedback", "{t}/fb", "--output", "{t}/out"], "out"),
}  # fmt: skip


@pytest.mark.parametrize("verb", list(WRITERS))
def test_every_writer_refuses_an_output_another_run_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    argv, locked = WRITERS[verb]
    (tmp_path / "q.yaml").write_text("- name: cats\n  positive: [a cat]\n")
    _held_by_another_host(tmp_path / locked)

    assert keeper([a.format(t=tmp_path) for a in argv]) == 2

    err = capsys.readouterr().err
    assert f"{tmp_path / locked} is being written by another run: keeper pick" in err
    assert sorted(p.name for p in (tmp_path / locked).iterdir()) == [LOCK_NAME]
