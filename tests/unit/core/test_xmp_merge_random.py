"""keeper_core.handback.merge_packet on seeded random XMP packets as photo tools lay them out:
several rdf:Description elements, properties as attributes and as elements, bags, sequences,
language alternatives and sequences of structs (darktable's history), Adobe's namespace as
``xmp:`` or Photoshop's ``xap:``, other namespaces under varying prefixes, a person's rating and
label or none, another schema that chose the prefix ``xmp`` for itself, one whose URI ends in
neither '/' nor '#', and now and then a text value that starts with ``type=``.

Whatever the packet, a merge either refuses it (DataError: keeper leaves the file as it is) or
keeps every property that is not keeper's, in its own namespace with its value; puts the rating
in Adobe's namespace, the person's unless told to overwrite; and is a fixed point (merged again,
the same bytes). Properties are compared as a photo tool reads them: by namespace URI, with an
XML parser of the tests' own, not exiv2's prefixes.

Refusals seen (keeper's, of a packet binding ``xmp`` to another namespace or holding a namespace
exiv2 would write back with a '/' appended, or a value ``type=Bag ...`` exiv2 would write back
as an empty bag; the other from
exiv2's XMP toolkit; each file left as it is, and none depending on the packets merged before
it in the process): a packet that is not XML (the generator may declare one prefix twice
on an element). One namespace under two prefixes in one packet, which the toolkit refuses
("Schema namespace URI and prefix mismatch"), and struct fields of Adobe's namespace under
``xap:``, which it cannot write back ("Unknown namespace prefix for qualified name"), are
merged: keeper renames the prefixes first (``one_prefix_per_namespace``).
"""

from __future__ import annotations

import io
import random
import threading
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from PIL import Image

from keeper_core.capture import read_capture
from keeper_core.errors import DataError
from keeper_core.handback import KEEPER_NS, KeeperXmp, merge_packet

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
XAP = "http://ns.adobe.com/xap/1.0/"
RATING, LABEL = f"{{{XAP}}}Rating", f"{{{XAP}}}Label"
#: Namespace URI -> the prefixes tools write it under (one is chosen per rdf:Description).
PREFIXES = {
    XAP: ("xmp", "xap"),
    "http://purl.org/dc/elements/1.1/": ("dc",),
    "http://ns.adobe.com/photoshop/1.0/": ("photoshop",),
    "http://ns.adobe.com/camera-raw-settings/1.0/": ("crs",),
    "http://darktable.sf.net/": ("darktable",),
    "http://ns.adobe.com/lightroom/1.0/": ("lr",),
    "http://example.com/a/": ("ea", "foo"),
    "http://example.com/b/": ("eb", "bar", "xmp"),  # xmp: a schema that chose Adobe's prefix
    "http://example.com/c": ("ec",),  # no '/' or '#' at the end: exiv2 would append a '/'
}
SEEDS = range(200)

Prop = tuple[str, str, str, Any]  # namespace, name, kind, value


def _word(r: random.Random) -> str:
    return "".join(r.choice("abcdefghijkl") for _ in range(r.randint(1, 6)))


def _text(r: random.Random) -> str:
    return r.choice(
        [_word(r), f"{_word(r)} {_word(r)}", f"caf\u00e9 {_word(r)}", f"{_word(r)} & {_word(r)}",
         f" {_word(r)}", f"{_word(r)}\u4e2d"] * 8 + [f"type=Bag {_word(r)}"]
    )  # fmt: skip


def _props(r: random.Random) -> list[Prop]:
    out: list[Prop] = []
    names: set[tuple[str, str]] = set()
    for _ in range(r.randint(0, 8)):
        # The odd namespaces rarely, or most packets would be refused for them.
        ns = r.choices(list(PREFIXES), [1 if u.endswith("/") else 0.15 for u in PREFIXES])[0]
        name = _word(r).capitalize()
        if (ns, name) in names or f"{{{ns}}}{name}" in (RATING, LABEL):
            continue
        names.add((ns, name))
        kind = r.choice(["attr", "elem", "bag", "seq", "alt", "structs"])
        value: Any
        if kind in ("attr", "elem"):
            value = _text(r)
        elif kind == "alt":
            value = {"x-default": _text(r)} | ({"fr-FR": _text(r)} if r.random() < 0.5 else {})
        elif kind == "structs":
            value = [
                {_word(r).capitalize(): _word(r) for _ in range(r.randint(1, 3))}
                for _ in range(r.randint(1, 3))
            ]
        else:
            value = [_text(r) for _ in range(r.randint(1, 3))]
        out.append((ns, name, kind, value))
    if r.random() < 0.5:
        out.append((XAP, "Rating", r.choice(["attr", "elem"]), str(r.randint(-1, 5))))
    if r.random() < 0.3:
        out.append((XAP, "Label", r.choice(["attr", "elem"]), r.choice(["Red", "Green"])))
    return out


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")


def _description(r: random.Random, props: list[Prop]) -> str:
    prefix = {ns: r.choice(p) for ns, p in PREFIXES.items()}
    decls = " ".join(f'xmlns:{prefix[ns]}="{ns}"' for ns in sorted({p[0] for p in props}))
    attrs = " ".join(f'{prefix[ns]}:{n}="{_esc(v)}"' for ns, n, k, v in props if k == "attr")
    body = []
    for ns, name, kind, value in props:
        q = f"{prefix[ns]}:{name}"
        if kind == "elem":
            body.append(f"<{q}>{_esc(value)}</{q}>")
        elif kind == "alt":
            items = "".join(f'<rdf:li xml:lang="{k}">{_esc(v)}</rdf:li>' for k, v in value.items())
            body.append(f"<{q}><rdf:Alt>{items}</rdf:Alt></{q}>")
        elif kind == "structs":
            items = "".join(
                "<rdf:li " + " ".join(f'{prefix[ns]}:{f}="{v}"' for f, v in s.items()) + "/>"
                for s in value
            )
            body.append(f"<{q}><rdf:Seq>{items}</rdf:Seq></{q}>")
        elif kind in ("bag", "seq"):
            items = "".join(f"<rdf:li>{_esc(v)}</rdf:li>" for v in value)
            array = "Bag" if kind == "bag" else "Seq"
            body.append(f"<{q}><rdf:{array}>{items}</rdf:{array}></{q}>")
    return f'<rdf:Description rdf:about="" {decls} {attrs}>{"".join(body)}</rdf:Description>'


