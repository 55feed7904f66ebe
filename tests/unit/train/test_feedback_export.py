"""keeper feedback-export: decisions + offers (written with the core logs) -> series that
train-head's join takes; every decision used or skipped for a named reason."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from keeper_core.cli import main as keeper
from keeper_core.errors import DataError
from keeper_core.feedback import ROUTES, FeedbackEvent, FeedbackLog, OfferLog
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import QUALITY_INPUTS
from keeper_train.data import join_series
from keeper_train.jobs.feedback_export import (
    ROUTE_NAMES,
    SKIP_REASONS,
    FeedbackExportConfig,
    FeedbackExportSummary,
    run,
)

SPEC, OTHER_SPEC = "keeper-tiny:random", "ViT-B-32:openai"
DIM = 64  # keeper-tiny's width (ViT-B-32's is 512): an offer of another is skipped


def _offer(
    request_id: str,
    group_id: str | None,
    image_id: str,
    *,
    embedded: bool = True,
    route: str = "pick",
    spec: str = SPEC,
    image_uri: str | None = None,
    position: int = 0,
) -> dict[str, Any]:
    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    e = rng.normal(size=DIM if spec == SPEC else 512)
    q = rng.uniform(0.1, 1.0, size=len(FEATURE_NAMES))
    q[-2:] = (640, 480)  # width, height
    return {
        "request_id": request_id,
        "route": route,
        "client": "app",
        "model": "sharpness",
        "model_spec": spec,
        "group_id": group_id,
        "group_size": 4,
        "image_id": image_id,
        "image_uri": image_uri,
        "position": position,
        "rank": position,
        "score": 0.0,
        "offered": "candidate",
        "embedding": (e / np.linalg.norm(e)).astype(np.float32).tolist() if embedded else None,
        "quality": q.astype(np.float32).tolist() if embedded else None,
    }


def _group(request_id: str, group_id: str, ids: list[str], **kw: Any) -> list[dict[str, Any]]:
    return [_offer(request_id, group_id, i, position=p, **kw) for p, i in enumerate(ids)]


def _decide(root: Path, *events: tuple[str, str, str], client: str = "alice") -> None:
    """One flushed part of (request_id, image_id, action) events, in order."""
    log = FeedbackLog(str(root / "events"))
    log.append(
        [FeedbackEvent(request_id=r, image_id=i, action=a, client=client) for r, i, a in events],
        sync=True,
    )


def _offers(root: Path, rows: list[dict[str, Any]]) -> None:
    OfferLog(str(root / "offers")).append_rows(rows, sync=True)


def _export(root: Path, out: Path, **kw: Any) -> FeedbackExportSummary:
    return run(FeedbackExportConfig(feedback=str(root), output=str(out), **kw))


def _adds_up(s: FeedbackExportSummary) -> None:
    assert set(s.skipped) == set(SKIP_REASONS)
    assert s.used + sum(s.skipped.values()) == s.decisions


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Offers of seven answers and the decisions on them (see each group's comment)."""
    root = tmp_path / "feedback"
    photos = tmp_path / "photos"
    _offers(
        root,
        [
            # r1/g1: a keeper, b rejected, c undecided, d rejected but logged without embedding
            *_group("r1", "g1", ["a", "b", "c"]),
            _offer("r1", "g1", "d", embedded=False, position=3),
            # r2/g2: no keeper: e, g accepted; f, h rejected; h's rejection undone
            *_group("r2", "g2", ["e", "f", "g", "h"]),
            # r3/g3: i's keeper pick undone; j accepted, nothing rejected
            *_group("r3", "g3", ["i", "j", "k"]),
            # r4/g4: two keepers
            *_group("r4", "g4", ["l", "m", "n"]),
            # r5/g5: the keeper has no embedding
            _offer("r5", "g5", "o", embedded=False),
            *_group("r5", "g5", ["p", "q"]),
            # r6/g6: a keeper whose only neighbour has no embedding
            _offer("r6", "g6", "s"),
            _offer("r6", "g6", "t", embedded=False, position=1),
            # r9/g9 (decided last): c again, now with its file's URI, beside keeper u
            _offer("r9", "g9", "u"),
            _offer("r9", "g9", "c", image_uri=str(photos / "c.jpg"), position=1),
        ],
    )
    _decide(
        root,
        ("r1", "a", "picked-as-keeper"),
        ("r1", "b", "rejected"),
        ("r1", "d", "rejected"),
        ("r1", "zz", "accepted"),  # not offered in r1
        ("unknown", "a", "accepted"),  # no offers for this request
        ("r2", "e", "accepted"),
        ("r2", "f", "rejected"),
        ("r2", "g", "accepted"),
        ("r2", "h", "rejected"),
        ("r2", "h", "undone"),
        ("r3", "i", "picked-as-keeper"),
        ("r3", "i", "undone"),
        ("r3", "j", "accepted"),
        ("r4", "l", "picked-as-keeper"),
        ("r4", "m", "picked-as-keeper"),
        ("r5", "o", "picked-as-keeper"),
        ("r5", "p", "rejected"),
        ("r6", "s", "picked-as-keeper"),
    )
    _decide(root, ("r9", "u", "picked-as-keeper"))
    return root


