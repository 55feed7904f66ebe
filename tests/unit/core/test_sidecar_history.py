"""A sidecar, or the XMP inside a JPEG (``--xmp embed``), over many keeper runs and a
photographer's edits between them, at random.

Seeded histories (``KEEPER_HISTORIES=400`` runs more): keeper writes its rating, label and fields
(now and then with ``overwrite_ratings``); between runs a person rates, labels, takes a rating
or label away, puts keeper's own value back, adds a keyword, or deletes the sidecar (for a
JPEG: a new photo in its place), through exiv2 as a photo tool does. A model that knows only
who last set each field says what every run must leave:

- a rating or label a person set stays, whatever keeper chooses, however often, unless
  ``overwrite_ratings`` (a person's value equal to what keeper last set is keeper's again: the
  file cannot tell them apart, and that is how a person hands a photo back);
- one keeper set, or none at all, follows keeper's choice;
- a person's keyword stays; keeper's own fields are this run's;
- ``keeper feedback-from-xmp`` reads a rating as a person's exactly where it is one;
- the same run again writes nothing (same bytes).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import pytest
from support_jpeg import camera_jpeg, insert_segment, segments, xmp_segment

from keeper_core.embedded_xmp import read_embedded_xmp
from keeper_core.handback import SidecarWrite, read_sidecar, write_sidecar
from keeper_core.jpeg_xmp import write_jpeg_xmp
from keeper_train.jobs.xmp_feedback import parse_rating

RATING, LABEL, KEYWORDS = "Xmp.xmp.Rating", "Xmp.xmp.Label", "Xmp.dc.subject"
LABELS = (None, "Red", "Green", "Yellow")
SEEDS = int(os.environ.get("KEEPER_HISTORIES", "16"))


def tool(path: Path, changes: dict[str, object]) -> None:
    """A photo tool saving ``changes`` into the sidecar (exiv2, as darktable's and Lightroom's
    XMP toolkits rewrite a packet)."""
    import pyexiv2

    with pyexiv2.Image(str(path)) as img:
        img.modify_xmp(changes)


def remove(path: Path, key: str) -> None:
    """A person taking a rating or label away: the attribute is gone from the packet (pyexiv2's
    ``modify_xmp({key: None})`` does not reliably remove ``xmp:Rating``)."""
    pattern = rf'\s+xmp:{key.removeprefix("Xmp.xmp.")}="[^"]*"'
    data = path.read_bytes()
    if path.suffix == ".xmp":
        new = re.sub(pattern.encode(), b"", data)
    else:  # the packet inside a JPEG: its segment rebuilt, every other segment as it was
        others, packets, scans = segments(data)
        (packet,) = packets
        rest = b"\xff\xd8" + b"".join(others) + scans
        new = insert_segment(rest, xmp_segment(re.sub(pattern.encode(), b"", packet)))
    assert new != data
    path.write_bytes(new)


class Target:
    """Where keeper writes: a sidecar (``--xmp beside``) or the JPEG itself (``--xmp embed``)."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        self.mode = mode
        self.path = tmp_path / ("IMG_0001.xmp" if mode == "sidecar" else "IMG_0001.JPG")
        self.photos = 0

    def exists(self) -> bool:
        return self.path.exists()

    def fresh(self) -> None:
        """No sidecar (deleted), or a new photo with no packet in its place."""
        if self.mode == "sidecar":
            self.path.unlink(missing_ok=True)
        else:
            self.photos += 1
            self.path.write_bytes(camera_jpeg(seed=self.photos))

    def write(self, **kw: Any) -> SidecarWrite:
        if self.mode == "sidecar":
            return write_sidecar(str(self.path), **kw)
        return write_jpeg_xmp(str(self.path), **kw)

    def read(self) -> dict[str, Any]:
        if self.mode == "sidecar":
            return read_sidecar(str(self.path))
        return read_embedded_xmp(str(self.path)) or {}


