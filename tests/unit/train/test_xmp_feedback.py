"""keeper feedback-from-xmp: ratings a person changed in a photo tool's sidecars of a pick run
become decisions and offers, once, that keeper feedback-export trains on.

The run is written as ``keeper pick`` writes it (``picks.parquet``, ``_SUMMARY.json``, the
embedding table, sidecars beside the photos by ``write_sidecar``), then the sidecars are edited
in their text as a photo tool does (``xmp:Rating="3"`` -> ``"5"``). No Ray.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keeper_core import storage
from keeper_core.cli import main as keeper
from keeper_core.feedback import decisions, read_feedback, read_offers, run_request_id
from keeper_core.handback import RECORD_KEY, plan_sidecars, write_sidecar
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs.embed import embedding_table
from keeper_train.jobs.xmp_feedback import XmpFeedbackConfig, parse_rating, run

ROOT = Path(__file__).resolve().parents[3]
SPEC, DIM = "keeper-tiny:random", 64
# (file, group, rank, decision, keeper's rating): IMG_1's RAW+JPEG pair shares IMG_1.xmp
PHOTOS = [
    ("IMG_1.CR2", "g0", 1, "keep", 5),
    ("IMG_1.JPG", "g0", 2, "alternate", 3),
    ("IMG_2.JPG", "g0", 3, "alternate", 3),
    ("IMG_3.JPG", "g0", 4, "reject", 1),
    ("IMG_4.JPG", "g1", 1, "keep", 5),
    ("IMG_5.JPG", "g1", 2, "alternate", 3),
    ("IMG_6.JPG", "g2", 1, "keep", 5),
    ("IMG_7.JPG", "g2", 2, "alternate", 3),
    ("IMG_8.JPG", "g2", 3, "reject", 1),
]


def _id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _write_run(tmp_path: Path) -> tuple[Path, Path]:
    """A pick run of PHOTOS with sidecars beside the photos; returns (run, photos)."""
    photos, out = tmp_path / "photos", tmp_path / "culls"
    photos.mkdir()
    out.mkdir()
    uris = [str(photos / f) for f, *_ in PHOTOS]
    n = len(PHOTOS)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, DIM))
    quality = {f: np.full(n, 0.5) for f in FEATURE_NAMES}
    quality["width"], quality["height"] = np.full(n, 640), np.full(n, 480)
    table = embedding_table(
        {
            "image_id": np.asarray([_id(f) for f, *_ in PHOTOS], dtype=object),
            "image_uri": np.asarray(uris, dtype=object),
            "embedding": emb / np.linalg.norm(emb, axis=1, keepdims=True),
            **quality,
        },
        SPEC,
    )
    storage.write_parquet(table, str(out / "table" / "embeddings" / "part-00000.parquet"))
    picks = {
        "group_id": [g for _, g, *_ in PHOTOS],
        "rank": [r for _, _, r, _, _ in PHOTOS],
        "decision": [d for *_, d, _ in PHOTOS],
        "rating": [r for *_, r in PHOTOS],
        "label": [None] * n,
        "score": [float(-r) for _, _, r, _, _ in PHOTOS],
        "reasons": [["sharpest"]] * n,
        "image_uri": uris,
        "file_name": [f for f, *_ in PHOTOS],
        "image_id": [_id(f) for f, *_ in PHOTOS],
        **quality,
    }
    pq.write_table(pa.table(picks), out / "picks.parquet")
    summary = {
        "status": "ok",
        "input": str(photos),
        "output": str(out),
        "table": str(out / "table"),
        "ranker": "zero-shot: sharpness + exposure",
        "clip_model": SPEC,
        "outputs": {"picks_parquet": str(out / "picks.parquet")},
        "sidecars": {"written": 8, "unchanged": 0, "skipped": 1, "kept_ratings": 0},
        "counts": {"sidecars_failed": 0},
    }
    (out / "_SUMMARY.json").write_text(json.dumps(summary))
    by_uri = dict(zip(uris, PHOTOS, strict=True))
    for plan in plan_sidecars(uris, input_root=str(photos), mode="beside", out_dir=None):
        _, group, rank, decision, rating = by_uri[plan.image_uri]
        write_sidecar(
            plan.sidecar_uri,
            rating=rating,
            label=None,
            keeper_fields={"group": group, "rank": str(rank), "decision": decision},
        )
    return out, photos


def _rate(sidecar: Path, old: int, new: int) -> None:
    """Change the rating in the file's text, as a photo tool writes it."""
    text = sidecar.read_text()
    assert f'xmp:Rating="{old}"' in text
    sidecar.write_text(text.replace(f'xmp:Rating="{old}"', f'xmp:Rating="{new}"'))


