"""keeper_core.handback: XMP sidecars (real exiv2 via pyexiv2) and keeper export, local and S3."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keeper_core import handback, storage
from keeper_core.errors import ConfigError, DataError
from keeper_core.handback import (
    EXPORT_RECORD,
    KEEPER_NS,
    ExportResult,
    SidecarPlan,
    export_keepers,
    plan_sidecars,
    read_sidecar,
    write_sidecar,
)

# A sidecar as darktable / Lightroom leave them: keywords, a title in two languages, a
# Photoshop headline, a darktable history (a Seq of structs), camera EXIF whose GPS format and
# multi-language UserComment exiv2's EXIF<->XMP converters would rewrite, and a namespace
# exiv2 has never heard of.
_FOREIGN = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:tiff="http://ns.adobe.com/tiff/1.0/"
    xmlns:acme="http://acme.example/ns/"
    xmlns:keeper="https://keeper.invalid/ns/xmp/1.0/"
   xmp:Rating="2"
   xmp:Label="Red"
   xmp:CreatorTool="darktable 4.6"
   photoshop:Headline="Sunset at the pier"
   darktable:history_end="2"
   exif:DateTimeOriginal="2023-06-01T18:30:00.12+02:00"
   exif:GPSLatitude="48,51.5N"
   tiff:Make="Canon"
   acme:note="kept &amp; sound"
   keeper:stale="from an earlier run">
   <dc:subject><rdf:Bag><rdf:li>beach</rdf:li><rdf:li>family</rdf:li></rdf:Bag></dc:subject>
   <dc:title><rdf:Alt>
    <rdf:li xml:lang="x-default">Pier</rdf:li><rdf:li xml:lang="de-DE">Steg</rdf:li>
   </rdf:Alt></dc:title>
   <exif:UserComment><rdf:Alt>
    <rdf:li xml:lang="x-default">hi</rdf:li><rdf:li xml:lang="de-DE">hallo</rdf:li>
   </rdf:Alt></exif:UserComment>
   <darktable:history><rdf:Seq>
    <rdf:li darktable:operation="exposure" darktable:enabled="1" darktable:params="00ff"/>
    <rdf:li darktable:operation="colorin" darktable:enabled="0" darktable:params="gz48eJ="/>
   </rdf:Seq></darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""

_OURS = {"Xmp.xmp.Rating", "Xmp.xmp.Label"}


def _is_ours(key: str) -> bool:
    return key in _OURS or key.startswith("Xmp.keeper.")


def _jpeg(path: Path, color: tuple[int, int, int] = (200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())
    return path


def _raw(path: Path) -> Path:
    # Bytes only: nothing here decodes a RAW, and a sidecar never opens its image.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"II*\x00\x10\x00\x00\x00CR\x02\x00" + os.urandom(256))
    return path


def _fingerprint(paths: list[Path]) -> dict[Path, tuple[str, int]]:
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


@pytest.fixture
def library(tmp_path: Path) -> Iterator[tuple[Path, list[Path]]]:
    """A small library: a RAW+JPEG pair, nested folders, two non-RAW files with one stem."""
    root = tmp_path / "photos"
    files = [
        _raw(root / "IMG_0001.CR2"),
        _jpeg(root / "IMG_0001.JPG"),
        _jpeg(root / "2023" / "06" / "IMG_0002.jpg", (10, 200, 10)),
        _jpeg(root / "2023" / "06" / "IMG_0003.HEIC"),  # JPEG bytes; the name is what counts
        _jpeg(root / "2023" / "06" / "IMG_0003.JPG", (10, 10, 200)),
    ]
    before = _fingerprint(files)
    yield root, files
    # Whatever a test did, the originals are byte-for-byte and mtime-for-mtime untouched.
    assert _fingerprint(files) == before


# ---------------------------------------------------------------------------------------------
# plan_sidecars


def test_plan_mirror_layout_raw_pair_and_shared_stem(
    tmp_path: Path, library: tuple[Path, list[Path]]
) -> None:
    root, files = library
    out = str(tmp_path / "out" / "xmp")
    uris = [str(f) for f in files]
    plans = plan_sidecars(uris, input_root=str(root), mode="mirror", out_dir=out)
    assert [(p.image_uri, p.sidecar_uri) for p in plans] == [
        (uris[0], f"{out}/IMG_0001.xmp"),  # the RAW owns the pair's sidecar
        (uris[2], f"{out}/2023/06/IMG_0002.xmp"),
        (uris[3], f"{out}/2023/06/IMG_0003.xmp"),  # HEIC < JPG by name
    ]
    raw_plan, _, heic_plan = plans
    assert [u for u, _ in raw_plan.skipped] == [uris[1]]
    assert "RAW" in raw_plan.skipped[0][1]
    assert [u for u, _ in heic_plan.skipped] == [uris[4]]
    assert "first by name" in heic_plan.skipped[0][1]
    # Every image is planned or skipped, exactly once.
    covered = [p.image_uri for p in plans] + [u for p in plans for u, _ in p.skipped]
    assert sorted(covered) == sorted(uris)


def test_plan_raw_owns_the_pair_whatever_the_names_sort() -> None:
    # "DSC_1.JPG" < "DSC_1.RAF" by name: only the RAW rule makes the RAF the owner.
    for uris in (["/l/DSC_1.JPG", "/l/DSC_1.RAF"], ["/l/DSC_1.RAF", "/l/DSC_1.JPG"]):
        (plan,) = plan_sidecars(uris, input_root="/l", mode="mirror", out_dir="/o")
        assert (plan.image_uri, plan.sidecar_uri) == ("/l/DSC_1.RAF", "/o/DSC_1.xmp")
        assert plan.skipped[0][0] == "/l/DSC_1.JPG"


def test_plan_owner_does_not_depend_on_input_order(library: tuple[Path, list[Path]]) -> None:
    root, files = library
    uris = [str(f) for f in files]
    forward = plan_sidecars(uris, input_root=str(root), mode="beside", out_dir=None)
    backward = plan_sidecars(uris[::-1], input_root=str(root), mode="beside", out_dir=None)
    assert {(p.image_uri, p.sidecar_uri) for p in forward} == {
        (p.image_uri, p.sidecar_uri) for p in backward
    }
    assert {p.image_uri for p in forward} == {uris[0], uris[2], uris[3]}


def test_plan_full_naming_gives_each_file_its_own(library: tuple[Path, list[Path]]) -> None:
    root, files = library
    uris = [str(f) for f in files]
    plans = plan_sidecars(uris, input_root=str(root), mode="beside", out_dir=None, naming="full")
    assert [p.sidecar_uri for p in plans] == [u + ".xmp" for u in uris]
    assert all(p.skipped == () for p in plans)


def test_plan_beside_keeps_the_uri_form_and_listed_twice() -> None:
    uris = ["photos/a/IMG_1.NEF", "file:///data/b/IMG_2.jpg", "IMG_3.png", "photos/a/IMG_1.NEF"]
    plans = plan_sidecars(uris, input_root="photos", mode="beside", out_dir=None)
    assert plans == [
        SidecarPlan(
            "photos/a/IMG_1.NEF", "photos/a/IMG_1.xmp", ((uris[3], "listed more than once"),)
        ),
        SidecarPlan("file:///data/b/IMG_2.jpg", "file:///data/b/IMG_2.xmp"),
        SidecarPlan("IMG_3.png", "IMG_3.xmp"),
    ]


def _jpeg_name(uri: str) -> bool:
    return uri.lower().endswith((".jpg", ".jpeg"))


def test_plan_in_file_jpegs_need_no_sidecar_name_but_stay_with_their_raw() -> None:
    """xmp=embed: a JPEG beside a HEIC of its stem takes its XMP in the file and the HEIC owns
    the sidecar (before, the HEIC was first by name and the JPEG got no XMP at all); the JPEG
    of a RAW+JPEG pair still shares the RAW's sidecar; one file listed twice is one plan."""
    uris = [
        "/l/IMG_1.HEIC",
        "/l/IMG_1.JPG",
        "/l/IMG_2.CR2",
        "/l/IMG_2.JPG",
        "/l/IMG_3.jpg",
        "/l/IMG_3.jpg",
        "/l/IMG_4.JPG",
        "/l/img_4.jpg",
        "/l/IMG_5.png",
    ]
    plans = plan_sidecars(uris, input_root="/l", mode="beside", out_dir=None, in_file=_jpeg_name)
    assert plans == [
        SidecarPlan("/l/IMG_1.HEIC", "/l/IMG_1.xmp"),
        SidecarPlan("/l/IMG_1.JPG", "/l/IMG_1.xmp", in_file=True),
        SidecarPlan(
            "/l/IMG_2.CR2",
            "/l/IMG_2.xmp",
            (
                (
                    "/l/IMG_2.JPG",
                    "shares sidecar /l/IMG_2.xmp with /l/IMG_2.CR2 (the RAW of the "
                    "pair), which owns it",
                ),
            ),
        ),
        SidecarPlan(
            "/l/IMG_3.jpg", "/l/IMG_3.xmp", (("/l/IMG_3.jpg", "listed more than once"),), True
        ),
        SidecarPlan(
            "/l/IMG_4.JPG",
            "/l/IMG_4.xmp",
            (("/l/img_4.jpg", "the same file as /l/IMG_4.JPG on a disk that ignores case"),),
            True,
        ),
        SidecarPlan("/l/IMG_5.png", "/l/IMG_5.xmp"),
    ]
    # Without in_file the HEIC owns its stem's sidecar and the JPEG is skipped, as before.
    plain = plan_sidecars(uris[:2], input_root="/l", mode="beside", out_dir=None)
    assert [(p.image_uri, [u for u, _ in p.skipped], p.in_file) for p in plain] == [
        ("/l/IMG_1.HEIC", ["/l/IMG_1.JPG"], False)
    ]


