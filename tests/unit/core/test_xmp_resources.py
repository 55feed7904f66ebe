"""URI values (``rdf:resource``) survive keeper's XMP merge (``keeper_core.xmp_resources``).

exiv2 reads ``<cc:license rdf:resource="..."/>`` as the string and writes it back as
``cc:license="..."``: every merge of keeper's rating into a photo's XMP (a sidecar, or a JPEG's own
packet with ``--xmp embed``) turned the licence links Creative Commons, Flickr and Wikimedia write
into plain strings. These tests check the links by their place in XMP's data model, with an XML
parser of their own, and that a merge stays a fixed point (merged again, the same bytes).
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from keeper_core.handback import (
    KeeperXmp,
    merge_packet,
    parse_xmp_packet,
    read_sidecar,
    write_sidecar,
)
from keeper_core.xmp_resources import resource_values, restore_resources

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
CC = "http://creativecommons.org/ns#"
DC = "http://purl.org/dc/elements/1.1/"
EX = "http://example.com/ns/"
LICENCE = "https://creativecommons.org/licenses/by-sa/4.0/"
CHOICE = KeeperXmp(5, "Green", {"group": "g1"})


def _packet(body: str, decls: str = "") -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        f'<rdf:RDF xmlns:rdf="{RDF}"><rdf:Description rdf:about="" xmlns:cc="{CC}" '
        f'xmlns:dc="{DC}" xmlns:ex="{EX}" {decls}>{body}</rdf:Description></rdf:RDF></x:xmpmeta>'
        '<?xpacket end="w"?>'
    ).encode()


#: What Wikimedia Commons and Flickr put in a CC-licensed photo: the licence as a link, the
#: terms as text.
WIKIMEDIA = _packet(
    f'<cc:license rdf:resource="{LICENCE}"/>'
    "<cc:attributionName>A. Photographer</cc:attributionName>"
    '<cc:attributionURL rdf:resource="https://commons.wikimedia.org/wiki/User:A"/>'
    "<xmpRights:WebStatement>https://example.org/terms</xmpRights:WebStatement>"
    '<dc:rights><rdf:Alt><rdf:li xml:lang="x-default">CC BY-SA 4.0</rdf:li></rdf:Alt></dc:rights>',
    'xmlns:xmpRights="http://ns.adobe.com/xap/1.0/rights/"',
)


def _link(packet: bytes, ns: str, name: str) -> str | None:
    """The rdf:resource of the first ``{ns}name`` element, as an RDF reader sees it."""
    root = ET.fromstring(packet[packet.index(b"<x:xmpmeta") :])
    element = next(root.iter(f"{{{ns}}}{name}"), None)
    return None if element is None else element.get(f"{{{RDF}}}resource")


def _merged_twice(packet: bytes) -> bytes:
    merged = merge_packet(packet, CHOICE, source="s.xmp").packet
    assert merge_packet(merged, CHOICE, source="again").packet == merged  # a fixed point
    return merged


def test_a_licence_link_stays_a_link_through_a_merge() -> None:
    merged = _merged_twice(WIKIMEDIA)
    assert _link(merged, CC, "license") == LICENCE
    assert _link(merged, CC, "attributionURL") == "https://commons.wikimedia.org/wiki/User:A"
    assert resource_values(merged) == resource_values(WIKIMEDIA)
    # text stays text, and keeper's fields are there
    assert _link(merged, "http://ns.adobe.com/xap/1.0/rights/", "WebStatement") is None
    fields = parse_xmp_packet(merged, "s")
    assert fields["Xmp.cc.license"] == LICENCE
    assert fields["Xmp.xmpRights.WebStatement"] == "https://example.org/terms"
    assert fields["Xmp.xmp.Rating"] == "5"
    assert fields["Xmp.keeper.group"] == "g1"


PLACES = {
    "array item": '<dc:relation><rdf:Bag><rdf:li rdf:resource="http://a.example/1"/>'
    "<rdf:li>plain</rdf:li><rdf:li rdf:resource=\"http://a.example/2?x=1&amp;y='2'\"/>"
    "</rdf:Bag></dc:relation>",
    "struct field": '<ex:s rdf:parseType="Resource"><ex:a rdf:resource="http://a.example/"/>'
    '<ex:b>plain</ex:b><ex:c><rdf:Seq><rdf:li rdf:resource="http://c.example/"/></rdf:Seq>'
    "</ex:c></ex:s>",
    "struct in shorthand": '<ex:t><rdf:Description ex:b="plain">'
    '<ex:a rdf:resource="http://a.example/"/></rdf:Description></ex:t>',
    "structs in an array": '<ex:u><rdf:Seq><rdf:li rdf:parseType="Resource">'
    '<ex:a rdf:resource="http://a.example/1"/></rdf:li><rdf:li rdf:parseType="Resource">'
    '<ex:a rdf:resource="http://a.example/2"/><ex:b>x</ex:b></rdf:li></rdf:Seq></ex:u>',
    "qualified value": '<ex:q rdf:parseType="Resource"><rdf:value rdf:resource="http://q.example/"/>'
    "<ex:qual>z</ex:qual></ex:q>",
    "nested struct": '<cc:license><rdf:Description><cc:permits rdf:resource="'
    f'{CC}Reproduction"/><cc:requires rdf:resource="{CC}Notice"/></rdf:Description></cc:license>',
}


@pytest.mark.parametrize("place", PLACES)
def test_links_in_arrays_structs_and_qualifiers_stay_links(place: str) -> None:
    packet = _packet(PLACES[place])
    exiv2_alone = _fields_without_keepers(parse_xmp_packet(packet, "s"))
    merged = _merged_twice(packet)
    assert resource_values(merged) == resource_values(packet)
    assert len(resource_values(packet)) >= 1
    assert _fields_without_keepers(parse_xmp_packet(merged, "s")) == exiv2_alone


def _fields_without_keepers(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if not k.startswith(("Xmp.keeper.", "Xmp.xmp."))}


def test_a_sidecar_with_links_is_written_once(tmp_path: Path) -> None:
    """A re-run finds the same bytes and leaves the file (and its mtime) alone."""
    sidecar = tmp_path / "IMG_1.xmp"
    sidecar.write_bytes(WIKIMEDIA)
    assert write_sidecar(str(sidecar), rating=4, label=None).changed
    first = sidecar.read_bytes()
    assert _link(first, CC, "license") == LICENCE
    assert not write_sidecar(str(sidecar), rating=4, label=None).changed
    assert sidecar.read_bytes() == first
    assert read_sidecar(str(sidecar))["Xmp.xmp.Rating"] == "4"


def test_a_jpegs_licence_link_stays_a_link(tmp_path: Path) -> None:
    """``--xmp embed`` merges the JPEG's own packet: a downloaded CC photo keeps its link."""
    from support_jpeg import camera_jpeg, insert_segment, xmp_segment

    from keeper_core.embedded_xmp import read_embedded_xmp
    from keeper_core.jpeg_xmp import write_jpeg_xmp

    photo = tmp_path / "IMG_1.JPG"
    photo.write_bytes(insert_segment(camera_jpeg(), xmp_segment(WIKIMEDIA)))
    assert write_jpeg_xmp(str(photo), rating=5, label=None).changed
    data = photo.read_bytes()
    packet = data[: data.index(b"</x:xmpmeta>") + len(b"</x:xmpmeta>")]
    assert _link(packet, CC, "license") == LICENCE
    assert read_embedded_xmp(str(photo))["Xmp.xmp.Rating"] == "5"


