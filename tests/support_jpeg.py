"""JPEGs as cameras and photo tools leave them, built in code, for the tests of ``xmp=embed``.

``camera_jpeg`` is seeded noise with the metadata a photographer's JPEG carries: EXIF (make,
model, capture time, a maker note), an sRGB ICC profile, IPTC keywords (APP13), a comment, and
optionally an XMP packet another tool wrote. ``segments`` is a walk of a JPEG's header written
here, apart from keeper's, so the tests compare keeper's output with an oracle of their own.
"""

from __future__ import annotations

import functools
import io
import struct

import numpy as np
from PIL import Image, ImageCms

__all__ = [
    "camera_jpeg",
    "insert_segment",
    "lightroom_packet",
    "segments",
    "set_rating_as_a_tool_does",
    "xmp_segment",
]

XMP_SIG = b"http://ns.adobe.com/xap/1.0/\x00"


def _segment(marker: int, body: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", 2 + len(body)) + body


def _iptc_app13(keyword: str) -> bytes:
    """A Photoshop APP13 segment holding one IPTC keyword (2:25), as Photo Mechanic writes."""
    value = keyword.encode()
    iptc = b"\x1c\x02\x19" + struct.pack(">H", len(value)) + value
    iptc += b"\x00" * (len(iptc) % 2)
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(iptc))
    return _segment(0xED, b"Photoshop 3.0\x00" + resource + iptc)


def lightroom_packet(rating: int | None = None, label: str | None = None, pad: int = 2048) -> bytes:
    """An XMP packet as Lightroom embeds one: keywords, a city, a document id, develop settings,
    ``xmp:Rating`` / ``xmp:Label`` when given, ``pad`` bytes of padding."""
    props = "".join(
        f' xmp:{k}="{v}"' for k, v in (("Rating", rating), ("Label", label)) if v is not None
    )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Adobe XMP Core 7.0-c000">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        '    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"\n'
        '    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"\n'
        '    xmlns:crs="http://ns.adobe.com/camera-raw-settings/1.0/"\n'
        '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
        '   photoshop:City="Lisbon" xmpMM:DocumentID="xmp.did:0001"\n'
        f'   crs:Exposure2012="+0.35"{props}>\n'
        "   <dc:subject><rdf:Bag><rdf:li>wedding</rdf:li><rdf:li>first dance</rdf:li></rdf:Bag>"
        "</dc:subject>\n"
        "  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n" + " " * pad + '\n<?xpacket end="w"?>'
    ).encode()


@functools.cache
def _srgb_profile() -> bytes:
    """An sRGB ICC profile, made once: littlecms stamps each one made with the time, so two made
    a second apart differ, and so would two photos meant to be the same bytes."""
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def camera_jpeg(
    xmp: bytes | None = None,
    *,
    seed: int = 0,
    size: tuple[int, int] = (48, 32),
    progressive: bool = False,
) -> bytes:
    """A JPEG of seeded noise with EXIF (and a maker note), an sRGB ICC profile, IPTC keywords,
    a comment and, when given, ``xmp`` as its XMP segment."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Keeper Camera Co.", "KC-1"
    ifd = exif.get_ifd(0x8769)
    ifd[0x9003] = "2026:06:13 15:04:05"  # DateTimeOriginal
    ifd[0x927C] = b"KCMN\x00\x01" + bytes(range(40))  # MakerNote: the maker's own bytes
    icc = _srgb_profile()
    kw: dict[str, object] = {"exif": exif.tobytes(), "icc_profile": icc, "quality": 90}
    if xmp is not None:
        kw["xmp"] = xmp
    if progressive:
        kw["progressive"] = True
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", **kw)
    # IPTC and a comment after PIL's APP segments, before the tables, where cameras put them.
    extra = _iptc_app13("wedding") + _segment(0xFE, b"shot for keeper's tests")
    return insert_segment(buf.getvalue(), extra)


def insert_segment(data: bytes, segment: bytes) -> bytes:
    """``data`` with ``segment`` (whole: marker, length, body) inserted after its APP segments."""
    first_table = next(start for marker, start, _ in _walk(data) if not 0xE0 <= marker <= 0xEF)
    return data[:first_table] + segment + data[first_table:]


def xmp_segment(packet: bytes) -> bytes:
    """A standard XMP segment (APP1) holding ``packet``."""
    return _segment(0xE1, XMP_SIG + packet)


def _walk(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment after SOI up to the first SOS (its start only)."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    out, i = [], 2
    while True:
        marker = data[i + 1]
        if marker == 0xDA:
            out.append((marker, i, len(data)))
            return out
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        out.append((marker, i, i + 2 + length))
        i += 2 + length


def segments(data: bytes) -> tuple[list[bytes], list[bytes], bytes]:
    """A JPEG's header segments (whole, marker included) that are not standard XMP, its XMP
    segments' packets, and every byte from its first SOS to the end of the file."""
    others, packets, scans = [], [], b""
    for marker, start, end in _walk(data):
        seg = data[start:end]
        if marker == 0xDA:
            scans = seg
        elif marker == 0xE1 and seg[4:].startswith(XMP_SIG):
            packets.append(seg[4 + len(XMP_SIG) :])
        else:
            others.append(seg)
    return others, packets, scans


def set_rating_as_a_tool_does(path: str, rating: int) -> None:
    """Change ``xmp:Rating`` in the file's own XMP as a photo tool does (exiv2 rewrites it)."""
    import pyexiv2

    with pyexiv2.Image(path) as img:
        img.modify_xmp({"Xmp.xmp.Rating": str(rating)})