def test_plan_s3_mirror_both_ways() -> None:
    uris = ["s3://bucket/in/IMG_1.CR2", "s3://bucket/in/IMG_1.JPG", "s3://bucket/in/d/e/x.jpg"]
    plans = plan_sidecars(uris, input_root="s3://bucket/in/", mode="mirror", out_dir="/tmp/o")
    assert [p.sidecar_uri for p in plans] == ["/tmp/o/IMG_1.xmp", "/tmp/o/d/e/x.xmp"]
    local = plan_sidecars(
        ["/lib/2023/a.jpg"], input_root="/lib", mode="mirror", out_dir="s3://out/run1"
    )
    assert local[0].sidecar_uri == "s3://out/run1/2023/a.xmp"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "beside", "out_dir": None, "uris": ["s3://b/in/a.jpg"]}, "S3"),
        ({"mode": "beside", "out_dir": "/tmp/x"}, "out_dir must be None"),
        ({"mode": "mirror", "out_dir": None}, "needs out_dir"),
        ({"mode": "mirror", "out_dir": "/o", "uris": ["/elsewhere/a.jpg"]}, "not under it"),
        ({"mode": "mirror", "out_dir": "/o", "uris": ["/lib/../x/a.jpg"]}, "not under it"),
        ({"mode": "mirror", "out_dir": "/o", "uris": ["s3://b/lib/a.jpg"]}, "not under it"),
        ({"mode": "mirror", "out_dir": "/o", "uris": ["/lib/a.xmp"]}, "sidecars, not images"),
        ({"mode": "mirror", "out_dir": "/o", "uris": ["/lib/d/"]}, "folders"),
        ({"mode": "sideways", "out_dir": "/o"}, "mode must be"),
        ({"mode": "mirror", "out_dir": "/o", "naming": "stem"}, "naming must be"),
    ],
)
def test_plan_refuses(kwargs: dict[str, object], match: str) -> None:
    uris = kwargs.pop("uris", ["/lib/a.jpg"])
    with pytest.raises(ConfigError, match=match):
        plan_sidecars(uris, input_root="/lib", **kwargs)