@pytest.fixture
def culled(tmp_path: Path) -> tuple[Path, Path]:
    """The run after the photographer's pass: IMG_2 up to keeper's 5 of IMG_1 (a tie), IMG_3
    rejected; IMG_5 up over IMG_4, IMG_4 down; IMG_6 untouched; IMG_7's sidecar deleted,
    IMG_8's overwritten by something that is not XMP."""
    out, photos = _write_run(tmp_path)
    _rate(photos / "IMG_2.xmp", 3, 5)
    _rate(photos / "IMG_3.xmp", 1, -1)
    _rate(photos / "IMG_5.xmp", 3, 5)
    _rate(photos / "IMG_4.xmp", 5, 2)
    (photos / "IMG_7.xmp").unlink()
    (photos / "IMG_8.xmp").write_bytes(b"\x00\x01 not xmp")
    return out, photos


def _standing(root: Path) -> dict[str, str]:
    d = decisions(read_feedback(str(root / "events"))).to_pylist()
    return {next(f for f, *_ in PHOTOS if _id(f) == r["image_id"]): r["action"] for r in d}


def test_a_persons_ratings_become_decisions_with_their_offers(
    culled: tuple[Path, Path], tmp_path: Path
) -> None:
    out, _ = culled
    root = tmp_path / "feedback"
    s = run(XmpFeedbackConfig(run=str(out), feedback=str(root), client="ana"))

    assert (s.xmp, s.photos, s.sidecars) == ("beside", 9, 8)  # the pair shares one
    assert (s.read, s.missing, len(s.unreadable)) == (6, 1, 1)
    assert s.unreadable[0].sidecar_uri.endswith("IMG_8.xmp")
    assert s.persons_ratings == 4
    assert s.decisions == {"accepted": 2, "rejected": 1, "picked-as-keeper": 1}
    assert s.events == s.decisions
    assert s.already_recorded == 0
    assert s.offers == 6  # every image of g0 (the JPEG too) and g1; none of g2
    assert s.warnings == []
    assert _standing(root) == {
        "IMG_2.JPG": "accepted",  # 5 beside keeper's 5 on IMG_1: not shown as the one
        "IMG_3.JPG": "rejected",
        "IMG_4.JPG": "accepted",
        "IMG_5.JPG": "picked-as-keeper",
    }
    events = read_feedback(str(root / "events")).to_pylist()
    request_id = run_request_id((out / "_SUMMARY.json").read_bytes())
    assert {(e["request_id"], e["client"]) for e in events} == {(request_id, "ana")}
    assert all(e["event_id"].startswith("xmp-") for e in events)
    offers = read_offers(str(root / "offers")).to_pylist()
    assert {o["route"] for o in offers} == {"review"}
    assert {o["request_id"] for o in offers} == {request_id}
    assert sorted((o["group_id"], o["rank"]) for o in offers) == [
        ("g0", 0),
        ("g0", 1),
        ("g0", 2),
        ("g0", 3),
        ("g1", 0),
        ("g1", 1),
    ]
    assert all(len(o["embedding"]) == DIM and o["model_spec"] == SPEC for o in offers)


def test_a_second_run_records_nothing_new_and_a_change_once(
    culled: tuple[Path, Path], tmp_path: Path
) -> None:
    out, photos = culled
    cfg = XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb"))
    run(cfg)
    again = run(cfg)
    assert again.events == {"accepted": 0, "rejected": 0, "picked-as-keeper": 0}
    assert (again.offers, again.already_recorded) == (0, 4)

    _rate(photos / "IMG_2.xmp", 5, 4)  # still accepted: nothing to record
    _rate(photos / "IMG_3.xmp", -1, 2)  # a reject taken back as accepted
    changed = run(cfg)
    assert changed.events == {"accepted": 1, "rejected": 0, "picked-as-keeper": 0}
    assert changed.offers == 0
    assert _standing(tmp_path / "fb")["IMG_3.JPG"] == "accepted"
    _rate(photos / "IMG_3.xmp", 2, -1)  # ...and back: a new event, not the first one's id
    assert run(cfg).events["rejected"] == 1
    assert _standing(tmp_path / "fb")["IMG_3.JPG"] == "rejected"
    assert read_feedback(str(tmp_path / "fb" / "events")).num_rows == 6


