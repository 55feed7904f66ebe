"""keeper feedback-from-xmp run again and again while a photographer keeps changing ratings.

test_xmp_feedback's pick run (no Ray); between runs of the job, random ratings in the sidecars
of groups g1 and g2 are set (-1..5), cleared, or put back to keeper's own, as a photo tool does
(``KEEPER_HISTORIES=400`` tries more). After every run, the client's standing decisions (the
events folded, ``undone`` included) are exactly what the ratings now say, by the documented
mapping: -1 rejected; a person's rating >= 1 above every other rating of its group
picked-as-keeper, else accepted; keeper's own rating, 0 or none, no decision.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
from test_xmp_feedback import PHOTOS, _standing, _write_run

from keeper_core.handback import read_sidecar
from keeper_train.jobs.xmp_feedback import XmpFeedbackConfig, run

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "8"))
KEEPERS = {f: r for f, _, _, _, r in PHOTOS}  # keeper's rating of each photo, in its sidecar
GROUPS = {"g1": ["IMG_4.JPG", "IMG_5.JPG"], "g2": ["IMG_6.JPG", "IMG_7.JPG", "IMG_8.JPG"]}


def set_rating(sidecar: Path, rating: int | None) -> None:
    """A photo tool saving a rating (None: cleared) into the sidecar."""
    import pyexiv2

    text = re.sub(r'\s+xmp:Rating="[^"]*"', "", sidecar.read_text(encoding="utf-8"))
    sidecar.write_text(text, encoding="utf-8")
    if rating is not None:
        with pyexiv2.Image(str(sidecar)) as img:
            img.modify_xmp({"Xmp.xmp.Rating": str(rating)})


def expected(photos: Path) -> dict[str, str]:
    out = {}
    for members in GROUPS.values():
        shown = {}
        for f in members:
            value = read_sidecar(str(photos / f.replace(".JPG", ".xmp"))).get("Xmp.xmp.Rating")
            shown[f] = int(str(value)) if value is not None else 0
        for f in members:
            r = shown[f]
            if r == 0 or r == KEEPERS[f]:  # none, or keeper's own: no decision
                continue
            if r == -1:
                out[f] = "rejected"
            elif all(r > shown[o] for o in members if o != f):
                out[f] = "picked-as-keeper"
            else:
                out[f] = "accepted"
    return out


@pytest.mark.parametrize("seed", range(SEEDS))
def test_standing_decisions_follow_the_ratings_through_every_run(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    out, photos = _write_run(tmp_path)
    cfg = XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "feedback"), client="ana")
    log: list[str] = []
    for step in range(10):
        for _ in range(rng.randint(1, 3)):
            f = rng.choice([f for members in GROUPS.values() for f in members])
            what = rng.choice(["rate", "rate", "clear", "back"])
            rating = {"rate": rng.randint(-1, 5), "clear": None, "back": KEEPERS[f]}[what]
            set_rating(photos / f.replace(".JPG", ".xmp"), rating)
            log.append(f"{f} {what} {rating}")
        run(cfg)
        log.append(f"(run {step})")
        events = tmp_path / "feedback" / "events"
        standing = _standing(tmp_path / "feedback") if events.is_dir() else {}  # none yet
        assert standing == expected(photos), "\n".join(log)