def test_restore_leaves_what_it_cannot_place() -> None:
    before = _packet(f'<cc:license rdf:resource="{LICENCE}"/>')
    changed = _packet("<cc:license>https://example.org/another</cc:license>")
    assert restore_resources(before, changed) is changed  # another value: not restored
    moved = _packet(f"<cc:other>{LICENCE}</cc:other>")
    assert restore_resources(before, moved) is moved  # another place
    assert restore_resources(before, b"<not xml") == b"<not xml"
    plain = _packet("<cc:license>x</cc:license>")
    assert restore_resources(plain, plain) is plain  # no links before
    assert resource_values(b"<a resource='") == {}


def test_paths_name_namespaces_not_prefixes() -> None:
    a = _packet(f'<cc:license rdf:resource="{LICENCE}"/>')
    b = _packet(f'<lic:license rdf:resource="{LICENCE}"/>', f'xmlns:lic="{CC}"')
    assert resource_values(a) == resource_values(b) == {((CC, "license"),): LICENCE}


# --- seeded random packets: links and text at random places, under random prefixes -------------

PREFIXES = {CC: ("cc", "lic"), DC: ("dc",), EX: ("ex", "foo")}


def _uri(r: random.Random) -> str:
    tail = "".join(r.choice("abcdef/") for _ in range(r.randint(0, 8)))
    return r.choice(["http://a.example/", "https://b.example/x?p=1&q=2#", f"{CC}Notice"]) + tail