class Field:
    """Who last set one field (``xmp:Rating`` or ``xmp:Label``), and what keeper last set it to."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.by = "nobody"  # "keeper", "person" or "nobody"
        self.keepers: str | None = None  # keeper's last value here (None: never set, or unset)
        self.value: str | None = None

    def person_sets(self, value: str | None) -> None:
        self.value = value
        if self.keepers is not None and value == self.keepers:
            self.by = "keeper"  # set back to keeper's own: the file cannot tell
        elif value is None and self.keepers is None:
            self.by = "nobody"
        else:
            self.by = "person"

    def keeper_run(self, choice: str | None, overwrite: bool) -> None:
        if overwrite or self.by != "person":
            self.value, self.keepers, self.by = choice, choice, "keeper"


@pytest.mark.parametrize("mode", ["sidecar", "jpeg"])
@pytest.mark.parametrize("seed", range(SEEDS))
def test_a_persons_rating_and_label_survive_every_run(seed: int, mode: str, tmp_path: Path) -> None:
    rng = random.Random(seed)
    target = Target(tmp_path, mode)
    target.fresh()
    path = target.path
    rating, label = Field(RATING), Field(LABEL)
    keywords: list[str] = []
    log: list[str] = []
    for step in range(30):
        history = "\n".join(log)
        if not target.exists() or rng.random() < 0.45:  # a keeper run
            choice = (str(rng.randint(-1, 5)), rng.choice(LABELS))
            overwrite = rng.random() < 0.1
            fields = {"decision": rng.choice(["keep", "alternate", "reject"]), "rank": str(step)}
            kw: dict[str, Any] = {
                "rating": int(choice[0]),
                "label": choice[1],
                "keeper_fields": fields,
                "overwrite_ratings": overwrite,
            }
            target.write(**kw)
            rating.keeper_run(choice[0], overwrite)
            label.keeper_run(choice[1], overwrite)
            log.append(f"keeper {choice} overwrite={overwrite}")
            now = target.read()
            assert (now.get(RATING), now.get(LABEL)) == (rating.value, label.value), history
            # and feedback-from-xmp reads a rating as a person's exactly where it stayed one
            person = rating.by == "person" and rating.value is not None
            assert parse_rating(now)[1] == person, history
            assert now.get(KEYWORDS, []) == keywords, history
            assert {k: v for k, v in now.items() if k.startswith("Xmp.keeper.")} == {
                **{f"Xmp.keeper.{k}": v for k, v in fields.items()},
                "Xmp.keeper.xmp": now["Xmp.keeper.xmp"],
            }, history
            before = path.read_bytes()
            assert not target.write(**kw).changed, history  # the same run again: nothing
            assert path.read_bytes() == before, history
            continue
        what = rng.choice(["rate", "rate", "label", "unrate", "unlabel", "back", "keyword", "rm"])
        if what == "rate":
            value = str(rng.randint(-1, 5))
            tool(path, {RATING: value})
            rating.person_sets(value)
        elif what == "label":
            value = rng.choice(LABELS[1:])
            tool(path, {LABEL: value})
            label.person_sets(value)
        elif what == "unrate" and rating.value is not None:
            remove(path, RATING)
            rating.person_sets(None)
        elif what == "unlabel" and label.value is not None:
            remove(path, LABEL)
            label.person_sets(None)
        elif what == "back" and rating.keepers is not None:  # keeper's own rating put back
            tool(path, {RATING: rating.keepers})
            rating.person_sets(rating.keepers)
        elif what == "keyword":
            keywords.append(f"kw{step}")
            tool(path, {KEYWORDS: list(keywords)})
        elif what == "rm":  # the sidecar deleted (a photo never culled), or a new photo
            target.fresh()
            rating, label, keywords = Field(RATING), Field(LABEL), []
        else:
            continue
        log.append(f"person {what} -> rating {rating.value} ({rating.by}), "
                   f"label {label.value} ({label.by})")  # fmt: skip
