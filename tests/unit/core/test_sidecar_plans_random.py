"""plan_sidecars on random folders: RAW+JPEG pairs, stems in other cases and Unicode forms, a
HEIC beside a JPEG, files listed twice, JPEGs that take their XMP in the file.

Whatever the names (``KEEPER_HISTORIES=400`` tries more):
- every image listed is a plan's image or skipped by exactly one plan (each listing counted);
- no two plans write one sidecar, and no two write into one file;
- where a RAW shares the sidecar name, a RAW owns it;
- the plans are the same whatever order the images come in.
"""

from __future__ import annotations

import os
import random
import unicodedata
from collections import Counter

import pytest

from keeper_core.handback import name_key, plan_sidecars
from keeper_core.jpeg_xmp import embeds_into

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "24"))
RAWS = ("CR2", "CR3", "NEF", "ARW", "DNG")
OTHERS = ("JPG", "jpg", "JPEG", "HEIC", "PNG", "TIF")


def names(rng: random.Random) -> list[str]:
    out: list[str] = []
    for _ in range(rng.randint(1, 14)):
        folder = rng.choice(["/lib/a", "/lib/b", "/lib/a/sub"])
        stem = rng.choice(["IMG_0001", "img_0001", "IMG_0002", "Café", "DSC_9"])
        if stem == "Café" and rng.random() < 0.5:
            stem = unicodedata.normalize("NFD", stem)  # as macOS stores it
        ext = rng.choice(RAWS + OTHERS + OTHERS)
        out.append(f"{folder}/{stem}.{ext}")
        if rng.random() < 0.1:
            out.append(out[-1])  # listed twice
    return out


def summary(plans: list) -> set[tuple[str, str, bool, frozenset[tuple[str, str]]]]:
    return {(p.image_uri, p.sidecar_uri, p.in_file, frozenset(p.skipped)) for p in plans}


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_folders_plan_one_writer_per_sidecar_and_file(seed: int) -> None:
    rng = random.Random(seed)
    uris = names(rng)
    kw = {
        "input_root": "/lib",
        "mode": rng.choice(["mirror", "beside"]),
        "naming": rng.choice(["basename", "full"]),
        "in_file": embeds_into if rng.random() < 0.5 else None,
    }
    kw["out_dir"] = "/out/xmp" if kw["mode"] == "mirror" else None
    plans = plan_sidecars(uris, **kw)  # type: ignore[arg-type]

    listed = Counter(uris)
    covered = Counter([p.image_uri for p in plans] + [u for p in plans for u, _ in p.skipped])
    assert covered == listed, (uris, plans)
    sidecars = [name_key(p.sidecar_uri) for p in plans if not p.in_file]
    assert len(sidecars) == len(set(sidecars)), plans
    files = [name_key(p.image_uri) for p in plans if p.in_file]
    assert len(files) == len(set(files)), plans
    if kw["in_file"] is not None:
        assert all(embeds_into(p.image_uri) for p in plans if p.in_file)
    for p in plans:
        if p.in_file:
            continue
        members = [p.image_uri, *(u for u, _ in p.skipped)]
        if any(u.rsplit(".", 1)[1].upper() in RAWS for u in members):
            assert p.image_uri.rsplit(".", 1)[1].upper() in RAWS, p
    shuffled = list(uris)
    rng.shuffle(shuffled)
    assert summary(plan_sidecars(shuffled, **kw)) == summary(plans)  # type: ignore[arg-type]