def _value(r: random.Random, q: dict[str, str], depth: int) -> tuple[str, bool]:
    """A property's content: (the element's attributes and body, whether it holds a link)."""
    kind = r.choice(["link", "text", "bag", "struct"] if depth < 2 else ["link", "text"])
    if kind == "link":
        return f' rdf:resource="{_uri(r).replace("&", "&amp;")}"/>', True
    if kind == "text":
        text = r.choice(["plain", "a &amp; b", "caf\u00e9"])
        return f">{text}</>", False
    if kind == "bag":
        items, any_link = [], False
        for _ in range(r.randint(1, 3)):
            if r.random() < 0.5:
                items.append(f'<rdf:li rdf:resource="{_uri(r).replace("&", "&amp;")}"/>')
                any_link = True
            else:
                items.append("<rdf:li>item</rdf:li>")
        return f"><rdf:Bag>{''.join(items)}</rdf:Bag></>", any_link
    fields, any_link = [], False
    for i in range(r.randint(1, 3)):
        body, link = _value(r, q, depth + 1)
        name = f"{q[EX]}:f{i}"
        fields.append(f"<{name}{body.replace('</>', f'</{name}>')}")
        any_link |= link
    return f' rdf:parseType="Resource">{"".join(fields)}</>', any_link


def _random_packet(seed: int) -> bytes:
    r = random.Random(seed)
    q = {ns: r.choice(p) for ns, p in PREFIXES.items()}
    decls = " ".join(f'xmlns:{q[ns]}="{ns}"' for ns in PREFIXES)
    body = []
    for i in range(r.randint(1, 5)):
        ns = r.choice(list(PREFIXES))
        name = f"{q[ns]}:p{i}"
        content, _ = _value(r, q, 0)
        body.append(f"<{name}{content.replace('</>', f'</{name}>')}")
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        f'<rdf:RDF xmlns:rdf="{RDF}"><rdf:Description rdf:about="" {decls}>{"".join(body)}'
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


@pytest.mark.parametrize("seed", range(60))
def test_random_packets_keep_every_link_and_every_value(seed: int) -> None:
    packet = _random_packet(seed)
    exiv2_alone = _fields_without_keepers(parse_xmp_packet(packet, "s"))
    merged = _merged_twice(packet)
    assert resource_values(merged) == resource_values(packet)
    assert _fields_without_keepers(parse_xmp_packet(merged, "s")) == exiv2_alone


def test_the_random_packets_hold_links() -> None:
    """The generator is not mostly text: the test above checks links."""
    links = [len(resource_values(_random_packet(seed))) for seed in range(60)]
    assert sum(n > 0 for n in links) >= 40
    assert sum(links) >= 100


@pytest.mark.parametrize("broken", [b"<not xml", b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"])
def test_a_restore_exiv2_reads_otherwise_is_not_written(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, broken: bytes
) -> None:
    """The guard behind the restore: exiv2 must read the restored packet as it reads its own
    rewrite, else the rewrite is written as exiv2 made it (links as strings) and a warning
    names the file; the merge itself never fails for the restore."""
    from keeper_core import handback

    monkeypatch.setattr(handback, "restore_resources", lambda before, after: broken)
    merged = merge_packet(WIKIMEDIA, CHOICE, source="s.xmp").packet
    assert _link(merged, CC, "license") is None
    assert parse_xmp_packet(merged, "s")["Xmp.cc.license"] == LICENCE
    assert "s.xmp: URI values left as exiv2 wrote them" in caplog.text