def _packet(r: random.Random) -> tuple[bytes, list[Prop]]:
    props = _props(r)
    parts: list[list[Prop]] = [[] for _ in range(r.randint(1, 3))]
    for p in props:
        r.choice(parts).append(p)
    descriptions = "".join(_description(r, part) for part in parts)
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{RDF}">{descriptions}'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    return packet.encode(), props


def _as_read(data: bytes) -> dict[str, Any]:
    """Every top-level property, ``{namespace}name`` -> its value as _props writes them."""
    got: dict[str, Any] = {}
    for desc in ET.fromstring(data).iter(f"{{{RDF}}}Description"):
        for key, value in desc.attrib.items():
            if key.startswith("{") and not key.startswith(f"{{{RDF}"):
                got[key] = value
        for child in desc:
            items = list(child.iter(f"{{{RDF}}}li"))
            if any(li.get(XML_LANG) for li in items):
                got[child.tag] = {li.get(XML_LANG): li.text for li in items}
            elif any(
                len(li) or any(not a.startswith(f"{{{RDF}") for a in li.attrib) for li in items
            ):
                got[child.tag] = [
                    {
                        a.split("}")[1]: v
                        for a, v in li.attrib.items()
                        if not a.startswith(f"{{{RDF}")
                    }
                    | {e.tag.split("}")[1]: e.text for e in li}
                    for li in items
                ]
            else:
                got[child.tag] = [li.text for li in items] if items else child.text
    return got


@pytest.mark.parametrize("seed", SEEDS)
def test_a_merge_refuses_or_keeps_every_other_property_and_is_a_fixed_point(seed: int) -> None:
    _check(seed)


def _check(seed: int) -> None:
    """The merge of seed's packet refuses it with a named reason, or keeps what it must."""
    r = random.Random(seed)
    packet, props = _packet(r)
    choice = KeeperXmp(r.randint(-1, 5), r.choice([None, "Blue"]), {"group": f"g{seed}"})
    overwrite = r.random() < 0.3
    try:
        merged = merge_packet(packet, choice, source=f"s{seed}.xmp", overwrite_ratings=overwrite)
    except DataError as e:
        refusal = str(e)
    else:
        refusal = ""
    if refusal:
        # exiv2's refusal, or keeper's of a prefix bound to another namespace: named, and the
        # file left alone.
        assert any(
            why in refusal
            for why in (
                "XMP Toolkit error 201",  # not XML
                "binds the prefix 'xmp'",
                "with a '/' appended",
                "as a type declaration",
            )
        ), refusal
        return
    after = _as_read(merged.packet)
    before = {f"{{{ns}}}{name}": value for ns, name, _, value in props}
    theirs = {k: v for k, v in before.items() if k not in (RATING, LABEL)}
    assert {k: after.get(k) for k in theirs} == theirs
    assert {k for k in after if not k.startswith(f"{{{KEEPER_NS}}}")} - set(before) <= {
        RATING,
        LABEL,
    }
    rating = str(choice.rating) if overwrite or RATING not in before else before[RATING]
    assert after[RATING] == rating
    assert after.get(LABEL) == (choice.label if overwrite or LABEL not in before else before[LABEL])
    again = merge_packet(merged.packet, choice, source="again", overwrite_ratings=overwrite)
    assert again.packet == merged.packet


def test_most_random_packets_merge() -> None:
    """The generator is not mostly refusals: the test above checks merges, not just errors."""
    merged = 0
    for seed in SEEDS:
        r = random.Random(seed)
        packet, _ = _packet(r)
        try:
            merge_packet(packet, KeeperXmp(3, None, {}), source="s")
            merged += 1
        except DataError:
            pass
    assert merged >= 0.6 * len(SEEDS)


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0110] = "Camera"  # Model
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "JPEG", exif=exif)
    return out.getvalue()


def test_a_merge_after_a_capture_read_is_the_same() -> None:
    """keeper_core.capture reads EXIF with exiv2's log muted (one bad maker-note entry must not
    lose every tag). The level is process-wide, and muted exiv2 reads a packet it cannot parse as
    empty: merges after a capture read in the same process wrote packets without keeper's rating
    (7 of these packets) or refused for another reason."""
    _check(SEEDS[0])  # keeper's XMP code has run in this process before
    assert read_capture(_exif_jpeg()).camera
    for seed in SEEDS:
        _check(seed)


def test_merges_beside_capture_reads_on_other_threads() -> None:
    """The same with capture reads running on other threads meanwhile (a pick run reads and
    writes on threads): keeper's exiv2 calls take turns, each at its own log level."""
    jpeg, stop = _exif_jpeg(), threading.Event()
    reads = [0, 0]

    def read(k: int) -> None:
        while not stop.is_set() and reads[k] < 100_000:
            assert read_capture(jpeg).camera
            reads[k] += 1

    threads = [threading.Thread(target=read, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    try:
        for seed in SEEDS[:80]:
            _check(seed)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert min(reads) > 0
