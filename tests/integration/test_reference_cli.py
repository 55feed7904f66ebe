"""`keeper reference add|list|remove` end to end: real photos through the real embed job on the
session's local Ray, reference.json as published, growing a collection, the refusals (another
model, an unknown or bad name), and a failed first add that publishes nothing until it succeeds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from keeper_core.cli import main as keeper
from keeper_core.models import embed_dim
from keeper_core.references import REFERENCE_FILE, load_collection
from keeper_core.synthetic import PHOTOS, load_photos
from keeper_train.jobs import embed, reference

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
SPEC = "keeper-tiny:random"


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.resize((96, 72)).save(buf, "JPEG", quality=90)  # small: decode is not what is tested
    return buf.getvalue()


def folder(path: Path, names: list[str], *, corrupt: bool = False) -> str:
    path.mkdir(parents=True)
    for name, im in load_photos(names).items():
        (path / f"{name}.jpg").write_bytes(jpeg(im))
    if corrupt:
        (path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return str(path)


def meta(root: Path, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / name / REFERENCE_FILE).read_text())
    return data


def test_add_grow_refuse_list_remove(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "refs"
    first = folder(tmp_path / "ana-2026", list(PHOTOS[:3]), corrupt=True)
    second = folder(tmp_path / "ana-2025", list(PHOTOS[3:5]))
    common = ["--root", str(root), "--ray-address", ray_cluster, "--batch-size", "8"]

    # 3 photos + 1 corrupt file: a 25 % failed share, allowed here.
    argv = ["reference", "add", "portfolio", "--input", first, *common]
    assert keeper([*argv, "--max-failure-fraction", "0.5", "--description", "Ana 2026"]) == 0
    out = capsys.readouterr().out
    assert "created 'portfolio': 3 images (3 added), 1 failed" in out
    m1 = meta(root, "portfolio")
    assert m1["images"] == 3
    assert m1["failed"] == 1
    assert m1["model_spec"] == SPEC
    assert m1["embed_dim"] == embed_dim(SPEC)
    assert m1["sources"] == [first]
    assert m1["description"] == "Ana 2026"
    assert m1["created_at"] == m1["updated_at"]

    # A second folder grows the same collection; the model is the collection's own.
    argv = ["reference", "add", "portfolio", "--input", second, *common]
    assert keeper([*argv, "--max-failure-fraction", "0.5"]) == 0
    m2 = meta(root, "portfolio")
    assert m2["images"] == 5
    assert m2["failed"] == 1
    assert m2["sources"] == [first, second]
    assert m2["created_at"] == m1["created_at"]
    assert str(m2["updated_at"]) > str(m1["updated_at"])  # an embed run takes over a second
    assert m2["description"] == "Ana 2026"  # kept when not given
    c = load_collection(str(root), "portfolio", model_spec=SPEC)
    assert len(c) == 5
    assert {Path(u).parent.as_posix() for u in c.image_uri} == {first, second}

    # Another model into the same name: refused before any work, reference.json untouched.
    before = (root / "portfolio" / REFERENCE_FILE).read_bytes()
    runs = sorted((root / "portfolio" / "_runs").iterdir())
    capsys.readouterr()
    argv = ["reference", "add", "portfolio", "--input", second, *common]
    assert keeper([*argv, "--model", "ViT-B-32:random"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keeper reference: error: ")
    assert "collection 'portfolio' holds keeper-tiny:random embeddings" in err
    assert "ViT-B-32:random" in err
    assert (root / "portfolio" / REFERENCE_FILE).read_bytes() == before
    assert sorted((root / "portfolio" / "_runs").iterdir()) == runs  # no embed ran

    # list: a table, and JSON for scripts.
    assert keeper(["reference", "list", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "IMAGES", "FAILED", "UPDATED"]
    assert lines[1].split() == ["portfolio", SPEC, "5", "1", str(m2["updated_at"])]
    assert keeper(["reference", "list", "--root", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [x["name"] for x in listed] == ["portfolio"]
    assert listed[0] == m2

    # remove, then list shows nothing; unknown and bad names exit 2 with a clear line.
    assert keeper(["reference", "remove", "portfolio", "--root", str(root)]) == 0
    assert "removed 'portfolio'" in capsys.readouterr().out
    assert not (root / "portfolio").exists()
    assert keeper(["reference", "list", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == f"no reference collections under {root}"
    assert keeper(["reference", "list", "--root", str(root / "typo")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert keeper(["reference", "remove", "ghost", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"keeper reference: error: no reference collection 'ghost' under {root}"
    assert keeper(["reference", "add", "bad/name", "--input", first, *common]) == 2
    assert "name: Value error, collection name 'bad/name'" in capsys.readouterr().err
    assert keeper(["reference", "remove", "../x", "--root", str(root)]) == 2
    assert "collection name '../x'" in capsys.readouterr().err


def test_failed_first_add_publishes_nothing_until_it_succeeds(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "refs"
    src = folder(tmp_path / "photos", [PHOTOS[0]], corrupt=True)
    argv = ["reference", "add", "strict", "--input", src, "--root", str(root)]

    # 1 of 2 failed: above embed's 5 % limit -> embed's exit 3, and no collection.
    assert reference.EXIT_EMBED_FAILED == embed.EXIT_TOO_MANY_FAILURES == 3
    assert keeper([*argv, "--ray-address", ray_cluster]) == 3
    assert "NOT published" in capsys.readouterr().out
    assert (root / "strict" / "embeddings").is_dir()  # the table is there, resumable
    assert not (root / "strict" / REFERENCE_FILE).exists()
    assert reference.list_references(str(root)) == []

    # The same add as a job (`python -m keeper_train.jobs.reference --config FILE`), with a
    # limit that admits it: it resumes (nothing left to embed) and publishes.
    config = tmp_path / "reference.yaml"
    config.write_text(
        f"root: {root}\nname: strict\ninput: {src}\nray_address: {ray_cluster}\n"
        "embed:\n  max_failure_fraction: 0.6\n"
    )
    assert reference.main(["--config", str(config)]) == 0
    m = meta(root, "strict")
    assert (m["images"], m["failed"], m["sources"]) == (1, 1, [src])
    assert [r.name for r in reference.list_references(str(root))] == ["strict"]

    # A typo in the embed passthrough fails before any work, naming the field.
    assert reference.main(["--config", str(config), "embed.batch_sise=4"]) == 2
    assert "embed: Value error, batch_sise: Extra inputs are not permitted" in (
        capsys.readouterr().err
    )