# ---------------------------------------------------------------------------------------------
# write_sidecar / read_sidecar


def test_new_sidecar_is_a_valid_packet(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "IMG_1.xmp"  # parent folders are made
    assert write_sidecar(
        str(path),
        rating=5,
        label="Green",
        keeper_fields={"group": "g000003", "rank": "1", "reasons": "sharpest; eyes <open> & é"},
    ).changed
    data = path.read_bytes()
    assert data.startswith(b"<?xpacket begin=")
    assert b'<x:xmpmeta xmlns:x="adobe:ns:meta/"' in data
    assert data.rstrip().endswith(b'<?xpacket end="w"?>')
    root = ET.fromstring(data)  # well-formed XML, keeper's namespace declared by its URI
    desc = root.find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    assert desc is not None
    assert desc.get("{http://ns.adobe.com/xap/1.0/}Rating") == "5"
    assert desc.get(f"{{{KEEPER_NS}}}group") == "g000003"
    assert read_sidecar(str(path)) == {
        "Xmp.xmp.Rating": "5",
        "Xmp.xmp.Label": "Green",
        "Xmp.keeper.group": "g000003",
        "Xmp.keeper.rank": "1",
        "Xmp.keeper.reasons": "sharpest; eyes <open> & é",
        "Xmp.keeper.xmp": "5|Green",  # what keeper chose, so a person's later edit is told apart
    }
    assert list(tmp_path.rglob("*.tmp")) == []  # no temporary file left behind


def test_merge_keeps_every_foreign_field_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.xmp"
    path.write_text(_FOREIGN, encoding="utf-8")
    before = read_sidecar(str(path))
    assert before["Xmp.dc.subject"] == ["beach", "family"]  # the fixture parses as meant

    assert write_sidecar(
        str(path), rating=-1, label=None, keeper_fields={"decision": "reject"}
    ).changed
    after = read_sidecar(str(path))
    assert {k: v for k, v in after.items() if not _is_ours(k)} == {
        k: v for k, v in before.items() if not _is_ours(k)
    }
    assert after["Xmp.xmp.Rating"] == "-1"
    assert "Xmp.xmp.Label" not in after  # label=None: keeper says "no label", not "Red"
    assert after["Xmp.keeper.decision"] == "reject"
    assert "Xmp.keeper.stale" not in after  # keeper's namespace says what this run decided
    # The fields exiv2's converters would have rewritten are still exactly as written.
    assert after["Xmp.exif.GPSLatitude"] == "48,51.5N"
    assert after["Xmp.exif.UserComment"] == {'lang="x-default"': "hi", 'lang="de-DE"': "hallo"}
    assert after["Xmp.darktable.history[2]/darktable:params"] == "gz48eJ="

    first = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    for _ in range(2):
        assert not write_sidecar(
            str(path), rating=-1, label=None, keeper_fields={"decision": "reject"}
        ).changed
    assert path.read_bytes() == first
    assert path.stat().st_mtime_ns == mtime  # untouched, so photo tools see no outside edit
    assert read_sidecar(str(path))["Xmp.dc.subject"] == ["beach", "family"]  # no duplicates
    assert first.count(b"<rdf:li>beach</rdf:li>") == 1


def test_rewrite_with_new_values_replaces_them(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.xmp"
    write_sidecar(str(path), rating=1, label="Red", keeper_fields={"rank": "3", "old": "x"})
    write_sidecar(str(path), rating=4, label="Green", keeper_fields={"rank": "1"})
    assert read_sidecar(str(path)) == {
        "Xmp.xmp.Rating": "4",
        "Xmp.xmp.Label": "Green",
        "Xmp.keeper.rank": "1",
        "Xmp.keeper.xmp": "4|Green",
    }


def test_reasons_alone_do_not_rewrite_a_sidecar_but_go_with_any_other_change(
    tmp_path: Path,
) -> None:
    """A re-run after photos were added moves every group's figures ("noise 3.1 sigma" becomes
    3.2): the sidecar keeps its bytes and mtime for that alone; any other change of keeper's
    writes the new reasons with it, and a packet without reasons gets them."""
    path = tmp_path / "IMG_1.xmp"
    fields = {"group": "g1", "rank": "2", "decision": "reject", "reasons": "noise 3.1 sigma"}
    write_sidecar(str(path), rating=1, label=None, keeper_fields=fields)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    moved = {**fields, "reasons": "noise 3.2 sigma"}
    assert not write_sidecar(str(path), rating=1, label=None, keeper_fields=moved).changed
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert write_sidecar(
        str(path), rating=1, label=None, keeper_fields={**moved, "rank": "3"}
    ).changed
    assert read_sidecar(str(path))["Xmp.keeper.reasons"] == "noise 3.2 sigma"
    bare = tmp_path / "IMG_2.xmp"
    no_reasons = {k: v for k, v in moved.items() if k != "reasons"}  # an older keeper's
    write_sidecar(str(bare), rating=1, label=None, keeper_fields=no_reasons)
    assert write_sidecar(str(bare), rating=1, label=None, keeper_fields=moved).changed


def test_empty_existing_file_counts_as_new(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.xmp"
    path.write_bytes(b"")
    assert write_sidecar(str(path), rating=np.int64(3), label=None).changed
    assert read_sidecar(str(path)) == {"Xmp.xmp.Rating": "3", "Xmp.keeper.xmp": "3|"}


@pytest.mark.parametrize(
    "content",
    [
        _FOREIGN.encode()[: len(_FOREIGN) // 2],  # half a sidecar another tool was writing
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF <<< broken',
        b"\xff\xd8\xff\xe0 not xmp at all",
    ],
)
@pytest.mark.parametrize("log_level", [3, 4])
def test_unreadable_sidecar_is_left_alone(tmp_path: Path, content: bytes, log_level: int) -> None:
    import pyexiv2

    path = tmp_path / "IMG_1.xmp"
    path.write_bytes(content)
    # At level 4 (what code outside keeper may set) exiv2 reads a broken packet as empty
    # instead of failing; the sidecar must survive that too.
    pyexiv2.set_log_level(log_level)
    try:
        with pytest.raises(DataError, match="left as it is"):
            write_sidecar(str(path), rating=5, label=None)
    finally:
        pyexiv2.set_log_level(3)
    assert path.read_bytes() == content


def test_a_jpeg_named_xmp_is_not_edited(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "IMG_1.xmp")
    content = path.read_bytes()
    with pytest.raises(DataError, match="image/jpeg"):
        write_sidecar(str(path), rating=5, label=None)
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rating": 6}, "rating"),
        ({"rating": -2}, "rating"),
        ({"rating": True}, "rating"),
        ({"rating": 2.0}, "rating"),
        ({"label": ""}, "label"),
        ({"label": 3}, "label"),
        ({"keeper_fields": {"bad name": "x"}}, "XML name"),
        ({"keeper_fields": {"rank": 1}}, "must be a string"),
        ({"keeper_fields": {"why": "a\x00b"}}, "control character"),
        ({"keeper_fields": {"why": 'type="Bag" a'}}, "type="),
        ({"uri": "IMG_1.jpg"}, r"\.xmp"),
    ],
)
def test_write_sidecar_refuses(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"rating": 3, "label": None, "keeper_fields": None}
    uri = str(tmp_path / str(kwargs.pop("uri", "IMG_1.xmp")))
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        write_sidecar(uri, **args)
    assert list(tmp_path.iterdir()) == []


def test_plan_then_write_beside_and_mirror(
    tmp_path: Path, library: tuple[Path, list[Path]]
) -> None:
    root, files = library
    uris = [str(f) for f in files]
    for mode, out in (("beside", None), ("mirror", str(tmp_path / "xmp"))):
        for plan in plan_sidecars(uris, input_root=str(root), mode=mode, out_dir=out):
            write_sidecar(plan.sidecar_uri, rating=4, label="Green")
    beside = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.xmp"))
    mirror = sorted(
        p.relative_to(tmp_path / "xmp").as_posix() for p in (tmp_path / "xmp").rglob("*")
    )
    assert beside == ["2023/06/IMG_0002.xmp", "2023/06/IMG_0003.xmp", "IMG_0001.xmp"]
    assert [m for m in mirror if m.endswith(".xmp")] == beside
    assert read_sidecar(str(root / "IMG_0001.xmp"))["Xmp.xmp.Rating"] == "4"
    # (the library fixture checks the originals' bytes and mtimes on the way out)


# ---------------------------------------------------------------------------------------------
# export_keepers


@pytest.mark.parametrize("mode", ["copy", "hardlink", "symlink"])
def test_export_modes_and_idempotence(
    tmp_path: Path, library: tuple[Path, list[Path]], mode: str
) -> None:
    root, files = library
    dest = tmp_path / "keepers"
    uris = [str(files[0]), str(files[2])]
    res = export_keepers(uris, input_root=str(root), dest=str(dest), mode=mode)
    assert res == ExportResult(exported=2, already_there=0, failed=[])
    for src, rel in ((files[0], "IMG_0001.CR2"), (files[2], "2023/06/IMG_0002.jpg")):
        out = dest / rel
        assert out.read_bytes() == src.read_bytes()
        assert out.is_symlink() == (mode == "symlink")
        assert os.path.samefile(out, src) == (mode != "copy")
        if mode == "copy":
            assert out.stat().st_mtime_ns == src.stat().st_mtime_ns
    assert list(dest.rglob("*.tmp")) == []
    again = export_keepers(uris, input_root=str(root), dest=str(dest), mode=mode)
    assert again == ExportResult(exported=0, already_there=2, failed=[])


def test_export_identical_file_already_there_and_different_one_kept(
    tmp_path: Path, library: tuple[Path, list[Path]]
) -> None:
    root, files = library
    dest = tmp_path / "keepers"
    (dest / "2023" / "06").mkdir(parents=True)
    (dest / "IMG_0001.CR2").write_bytes(files[0].read_bytes())  # a copy made by someone else
    (dest / "2023" / "06" / "IMG_0002.jpg").write_bytes(b"my own edit")
    uris = [str(files[0]), str(files[2])]
    for mode in ("copy", "hardlink", "symlink"):
        res = export_keepers(uris, input_root=str(root), dest=str(dest), mode=mode)
        assert (res.exported, res.already_there) == (0, 1)
        assert [f.image_uri for f in res.failed] == [uris[1]]
        assert "different file" in res.failed[0].reason
    assert (dest / "2023" / "06" / "IMG_0002.jpg").read_bytes() == b"my own edit"


def test_keepers_own_copy_of_a_changed_original_is_replaced_and_nothing_else(
    tmp_path: Path, library: tuple[Path, list[Path]]
) -> None:
    """A re-run after an original changed (its XMP rewritten by --xmp embed as groups renumber,
    or by Lightroom) replaces the copy keeper left, still as keeper wrote it; a copy a person
    changed since, or a file keeper never wrote, is never overwritten; a damaged record lets
    nothing be replaced and is written anew."""
    root, files = library
    src = tmp_path / "edits" / "IMG_9.jpg"
    src.parent.mkdir()
    src.write_bytes(b"first version of the original")
    edits, dest = str(src.parent), tmp_path / "keepers"
    copy = dest / "IMG_9.jpg"
    assert export_keepers([str(src)], input_root=edits, dest=str(dest), mode="copy").exported
    record = json.loads((dest / EXPORT_RECORD).read_text())
    assert record == {
        "version": 1,
        "files": {"IMG_9.jpg": hashlib.sha256(src.read_bytes()).hexdigest()},
    }

    src.write_bytes(b"the original, its XMP rewritten")
    res = export_keepers([str(src)], input_root=edits, dest=str(dest), mode="copy")
    assert (res.exported, res.already_there, res.updated, res.failed) == (0, 0, 1, [])
    assert copy.read_bytes() == src.read_bytes()
    assert export_keepers([str(src)], input_root=edits, dest=str(dest), mode="copy").already_there

    copy.write_bytes(b"a person's edit of the copy")
    src.write_bytes(b"the original, changed again")
    res = export_keepers([str(src)], input_root=edits, dest=str(dest), mode="copy")
    assert res.updated == 0
    assert "changed since keeper copied it" in res.failed[0].reason
    assert copy.read_bytes() == b"a person's edit of the copy"

    # A record that is not keeper's: nothing replaced, the problem named, the record rewritten.
    copy.write_bytes(b"the original, changed again")  # the person takes their edit back
    src.write_bytes(b"the original, a third time")
    (dest / EXPORT_RECORD).write_text('{"version": 1, "files": {"IMG_9.jpg": "../x"}}')
    res = export_keepers([str(src)], input_root=edits, dest=str(dest), mode="copy")
    assert res.updated == 0
    assert len(res.failed) == 1
    assert res.record_problem is not None
    assert "not keeper's export record" in res.record_problem
    assert json.loads((dest / EXPORT_RECORD).read_text()) == {"version": 1, "files": {}}
    # Links are the original: no record.
    links = tmp_path / "links"
    export_keepers([str(files[2])], input_root=str(root), dest=str(links), mode="hardlink")
    assert not (links / EXPORT_RECORD).exists()


def test_keepers_own_copies_of_photos_no_longer_kept_are_listed_and_left(
    tmp_path: Path, library: tuple[Path, list[Path]]
) -> None:
    root, files = library
    dest = tmp_path / "keepers"
    both = [str(files[0]), str(files[2])]
    assert export_keepers(both, input_root=str(root), dest=str(dest), mode="copy").exported == 2
    res = export_keepers(both[:1], input_root=str(root), dest=str(dest), mode="copy")
    assert res.not_kept == [str(dest / "2023" / "06" / "IMG_0002.jpg")]
    assert (dest / "2023" / "06" / "IMG_0002.jpg").exists()  # left in place
    # Once a person has changed it, it is theirs: not listed.
    (dest / "2023" / "06" / "IMG_0002.jpg").write_bytes(b"retouched")
    assert (
        export_keepers(both[:1], input_root=str(root), dest=str(dest), mode="copy").not_kept == []
    )


def test_export_failures_are_recorded_not_raised(
    tmp_path: Path, library: tuple[Path, list[Path]]
) -> None:
    root, files = library
    dest = tmp_path / "keepers"
    (dest / "gone.jpg").parent.mkdir(parents=True)
    os.symlink(tmp_path / "nowhere", dest / "IMG_0001.JPG")  # a broken link in the way
    uris = [str(root / "missing.jpg"), str(files[1]), str(files[2])]
    res = export_keepers(uris, input_root=str(root), dest=str(dest), mode="copy")
    assert res.exported == 1
    reasons = dict(res.failed)
    assert "original missing" in reasons[uris[0]]
    assert "broken symlink" in reasons[uris[1]]


def test_hardlink_across_filesystems_fails_clearly(
    tmp_path: Path, library: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, files = library

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(handback.os, "link", cross_device)
    res = export_keepers(
        [str(files[2])], input_root=str(root), dest=str(tmp_path / "k"), mode="hardlink"
    )
    assert res.exported == 0
    assert "another filesystem" in res.failed[0].reason
    assert not (tmp_path / "k" / "2023" / "06" / "IMG_0002.jpg").exists()  # no silent copy


def test_hardlink_across_real_filesystems(library: tuple[Path, list[Path]]) -> None:
    root, files = library
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == root.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temp folder to hardlink across")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        res = export_keepers([str(files[2])], input_root=str(root), dest=other, mode="hardlink")
        assert res.exported == 0
        assert "another filesystem" in res.failed[0].reason
        assert list(Path(other).rglob("*.jpg")) == []


def test_export_refuses_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="copy only"):
        export_keepers(["/lib/a.jpg"], input_root="/lib", dest="s3://b/k", mode="hardlink")
    with pytest.raises(ConfigError, match="copy only"):
        export_keepers(["s3://b/lib/a.jpg"], input_root="s3://b/lib", dest="/k", mode="symlink")
    with pytest.raises(ConfigError, match="mode must be"):
        export_keepers(["/lib/a.jpg"], input_root="/lib", dest="/k", mode="move")
    with pytest.raises(ConfigError, match="not under it"):
        export_keepers(
            ["/lib/a.jpg", "/x/b.jpg"], input_root="/lib", dest=str(tmp_path), mode="copy"
        )
    assert list(tmp_path.iterdir()) == []  # refused before anything was exported


# ---------------------------------------------------------------------------------------------
# S3 (a real moto_server)


def test_s3_sidecar_merge_and_export(
    s3_bucket: str, tmp_path: Path, library: tuple[Path, list[Path]]
) -> None:
    root, files = library
    sidecar = f"s3://{s3_bucket}/xmp/IMG_0001.xmp"
    storage.write_bytes(sidecar, _FOREIGN.encode())
    assert write_sidecar(sidecar, rating=5, label="Green", keeper_fields={"rank": "1"}).changed
    fields = read_sidecar(sidecar)
    assert (fields["Xmp.xmp.Rating"], fields["Xmp.keeper.rank"]) == ("5", "1")
    assert fields["Xmp.dc.subject"] == ["beach", "family"]
    assert not write_sidecar(sidecar, rating=5, label="Green", keeper_fields={"rank": "1"}).changed

    # local -> S3 -> local, each twice: the second run finds everything there.
    dest = f"s3://{s3_bucket}/keepers"
    uris = [str(files[0]), str(files[2])]
    for expected in ((2, 0), (0, 2)):
        res = export_keepers(uris, input_root=str(root), dest=dest, mode="copy")
        assert (res.exported, res.already_there, res.failed) == (*expected, [])
    assert storage.read_bytes(f"{dest}/2023/06/IMG_0002.jpg") == files[2].read_bytes()
    s3_uris = [u for u in storage.list_files(dest) if not u.endswith(EXPORT_RECORD)]
    back = tmp_path / "back"
    for expected in ((2, 0), (0, 2)):
        res = export_keepers(s3_uris, input_root=dest, dest=str(back), mode="copy")
        assert (res.exported, res.already_there, res.failed) == (*expected, [])
    assert (back / "IMG_0001.CR2").read_bytes() == files[0].read_bytes()

    storage.write_bytes(f"{dest}/IMG_0001.JPG", b"someone else's")
    res = export_keepers([str(files[1])], input_root=str(root), dest=dest, mode="copy")
    assert "different file" in res.failed[0].reason
    assert storage.read_bytes(f"{dest}/IMG_0001.JPG") == b"someone else's"

    # keeper's own copy on S3 of an original that changed since is replaced.
    changed = tmp_path / "changed" / "IMG_0002.jpg"
    changed.parent.mkdir()
    changed.write_bytes(files[2].read_bytes())
    into = f"s3://{s3_bucket}/keepers2"
    export_keepers([str(changed)], input_root=str(changed.parent), dest=into, mode="copy")
    changed.write_bytes(files[2].read_bytes() + b"XMP")
    res = export_keepers([str(changed)], input_root=str(changed.parent), dest=into, mode="copy")
    assert (res.updated, res.failed) == (1, [])
    assert storage.read_bytes(f"{into}/IMG_0002.jpg") == changed.read_bytes()


def test_a_new_sidecar_is_stable_from_its_first_write(tmp_path: Path) -> None:
    # exiv2 lays out a packet it created differently on its second write; the first write must
    # already be the fixed point, or every re-run rewrites every sidecar (and bumps its mtime).
    path = str(tmp_path / "IMG_0001.xmp")
    fields = {"group": "g000001", "rank": "2", "decision": "reject", "reasons": "ranked 2 of 3"}
    assert write_sidecar(path, rating=-1, label="Red", keeper_fields=fields).changed
    first = Path(path).read_bytes()
    assert not write_sidecar(path, rating=-1, label="Red", keeper_fields=fields).changed
    assert Path(path).read_bytes() == first


XAP = "http://ns.adobe.com/xap/1.0/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"


def _rating_attribute(data: bytes) -> str | None:
    """xmp:Rating as a photo tool reads it: by the namespace URI, not by exiv2's prefix."""
    root = ET.fromstring(data)
    for desc in root.iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description"):
        if f"{{{XAP}}}Rating" in desc.attrib:
            return desc.attrib[f"{{{XAP}}}Rating"]
    return None


def _packet(namespaces: dict[str, str], attributes: str = "", body: str = "") -> bytes:
    """A packet of one rdf:Description binding ``namespaces`` (prefix -> URI)."""
    decls = " ".join(f'xmlns:{prefix}="{uri}"' for prefix, uri in namespaces.items())
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        f"{decls} {attributes}>{body}</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()


@pytest.mark.parametrize(
    "uri",
    [
        "http://ns.adobe.c m/xap/1.0/",  # a damaged Adobe namespace
        "http://example.com/other/1.0/",  # another schema that chose the prefix xmp
    ],
)
def test_a_packet_binding_xmp_to_another_uri_is_refused_and_misplaces_nothing(
    tmp_path: Path, uri: str
) -> None:
    """exiv2 names properties by prefix: in a packet that binds ``xmp`` to another URI, that
    namespace's ``xmp:Rating`` read as the rating, and merged, it and every other property of
    that namespace (``xmp:Mood``) were written into Adobe's: a rating nobody gave, shown by
    every photo tool. Such a packet is refused, read or merged, and left as it is. exiv2 also
    keeps one prefix registry per process, which parsing it used to re-bind: every sidecar
    written after put ``xmp:Rating`` in that namespace, where no photo tool looks."""
    odd = _packet({"xmp": uri}, 'xmp:Rating="3" xmp:Mood="calm"')
    with pytest.raises(DataError, match=r"binds the prefix 'xmp' to .*left as it is"):
        handback.parse_xmp_packet(odd, "odd.xmp")  # e.g. a photo's own XMP, read by feedback
    merged = tmp_path / "IMG_2.xmp"
    merged.write_bytes(odd)
    with pytest.raises(DataError, match="binds the prefix 'xmp'"):
        write_sidecar(str(merged), rating=2, label=None, keeper_fields={"group": "g1"})
    assert merged.read_bytes() == odd
    with pytest.raises(DataError, match="binds the prefix 'xmp'"):
        read_sidecar(str(merged))
    fresh = tmp_path / "IMG_1.xmp"
    write_sidecar(str(fresh), rating=5, label=None, keeper_fields={"group": "g1"})
    assert _rating_attribute(fresh.read_bytes()) == "5"


def test_a_sidecar_merges_whatever_prefix_earlier_sidecars_gave_its_namespace(
    tmp_path: Path,
) -> None:
    """exiv2's prefix registry is one for the process, and a parse keeps a binding already
    there: a sidecar naming its struct fields ``foo:`` could not be written back ("Unknown
    namespace prefix for qualified name") after another had bound the same namespace as
    ``ea:``, so whether a file got keeper's rating hung on which files were read before it."""
    ns = "http://example.com/a/"
    first = tmp_path / "IMG_1.xmp"
    first.write_bytes(_packet({"ea": ns}, body="<ea:Mood>calm</ea:Mood>"))
    write_sidecar(str(first), rating=3, label=None)
    second = tmp_path / "IMG_2.xmp"
    steps = '<rdf:li foo:Op="exposure" foo:On="1"/><rdf:li foo:Op="crop" foo:On="0"/>'
    second.write_bytes(
        _packet({"foo": ns}, body=f"<foo:History><rdf:Seq>{steps}</rdf:Seq></foo:History>")
    )

    write_sidecar(str(second), rating=5, label=None)

    root = ET.fromstring(second.read_bytes())
    items = root.iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}li")
    assert [(li.get(f"{{{ns}}}Op"), li.get(f"{{{ns}}}On")) for li in items] == [
        ("exposure", "1"),
        ("crop", "0"),
    ]
    assert _rating_attribute(second.read_bytes()) == "5"


def test_a_file_binding_dc_elsewhere_leaves_the_next_files_keywords_in_dublin_core(
    tmp_path: Path,
) -> None:
    """After one sidecar that binds the prefix ``dc`` to another namespace, every later merge in
    the process wrote its ``dc:subject`` (a person's keywords) into that namespace, where no
    photo tool looks: exiv2's registry kept the odd binding."""
    odd = tmp_path / "IMG_1.xmp"
    odd.write_bytes(_packet({"dc": "http://example.com/notdc/"}, 'dc:Mood="calm"'))
    write_sidecar(str(odd), rating=3, label=None)
    descriptions = ET.fromstring(odd.read_bytes()).iter(f"{{{RDF_NS}}}Description")
    assert [d.get("{http://example.com/notdc/}Mood") for d in descriptions] == ["calm"]
    normal = tmp_path / "IMG_2.xmp"
    bag = "<dc:subject><rdf:Bag><rdf:li>wedding</rdf:li></rdf:Bag></dc:subject>"
    normal.write_bytes(_packet({"dc": "http://purl.org/dc/elements/1.1/"}, body=bag))

    write_sidecar(str(normal), rating=5, label=None)

    root = ET.fromstring(normal.read_bytes())
    subject = root.find(".//{http://purl.org/dc/elements/1.1/}subject")
    assert subject is not None, normal.read_text()
    assert [li.text for li in subject.iter(f"{{{RDF_NS}}}li")] == ["wedding"]


def test_a_namespace_exiv2_would_rename_is_read_but_not_written_back(tmp_path: Path) -> None:
    """exiv2 appends a '/' to a namespace URI that ends in neither '/' nor '#': merged, every
    property of ``urn:example:ns`` moved to ``urn:example:ns/``, another namespace."""
    data = _packet({"ex": "urn:example:ns", "xmp": XAP}, 'ex:Mood="calm" xmp:Rating="2"')
    path = tmp_path / "IMG_1.xmp"
    path.write_bytes(data)
    assert read_sidecar(str(path))["Xmp.xmp.Rating"] == "2"  # what feedback reads
    with pytest.raises(DataError, match=r"'urn:example:ns' \(prefix 'ex'\).*'/' appended"):
        write_sidecar(str(path), rating=5, label=None)
    assert path.read_bytes() == data


@pytest.mark.parametrize(
    ("attributes", "body"),
    [('ex:Note="type=Bag of tricks"', ""), ("", "<ex:Note>type=Seq two</ex:Note>")],
)
def test_a_value_exiv2_reads_as_a_type_declaration_is_not_written_back(
    tmp_path: Path, attributes: str, body: str
) -> None:
    """exiv2 reads a text value starting ``type=Bag`` (``Seq``, ``Alt``, ``Struct``) as a type
    declaration: merged, the note came back an empty bag."""
    data = _packet({"ex": "http://example.com/ex/"}, attributes, body)
    path = tmp_path / "IMG_1.xmp"
    path.write_bytes(data)
    with pytest.raises(DataError, match=r"holds the value 'type=.*as an empty array"):
        write_sidecar(str(path), rating=5, label=None)
    assert path.read_bytes() == data


def test_adobes_namespace_under_another_prefix_is_read_and_merged_by_its_namespace(
    tmp_path: Path,
) -> None:
    """Photoshop wrote Adobe's namespace as ``xap:``: that is the rating, whatever the prefix."""
    path = tmp_path / "IMG_1.xmp"
    path.write_bytes(_packet({"xap": XAP}, 'xap:Rating="2"'))
    assert read_sidecar(str(path))["Xmp.xmp.Rating"] == "2"
    done = write_sidecar(str(path), rating=5, label=None)
    assert done.kept == ("rating",)
    assert _rating_attribute(path.read_bytes()) == "2"
