"""``keeper unpick`` over random histories: keeper runs, a photographer's edits, and unpicks
between them, on a sidecar and on the XMP inside a JPEG.

The histories of test_sidecar_history (its model of who last set each field, its photo tool),
with an unpick now and then. After each unpick the model says what must be left:

- no field of keeper's namespace;
- a rating or label a person set, as they set it; one keeper set (or a person put back to
  keeper's own value, which the file cannot tell from keeper's) gone;
- a person's keywords as they were;
- nothing else left: the sidecar deleted; a JPEG without an XMP segment, and where no tool
  wrote into it since the photo was new, byte for byte that new photo;
- a second unpick, and an unpick with ``dry_run``, change nothing; a dry run says what the
  real one then does.

And keeper's next run treats the file as one it never wrote: a person's rating stays.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from support_jpeg import camera_jpeg
from test_sidecar_history import KEYWORDS, LABEL, LABELS, RATING, SEEDS, Field, Target, tool

from keeper_core.handback import XmpRemoval, remove_from_sidecar
from keeper_core.jpeg_xmp import remove_jpeg_xmp


def unpick(target: Target, *, dry_run: bool = False) -> XmpRemoval:
    if target.mode == "sidecar":
        return remove_from_sidecar(str(target.path), dry_run=dry_run)
    return remove_jpeg_xmp(str(target.path), dry_run=dry_run)


def after_unpick(f: Field) -> None:
    """The model: keeper's value (or none) is gone, a person's stays, and no record is left."""
    if f.by != "person":
        f.value, f.by = None, "nobody"
    f.keepers = None


@pytest.mark.parametrize("mode", ["sidecar", "jpeg"])
@pytest.mark.parametrize("seed", range(SEEDS))
def test_unpick_leaves_what_a_person_set_and_nothing_of_keepers(
    seed: int, mode: str, tmp_path: Path
) -> None:
    rng = random.Random(1000 + seed)
    target = Target(tmp_path, mode)
    target.fresh()
    path = target.path
    new_photo = path.read_bytes() if mode == "jpeg" else b""
    tool_wrote = False  # a photo tool wrote into the JPEG since it was new
    rating, label = Field(RATING), Field(LABEL)
    keywords: list[str] = []
    log: list[str] = []
    unpicks = 0
    for step in range(30):
        history = "\n".join(log)
        r = rng.random()
        if not target.exists() or r < 0.35:
            choice = (rng.randint(-1, 5), rng.choice(LABELS))
            overwrite = rng.random() < 0.1
            target.write(
                rating=choice[0],
                label=choice[1],
                keeper_fields={"decision": "keep", "rank": str(step)},
                overwrite_ratings=overwrite,
            )
            rating.keeper_run(str(choice[0]), overwrite)
            label.keeper_run(choice[1], overwrite)
            log.append(f"keeper {choice} overwrite={overwrite}")
            now = target.read()
            assert (now.get(RATING), now.get(LABEL)) == (rating.value, label.value), history
            continue
        if r < 0.6:
            what = rng.choice(["rate", "label", "keyword", "back"])
            if what == "rate":
                value = str(rng.randint(-1, 5))
                tool(path, {RATING: value})
                rating.person_sets(value)
            elif what == "label":
                value = rng.choice(LABELS[1:])
                assert value is not None
                tool(path, {LABEL: value})
                label.person_sets(value)
            elif what == "back" and rating.keepers is not None:
                tool(path, {RATING: rating.keepers})
                rating.person_sets(rating.keepers)
            elif what == "keyword":
                keywords.append(f"kw{step}")
                tool(path, {KEYWORDS: list(keywords)})
            else:
                continue
            tool_wrote = tool_wrote or mode == "jpeg"
            log.append(f"person {what}: rating {rating.value} ({rating.by}), label {label.value}")
            continue
        # an unpick
        before = path.read_bytes()
        told = unpick(target, dry_run=True)
        assert path.read_bytes() == before, f"a dry run wrote\n{history}"
        done = unpick(target)
        unpicks += 1
        assert (done.outcome, done.kept) == (told.outcome, told.kept), history
        after_unpick(rating)
        after_unpick(label)
        log.append(f"unpick -> {done.outcome}, kept {done.kept}")
        history = "\n".join(log)
        left: dict[str, Any] = {
            k: v
            for k, v in ((RATING, rating.value), (LABEL, label.value), (KEYWORDS, keywords or None))
            if v is not None
        }
        kept = tuple(n for n, f in (("rating", rating), ("label", label)) if f.value is not None)
        if done.outcome == "untouched":  # nothing of keeper's was there: an unpick before
            assert path.read_bytes() == before, history
        else:
            assert done.kept == kept, history
        if mode == "sidecar":
            if not left:
                assert not path.exists(), history
                assert done.outcome in ("deleted", "untouched", "absent"), history
                continue
            assert target.read() == left, history
        else:
            now = target.read()
            assert now == left, history
            if not left and not tool_wrote:
                assert path.read_bytes() == new_photo, f"not the photo as it was\n{history}"
        again = path.read_bytes()
        assert unpick(target).outcome in ("untouched", "absent"), history
        assert path.read_bytes() == again, history
    assert unpicks or SEEDS < 4, "the histories should unpick"


def test_a_new_photo_written_into_and_unpicked_is_the_same_bytes(tmp_path: Path) -> None:
    """The plainest case, named: a JPEG with no XMP, keeper's rating written into it, unpicked."""
    target = Target(tmp_path, "jpeg")
    path = target.path
    path.write_bytes(camera_jpeg(seed=3, progressive=True))
    photo = path.read_bytes()
    assert target.write(rating=5, label="Green", keeper_fields={"rank": "1"}).changed
    assert path.read_bytes() != photo
    done = remove_jpeg_xmp(str(path))
    assert (done.outcome, done.kept) == ("deleted", ())
    assert done.stamp is not None
    assert done.content_id is not None
    assert path.read_bytes() == photo