def test_full_naming_and_a_mirror_are_found_as_pick_placed_them(tmp_path: Path) -> None:
    out, photos = _write_run(tmp_path)
    for f, *_ in PHOTOS:  # darktable's IMG_1.CR2.xmp: each file its own
        write_sidecar(str(photos / f"{f}.xmp"), rating=3, label=None, keeper_fields={"g": "x"})
    _rate(photos / "IMG_1.JPG.xmp", 3, 5)
    s = run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb"), xmp_naming="full"))
    assert (s.sidecars, s.read, s.persons_ratings) == (9, 9, 1)
    assert s.decisions["picked-as-keeper"] == 1

    mirror = out / "xmp"
    summary = json.loads((out / "_SUMMARY.json").read_text())
    summary["outputs"]["xmp"] = str(mirror)
    (out / "_SUMMARY.json").write_text(json.dumps(summary))
    for f in ("IMG_2", "IMG_3"):
        (mirror).mkdir(exist_ok=True)
        (mirror / f"{f}.xmp").write_bytes((photos / f"{f}.xmp").read_bytes())
    _rate(mirror / "IMG_3.xmp", 1, -1)
    m = run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb2")))
    assert (m.xmp, m.read, m.missing) == ("mirror", 2, 6)
    assert m.events["rejected"] == 1


def test_what_the_summary_records_places_the_sidecars_without_flags(tmp_path: Path) -> None:
    # keeper pick records xmp, xmp_naming and the mirrored root in its summary.
    out, photos = _write_run(tmp_path)
    for f, *_ in PHOTOS:
        write_sidecar(str(photos / f"{f}.xmp"), rating=3, label=None, keeper_fields={"g": "x"})
    _rate(photos / "IMG_1.JPG.xmp", 3, 5)
    summary = json.loads((out / "_SUMMARY.json").read_text())
    summary.update(xmp="beside", xmp_naming="full", xmp_root=None)
    (out / "_SUMMARY.json").write_text(json.dumps(summary))
    s = run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb")))
    assert (s.xmp, s.xmp_naming, s.read, s.persons_ratings) == ("beside", "full", 9, 1)

    summary["xmp"] = "none"
    (out / "_SUMMARY.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="xmp=none"):
        run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb")))


def test_a_run_without_sidecars_needs_xmp_named(tmp_path: Path) -> None:
    out, _ = _write_run(tmp_path)
    summary = json.loads((out / "_SUMMARY.json").read_text())
    summary["sidecars"] = {"written": 0, "unchanged": 0, "skipped": 0, "kept_ratings": 0}
    (out / "_SUMMARY.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="xmp=beside"):
        run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb")))
    assert run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb"), xmp="beside"))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"Xmp.xmp.Rating": "5", RECORD_KEY: "5|"}, (5, False)),  # keeper's, unchanged
        ({"Xmp.xmp.Rating": "4", RECORD_KEY: "5|"}, (4, True)),  # changed by a person
        ({"Xmp.xmp.Rating": "-1", RECORD_KEY: "1|"}, (-1, True)),
        ({RECORD_KEY: "5|"}, (0, False)),  # removed: unrated, no decision
        ({"Xmp.xmp.Rating": "4"}, (4, True)),  # rated before keeper ran
        ({"Xmp.xmp.Rating": "4", "Xmp.keeper.group": "g"}, (4, False)),  # an older keeper's
        ({"Xmp.xmp.Rating": "3.0", RECORD_KEY: "3|Green"}, (3, False)),
        ({}, (0, False)),
    ],
)
def test_parse_rating(fields: dict[str, Any], expected: tuple[int, bool]) -> None:
    assert parse_rating(fields) == expected


def test_parse_rating_refuses_what_is_no_rating() -> None:
    for text in ("7", "2.5", "many"):
        with pytest.raises(ValueError, match=f"xmp:Rating '{text}' is not an integer"):
            parse_rating({"Xmp.xmp.Rating": text})


def _doc_commands() -> list[str]:
    """The keeper commands of docs/feedback.md's section on photo tools, in order."""
    text = (ROOT / "docs" / "feedback.md").read_text()
    section = text.split("## Decisions made in a photo tool", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for b in blocks for line in b.splitlines() if line.startswith("keeper ")]


def test_the_documented_commands_export_what_was_recorded(
    culled: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = culled
    places = {
        "~/culls/wedding": str(out),
        "~/keeper-feedback": str(tmp_path / "fb"),
        "~/fb-wedding": str(tmp_path / "export"),
    }
    commands = _doc_commands()
    verbs = [shlex.split(c)[1] for c in commands]
    assert verbs == ["pick", "feedback-from-xmp", "feedback-export", "train-head"]
    for command in commands[1:3]:  # pick and train-head are run in their own tests
        for doc, real in places.items():
            command = command.replace(doc, real)
        assert keeper(shlex.split(command)[1:]) == 0, command
    printed = capsys.readouterr().out
    assert "2 accepted, 1 rejected, 1 picked-as-keeper" in printed
    s = json.loads((tmp_path / "export" / "_SUMMARY.json").read_text())
    assert s["decisions"] == 4
    assert (s["series"], s["pairs"]) == (1, 1)  # g1's keeper; g0's accepted vs rejected
    assert s["model_spec"] == SPEC
