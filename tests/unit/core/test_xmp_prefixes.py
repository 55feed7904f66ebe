"""One namespace under two prefixes in one XMP packet (an old Photoshop ``xap:`` description
beside a newer ``xmp:`` one): exiv2's XMP toolkit refuses such a packet ("Schema namespace URI
and prefix mismatch"), so keeper renames the prefixes before exiv2 sees it
(``handback.one_prefix_per_namespace``), in tags only, and only where the renamed packet is the
same XML by namespace."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from keeper_core.errors import DataError
from keeper_core.handback import (
    KeeperXmp,
    merge_packet,
    one_prefix_per_namespace,
    read_sidecar,
    write_sidecar,
)

XAP = "http://ns.adobe.com/xap/1.0/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"


def _packet(*descriptions: str) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        f'<rdf:RDF xmlns:rdf="{RDF}">{"".join(descriptions)}</rdf:RDF></x:xmpmeta>'
        '<?xpacket end="w"?>'
    ).encode()


#: Photoshop CS's description (``xap:``, a label), then one another tool added (``xmp:``).
PHOTOSHOP_THEN_OTHER = _packet(
    f'<rdf:Description rdf:about="" xmlns:xap="{XAP}" xap:Label="Red">'
    "<xap:CreatorTool>Adobe Photoshop CS Windows</xap:CreatorTool>"
    "<xap:CreateDate>2004-05-01T10:00:00</xap:CreateDate></rdf:Description>",
    f'<rdf:Description rdf:about="" xmlns:xmp="{XAP}"><xmp:Rating>2</xmp:Rating></rdf:Description>',
)


def _adobe(packet: bytes) -> dict[str, str | None]:
    """Adobe's namespace's properties as a photo tool reads them: by namespace, not prefix."""
    got: dict[str, str | None] = {}
    for d in ET.fromstring(packet[packet.index(b"<x:xmpmeta") :]).iter(f"{{{RDF}}}Description"):
        got |= {k.split("}")[1]: v for k, v in d.attrib.items() if k.startswith(f"{{{XAP}}}")}
        got |= {c.tag.split("}")[1]: c.text for c in d if c.tag.startswith(f"{{{XAP}}}")}
    return got


def test_a_photoshop_sidecar_another_tool_added_to_is_read_and_merged(tmp_path: Path) -> None:
    sidecar = tmp_path / "IMG_1.xmp"
    sidecar.write_bytes(PHOTOSHOP_THEN_OTHER)
    fields = read_sidecar(str(sidecar))
    assert fields["Xmp.xmp.Rating"] == "2"
    assert fields["Xmp.xmp.CreatorTool"] == "Adobe Photoshop CS Windows"

    merged = merge_packet(PHOTOSHOP_THEN_OTHER, KeeperXmp(5, "Green", {"group": "g1"}), source="s")
    # the person's rating and label stay; every property is still in Adobe's namespace
    assert merged.kept == ("rating", "label")
    assert _adobe(merged.packet) == _adobe(PHOTOSHOP_THEN_OTHER)
    assert merged.packet.count(f'="{XAP}"'.encode()) == 1  # one binding, as exiv2 writes it
    assert write_sidecar(str(sidecar), rating=5, label=None).changed
    assert read_sidecar(str(sidecar))["Xmp.xmp.Rating"] == "2"
    assert _adobe(sidecar.read_bytes()) == _adobe(PHOTOSHOP_THEN_OTHER)


def test_only_names_in_tags_are_renamed() -> None:
    """A value, a comment or an attribute value that holds ``xap:`` is text, not a name."""
    packet = _packet(
        f'<rdf:Description rdf:about="" xmlns:xap="{XAP}" xap:Nickname="xap:a &gt; b">'
        "<!-- <xap:Old>x</xap:Old> --><xap:Description>see xap:Rating</xap:Description>"
        "</rdf:Description>",
        f'<rdf:Description rdf:about="" xmlns:xmp="{XAP}"><xmp:Rating>2</xmp:Rating>'
        "</rdf:Description>",
    )
    out = one_prefix_per_namespace(packet)
    assert out != packet
    assert b"xmlns:xap" not in out
    assert b'xmp:Nickname="xap:a &gt; b"' in out
    assert b"<!-- <xap:Old>x</xap:Old> -->" in out
    assert b"<xmp:Description>see xap:Rating</xmp:Description>" in out
    assert _adobe(out) == _adobe(packet)


def test_the_first_prefix_is_kept_for_other_namespaces() -> None:
    ns = "http://example.com/a/"
    packet = _packet(
        f'<rdf:Description rdf:about="" xmlns:ea="{ns}" ea:A="1"/>',
        f'<rdf:Description rdf:about="" xmlns:foo="{ns}"><foo:B>2</foo:B></rdf:Description>',
    )
    out = one_prefix_per_namespace(packet)
    assert b"foo:" not in out
    assert b"<ea:B>2</ea:B>" in out


def test_packets_it_cannot_rename_safely_are_left_as_they_are() -> None:
    ns, other = "http://example.com/a/", "http://example.com/b/"
    untouched = [
        _packet(f'<rdf:Description rdf:about="" xmlns:ea="{ns}" ea:A="1"/>'),  # nothing to do
        # a prefix that names two namespaces somewhere: renaming could merge them
        _packet(
            f'<rdf:Description rdf:about="" xmlns:ea="{ns}" ea:A="1"/>',
            f'<rdf:Description rdf:about="" xmlns:foo="{ns}" foo:B="2"/>',
            f'<rdf:Description rdf:about="" xmlns:foo="{other}" foo:C="3"/>',
        ),
        # both prefixes on one element: renamed, it would declare one prefix twice
        _packet(f'<rdf:Description rdf:about="" xmlns:ea="{ns}" xmlns:foo="{ns}" ea:A="1"/>'),
        b"not XML at all <",
    ]
    for packet in untouched:
        assert one_prefix_per_namespace(packet) == packet


def test_the_same_packet_inside_a_jpeg_is_merged(tmp_path: Path) -> None:
    """``--xmp embed``: exiv2 refuses the original file for its packet, so keeper's own reader
    checks what was written (jpeg_xmp); the person's rating stays, keeper's fields land."""
    from support_jpeg import camera_jpeg, insert_segment, xmp_segment

    from keeper_core.embedded_xmp import read_embedded_xmp
    from keeper_core.jpeg_xmp import write_jpeg_xmp

    photo = tmp_path / "IMG_1.JPG"
    photo.write_bytes(insert_segment(camera_jpeg(), xmp_segment(PHOTOSHOP_THEN_OTHER)))
    wrote = write_jpeg_xmp(str(photo), rating=5, label=None, keeper_fields={"group": "g1"})
    assert wrote.changed
    assert wrote.kept == ("rating", "label")
    fields = read_embedded_xmp(str(photo))
    assert fields["Xmp.xmp.Rating"] == "2"
    assert fields["Xmp.keeper.group"] == "g1"


def test_a_local_name_that_spells_a_renamed_prefix_stays() -> None:
    ns = "http://example.com/a/"
    packet = _packet(
        f'<rdf:Description rdf:about="" xmlns:ea="{ns}" xmlns:xap="{XAP}" ea:xap="1" '
        'xap:Label="Red"><ea:xap ea:xap="2">x</ea:xap></rdf:Description>',
        f'<rdf:Description rdf:about="" xmlns:xmp="{XAP}"><xmp:Rating>2</xmp:Rating>'
        "</rdf:Description>",
    )
    out = one_prefix_per_namespace(packet)
    assert b'ea:xap="1"' in out
    assert b'<ea:xap ea:xap="2">x</ea:xap>' in out
    assert b"xmlns:xap" not in out
    assert b'xmp:Label="Red"' in out


#: Photoshop's ``xap:`` alone, with struct fields in Adobe's namespace (an edit history).
PHOTOSHOP_STRUCTS = _packet(
    f'<rdf:Description rdf:about="" xmlns:xap="{XAP}" xmlns:ea="http://example.com/a/" '
    'xap:Label="Red"><ea:History><rdf:Seq><rdf:li xap:Op="crop" ea:On="1"/>'
    '<rdf:li xap:Op="exposure" ea:On="0"/></rdf:Seq></ea:History></rdf:Description>'
)


def _ops(packet: bytes) -> list[tuple[str | None, str | None]]:
    root = ET.fromstring(packet[packet.index(b"<x:xmpmeta") :])
    return [
        (li.get(f"{{{XAP}}}Op"), li.get("{http://example.com/a/}On"))
        for li in root.iter(f"{{{RDF}}}li")
    ]


def test_struct_fields_of_adobes_namespace_under_xap_are_merged(tmp_path: Path) -> None:
    """exiv2 writes Adobe's namespace as ``xmp:`` and could not name the field ``xap:Op``
    ("XMP Toolkit error 102: Unknown namespace prefix for qualified name"): such a Photoshop
    sidecar got no rating. The lone ``xap`` is renamed to ``xmp`` before exiv2 parses it."""
    out = one_prefix_per_namespace(PHOTOSHOP_STRUCTS)
    assert b"xap:" not in out
    assert b'<rdf:li xmp:Op="crop" ea:On="1"/>' in out
    merged = merge_packet(PHOTOSHOP_STRUCTS, KeeperXmp(4, "Green", {"group": "g1"}), source="s")
    assert merged.kept == ("label",)  # the person's label stays; keeper's rating lands
    assert _ops(merged.packet) == _ops(PHOTOSHOP_STRUCTS) == [("crop", "1"), ("exposure", "0")]
    assert _adobe(merged.packet)["Label"] == "Red"
    assert _adobe(merged.packet)["Rating"] == "4"
    sidecar = tmp_path / "IMG_1.xmp"
    sidecar.write_bytes(PHOTOSHOP_STRUCTS)
    assert write_sidecar(str(sidecar), rating=4, label="Green").changed
    assert not write_sidecar(str(sidecar), rating=4, label="Green").changed  # a fixed point
    assert read_sidecar(str(sidecar))["Xmp.xmp.Rating"] == "4"


def test_another_namespace_under_xmp_and_its_own_prefix_keeps_its_own() -> None:
    """A schema bound as ``eb`` and (elsewhere in the packet) as ``xmp``: renamed to ``eb``, not
    to ``xmp``, which would be refused (exiv2 would read its ``xmp:Rating`` as the rating)."""
    other = "http://example.com/b/"
    packet = _packet(
        f'<rdf:Description rdf:about="" xmlns:xmp="{other}" xmp:Rating="1" xmp:Mood="calm"/>',
        f'<rdf:Description rdf:about="" xmlns:eb="{other}"><eb:Tone>warm</eb:Tone>'
        "</rdf:Description>",
    )
    merged = merge_packet(packet, KeeperXmp(5, None, {}), source="s")
    root = ET.fromstring(merged.packet[merged.packet.index(b"<x:xmpmeta") :])
    desc = next(root.iter(f"{{{RDF}}}Description"))
    got = dict(desc.attrib) | {c.tag: c.text for c in desc}
    assert got[f"{{{other}}}Rating"] == "1"  # theirs, in their namespace
    assert got[f"{{{other}}}Mood"] == "calm"
    assert got[f"{{{other}}}Tone"] == "warm"
    assert got[f"{{{XAP}}}Rating"] == "5"  # keeper's, in Adobe's
    assert merged.kept == ()


def test_xap_stays_where_xmp_names_another_namespace() -> None:
    """The packet keeps its ``xmp`` for another schema: nothing to rename Adobe's to, and the
    packet is refused as before (exiv2 would read that schema's ``xmp:Rating`` as the rating)."""
    packet = _packet(
        f'<rdf:Description rdf:about="" xmlns:xap="{XAP}" xmlns:xmp="http://example.com/b/" '
        'xap:Label="Red" xmp:Rating="1"/>'
    )
    assert one_prefix_per_namespace(packet) == packet
    with pytest.raises(DataError, match="binds the prefix 'xmp'"):
        merge_packet(packet, KeeperXmp(5, None, {}), source="s")