def test_series_pairs_and_skips(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = _export(root, out)
    _adds_up(s)
    assert s.events == 19
    assert s.decisions == 15  # h and i undone; undo events are no decisions
    assert (s.series, s.pairs) == (2, 1)
    assert s.used == 5  # a, b (r1); e, f (pair); u (r9)
    assert {k: v for k, v in s.skipped.items() if v} == {
        "no_offers": 1,
        "not_offered": 1,
        "no_embedding": 1,  # d
        "unpaired": 2,  # g (no rejected partner left), j (nothing rejected)
        "several_keepers": 2,
        "keeper_no_embedding": 2,  # o and p
        "group_too_small": 1,  # s
    }

    manifest = pd.read_csv(out / "series.csv", keep_default_na=False)
    assert list(manifest.columns[:3]) == ["series_id", "image_uri", "is_best"]
    by_series = {
        sid: dict(zip(g["image_uri"].str.rsplit("/", n=1).str[-1], g["is_best"], strict=True))
        for sid, g in manifest.groupby("series_id")
    }
    # c went to r9 (decided later) under its file's URI; r1 keeps a (keeper) and b
    assert by_series == {
        "r9/g9/alice": {"u": 1, "c.jpg": 0},
        "r1/g1/alice": {"a": 1, "b": 0},
        "r2/g2/alice/pair-0": {"e": 1, "f": 0},
    }
    assert manifest.set_index("image_uri").loc[str(tmp_path / "photos" / "c.jpg"), "decision"] == ""
    assert s.images == len(manifest) == 6
    assert s.undecided_images == 1  # c in r9
    assert s.images_without_uri == 5
    assert not s.finetune_ready

    df, spec, dropped, table = join_series(str(out), str(out / "series.csv"))
    assert (spec, dropped, len(df), len(table)) == (SPEC, 0, 6, 6)
    for col in (*QUALITY_INPUTS, "width", "height", "image_id", "embedding", "model_spec"):
        assert col in table.columns
    assert table["width"].tolist() == [640] * 6
    assert {len(e) for e in table["embedding"]} == {DIM}
    assert json.loads((out / "_KEEPER_TABLE.json").read_text())["model_spec"] == SPEC
    assert FeedbackExportSummary.model_validate_json((out / "_SUMMARY.json").read_text()) == s


def test_no_pairs_and_a_rerun_overwrites(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _export(root, out)
    s = _export(root, out, pairs=False)
    _adds_up(s)
    assert (s.series, s.pairs, s.skipped["unpaired"]) == (2, 0, 4)
    assert join_series(str(out), str(out / "series.csv"))[2] == 0


def test_window_and_routes(tmp_path: Path) -> None:
    root = tmp_path / "feedback"
    _offers(root, [*_group("r1", "g", ["a", "b"]), *_group("r2", "g", ["c", "d"], route="rank")])
    _decide(root, ("r1", "a", "picked-as-keeper"))
    time.sleep(0.01)  # the two decisions are apart in received_at
    _decide(root, ("r2", "c", "picked-as-keeper"))
    events = pd.read_parquet(root / "events")
    cut = events["received_at"].max()  # r2's decision; r1's is earlier (or the same instant)
    s = _export(root, tmp_path / "o1", since=cut.isoformat())
    _adds_up(s)
    assert s.series == 1
    assert s.skipped["outside_window"] == int((events["received_at"] < cut).sum())
    assert ROUTE_NAMES == ROUTES  # the config's choices are the log's routes
    assert _export(root, tmp_path / "o3").series == 2  # every route by default
    s = _export(root, tmp_path / "o2", routes=["pick"])
    assert (s.series, s.skipped["other_route"]) == (1, 1)


def test_mixed_specs_refused_unless_one_is_chosen(tmp_path: Path) -> None:
    root = tmp_path / "feedback"
    _offers(root, [*_group("r1", "g", ["a", "b"]), *_group("r2", "g", ["c", "d"], spec=OTHER_SPEC)])
    _decide(root, ("r1", "a", "picked-as-keeper"), ("r2", "c", "picked-as-keeper"))
    with pytest.raises(DataError, match="2 model specs") as e:
        _export(root, tmp_path / "out")
    assert "model_spec=" in str(e.value)
    assert not (tmp_path / "out").exists()
    s = _export(root, tmp_path / "out", model_spec=OTHER_SPEC)
    assert (s.model_spec, s.series, s.skipped["other_model_spec"]) == (OTHER_SPEC, 1, 1)


def test_pixels_keeps_only_images_offered_at_a_uri(tmp_path: Path) -> None:
    root, photos = tmp_path / "feedback", tmp_path / "photos"
    _offers(
        root,
        [
            *[_offer("r1", "g", i, image_uri=str(photos / f"{i}.jpg")) for i in "abc"],
            _offer("r1", "g", "d"),  # offered as bytes
            _offer("r2", "g", "e"),  # a keeper offered as bytes
            _offer("r2", "g", "f", image_uri=str(photos / "f.jpg")),
        ],
    )
    _decide(root, ("r1", "a", "picked-as-keeper"), ("r1", "d", "rejected"))
    _decide(root, ("r2", "e", "picked-as-keeper"))
    s = _export(root, tmp_path / "all")
    assert (s.series, s.images_without_uri, s.finetune_ready) == (2, 2, False)
    s = _export(root, tmp_path / "pixels", pixels=True)
    _adds_up(s)
    assert (s.series, s.images, s.offers_left_out, s.finetune_ready) == (1, 3, 1, True)
    assert {k: v for k, v in s.skipped.items() if v} == {
        "no_image_uri": 1,
        "keeper_no_image_uri": 1,
    }
    manifest = pd.read_csv(tmp_path / "pixels" / "series.csv")
    assert sorted(manifest["image_uri"]) == [str(photos / f"{i}.jpg") for i in "abc"]


def test_nothing_to_export_and_a_foreign_table_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "feedback"
    _offers(root, _group("r1", "g", ["a", "b"]))
    _decide(root, ("r1", "a", "accepted"))
    with pytest.raises(DataError, match=r"nothing to export.*'unpaired': 1"):
        _export(root, tmp_path / "out")
    # No decision reaching an offer at all (a window that holds none, request ids no answer
    # has) says so too: it was a ModelLoadError about the empty spec of no offer.
    later = "2099-01-01T00:00:00+00:00"
    with pytest.raises(DataError, match=r"nothing to export.*'outside_window': 1"):
        _export(root, tmp_path / "out", since=later)
    _decide(root, ("r1", "b", "picked-as-keeper"))
    (tmp_path / "emb" / "embeddings").mkdir(parents=True)
    (tmp_path / "emb" / "embeddings" / "part-abc.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="feedback-export did not write"):
        _export(root, tmp_path / "emb")


def test_cli(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["feedback-export", "--feedback", str(root), "--output", str(out), "--no-pairs"]
    assert keeper([*argv, "max_pairs_per_group=2"]) == 0
    text = capsys.readouterr().out
    assert "2 series + 0 pairs" in text
    assert f"keeper train-head --embeddings {out}" in text
    assert keeper(["feedback-export", "--feedback", str(root), "--output", str(out), "bad=1"]) == 2
    assert "bad: Extra inputs are not permitted" in capsys.readouterr().err
