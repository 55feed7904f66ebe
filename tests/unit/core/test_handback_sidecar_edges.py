"""keeper_core.handback edge cases a photographer hits: re-runs over other tools' sidecars,
symlinked, read-only and shared sidecars, NFD names, read-only originals (real exiv2)."""

from __future__ import annotations

import io
import os
import stat
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from keeper_core.errors import DataError
from keeper_core.handback import export_keepers, plan_sidecars, read_sidecar, write_sidecar

# darktable's own layout: an XML declaration, properties as attributes and as elements.
_DARKTABLE = b"""<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
   xmp:Rating="1"
   darktable:history_end="1">
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:num="0" darktable:operation="rawprepare" darktable:enabled="1"/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""

# Bridge / older Camera Raw: one rdf:Description per schema, values as elements, padding.
_ELEMENTS = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
    b' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    b'  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/">\n'
    b"   <xmp:Rating>4</xmp:Rating>\n"
    b"  </rdf:Description>\n"
    b'  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">\n'
    b"   <dc:subject><rdf:Bag><rdf:li>beach</rdf:li></rdf:Bag></dc:subject>\n"
    b"  </rdf:Description>\n"
    b" </rdf:RDF>\n"
    b"</x:xmpmeta>\n" + b" " * 2000 + b'\n<?xpacket end="w"?>'
)


@pytest.mark.parametrize("content", [_DARKTABLE, _ELEMENTS], ids=["darktable", "elements"])
def test_second_run_over_another_tools_sidecar_leaves_it_alone(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "IMG_1.CR2.xmp"
    path.write_bytes(content)
    fields = {"group": "g1", "rank": "2", "decision": "reject"}
    tools = read_sidecar(str(path)).get("Xmp.xmp.Rating")  # the tool's (a person's) rating
    assert write_sidecar(str(path), rating=-1, label="Red", keeper_fields=fields).changed
    first = path.read_bytes()
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    # The re-run keeper's docs promise: same values, same bytes, same mtime (no outside edit).
    assert not write_sidecar(str(path), rating=-1, label="Red", keeper_fields=fields).changed
    assert path.read_bytes() == first
    assert path.stat().st_mtime_ns == 1_000_000_000
    after = read_sidecar(str(path))
    assert after["Xmp.xmp.Rating"] == (tools or "-1")  # a rating the tool held stays
    assert after["Xmp.keeper.rank"] == "2"


def test_symlinked_sidecar_is_written_through_to_its_target(tmp_path: Path) -> None:
    store = tmp_path / "store" / "IMG_1.xmp"
    store.parent.mkdir()
    store.write_bytes(_DARKTABLE)
    link = tmp_path / "photos" / "IMG_1.xmp"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "store" / "IMG_1.xmp")
    assert write_sidecar(str(link), rating=3, label="Green").changed
    assert link.is_symlink()  # still the user's link...
    fields = read_sidecar(str(store))  # ...and its target the pick: keeper's label, and the
    assert fields["Xmp.keeper.xmp"] == "|Green"  # rating darktable held (a person's) left there
    assert fields["Xmp.xmp.Label"] == "Green"
    assert list(tmp_path.rglob("*.tmp")) == []


def test_dangling_symlink_and_read_only_sidecars_are_left_alone(tmp_path: Path) -> None:
    dangling = tmp_path / "IMG_1.xmp"
    dangling.symlink_to("gone.xmp")
    with pytest.raises(DataError, match="dangling symlink"):
        write_sidecar(str(dangling), rating=3, label=None)
    assert dangling.is_symlink()
    assert not (tmp_path / "gone.xmp").exists()

    locked = tmp_path / "IMG_2.xmp"
    locked.write_bytes(_DARKTABLE)
    locked.chmod(0o444)
    with pytest.raises(DataError, match="read-only"):
        write_sidecar(str(locked), rating=3, label=None)
    assert locked.read_bytes() == _DARKTABLE
    assert stat.S_IMODE(locked.stat().st_mode) == 0o444


def test_rewritten_sidecar_keeps_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.xmp"
    path.write_bytes(_DARKTABLE)
    path.chmod(0o664)  # a team's shared folder: the group edits the sidecars too
    old = os.umask(0o022)
    try:
        assert write_sidecar(str(path), rating=3, label="Green").changed
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


def test_nfc_and_nfd_spellings_share_one_sidecar(tmp_path: Path) -> None:
    # A RAW named on a Mac (NFD) and its JPEG named elsewhere (NFC): one file on APFS/HFS+.
    nfd = unicodedata.normalize("NFD", "Café_1")
    nfc = unicodedata.normalize("NFC", "Café_1")
    assert nfd != nfc
    uris = [str(tmp_path / f"{nfc}.JPG"), str(tmp_path / f"{nfd}.CR2")]
    for mode, out in (("mirror", str(tmp_path / "xmp")), ("beside", None)):
        plans = plan_sidecars(uris, input_root=str(tmp_path), mode=mode, out_dir=out)  # type: ignore[arg-type]
        assert len(plans) == 1
        assert plans[0].image_uri == uris[1]  # the RAW owns it
        assert [u for u, _ in plans[0].skipped] == [uris[0]]


def test_copy_keeps_a_read_only_original_exportable(tmp_path: Path) -> None:
    src = tmp_path / "photos" / "IMG_1.jpg"
    src.parent.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    src.write_bytes(buf.getvalue())
    src.chmod(0o444)
    os.utime(src, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    res = export_keepers(
        [str(src)], input_root=str(src.parent), dest=str(tmp_path / "keepers"), mode="copy"
    )
    assert res.failed == []
    assert res.exported == 1
    dst = tmp_path / "keepers" / "IMG_1.jpg"
    assert dst.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dst.stat().st_mode) == 0o444  # the original's mode and mtime
    assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns
    # No temporary file left; keeper's record of its copies beside them.
    assert sorted(p.name for p in dst.parent.iterdir()) == [".keeper-export.json", "IMG_1.jpg"]
