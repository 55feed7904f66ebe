"""A RAW preview that names no colour space takes the one its RAW file's own metadata names.

A camera set to Adobe RGB renders its preview in Adobe RGB and often embeds it without EXIF or
profile of its own (libraw then puts an Exif segment with the orientation only in front of it);
the RAW's Exif IFD (DCF: ColorSpace 0xFFFF + Interop index "R03"), Nikon's or Canon's maker
note, or a DNG's PreviewColorSpace says so. The TIFF structures here are written by hand:
:func:`tiff` for the parser's own tests, and :func:`camera_raw` patches ``make_dng``'s file
(which libraw opens) into a NEF/CR2/ARW-like one with the Exif IFD a camera writes.
"""

from __future__ import annotations

import io
import random
import struct

import numpy as np
import pytest
from PIL import Image
from support_photos import make_dng
from test_color import COLOURS, block_means, expected_srgb, swatch

from keeper_core.color import ADOBE_RGB, DISPLAY_P3, rgb_profile
from keeper_core.decoders import GpuDecoder, TurboDecoder
from keeper_core.formats import raw_color_space
from keeper_core.images import RawPreview, decode_image, raw_preview

_ASCII, _SHORT, _LONG, _UNDEFINED = 2, 3, 4, 7
_MAKE, _SUBIFDS, _EXIF_IFD, _MAKER_NOTE = 0x010F, 0x014A, 0x8769, 0x927C
_COLOR_SPACE, _INTEROP_IFD, _INTEROP_INDEX = 0xA001, 0xA005, 0x0001
_DNG_VERSION, _DNG_BACKWARD, _ILLUMINANT1, _PREVIEW_COLOR_SPACE = 0xC612, 0xC613, 0xC65A, 0xC71A
_NIKON_COLOR_SPACE, _CANON_COLOR_SPACE = 0x001E, 0x00B4

# An entry: (tag, type, value). A list value is a sub-IFD (a LONG offset to it), str ASCII,
# bytes UNDEFINED, an int the type's one number.
Entry = tuple[int, int, object]


class _Writer:
    """Appends IFDs to a TIFF buffer, each entry's long value and sub-IFDs after it."""

    def __init__(self, buf: bytearray, order: str) -> None:
        self.buf, self.o = buf, "<" if order == "II" else ">"

    def ifd(self, entries: list[Entry]) -> int:
        at, o = len(self.buf), self.o
        self.buf.extend(bytes(2 + 12 * len(entries) + 4))
        struct.pack_into(o + "H", self.buf, at, len(entries))
        for i, (tag, kind, value) in enumerate(sorted(entries, key=lambda e: e[0])):
            if isinstance(value, list):
                kind, count, payload = _LONG, 1, struct.pack(o + "I", self.ifd(value))
            elif isinstance(value, str):
                count, payload = len(value) + 1, value.encode("ascii") + b"\x00"
            elif isinstance(value, bytes):
                count, payload = len(value), value
            else:
                count, payload = 1, struct.pack(o + {_SHORT: "H", _LONG: "I"}[kind], value)
            field = payload.ljust(4, b"\x00")
            if len(payload) > 4:
                field = struct.pack(o + "I", len(self.buf))
                self.buf.extend(payload + bytes(len(payload) & 1))
            struct.pack_into(o + "HHI4s", self.buf, at + 2 + 12 * i, tag, kind, count, field)
        return at


def tiff(order: str, ifd0: list[Entry]) -> bytes:
    """A TIFF (no pixels) whose IFD0 holds ``ifd0``, sub-IFDs included."""
    o = "<" if order == "II" else ">"
    buf = bytearray((b"II*\x00" if order == "II" else b"MM\x00*") + struct.pack(o + "I", 8))
    _Writer(buf, order).ifd(ifd0)
    return bytes(buf)


def nikon_note(space: int, order: str = "MM") -> bytes:
    """Nikon's type-3 maker note: "Nikon\\0", version 2.10, then a TIFF of its own."""
    return b"Nikon\x00\x02\x10\x00\x00" + tiff(order, [(_NIKON_COLOR_SPACE, _SHORT, space)])


def canon_note(space: int, order: str = "II") -> bytes:
    """Canon's maker note: an IFD right at its start (its values inline here)."""
    return tiff(order, [(_CANON_COLOR_SPACE, _SHORT, space), (0x0001, _SHORT, 0)])[8:]


def exif(
    space: int | None = None, index: str | None = None, note: bytes | None = None
) -> list[Entry]:
    """An Exif IFD's entries: ColorSpace, an Interop IFD with its index, a maker note."""
    entries: list[Entry] = [(0x9000, _UNDEFINED, b"0231")]  # ExifVersion
    if space is not None:
        entries.append((_COLOR_SPACE, _SHORT, space))
    if index is not None:
        entries.append((_INTEROP_IFD, _LONG, [(_INTEROP_INDEX, _ASCII, index)]))
    if note is not None:
        entries.append((_MAKER_NOTE, _UNDEFINED, note))
    return entries


def camera(make: str, exif_entries: list[Entry] | None, order: str = "II") -> bytes:
    ifd0: list[Entry] = [(_MAKE, _ASCII, make), (_SUBIFDS, _LONG, 4096)]
    if exif_entries is not None:
        ifd0.append((_EXIF_IFD, _LONG, exif_entries))
    return tiff(order, ifd0)


CASES = {
    # DCF, as Canon (CR2), Sony (ARW) and most cameras write it
    "dcf_adobe_rgb": (camera("Canon", exif(0xFFFF, "R03")), "Adobe RGB"),
    "dcf_adobe_rgb_big_endian": (camera("PENTAX", exif(0xFFFF, "R03"), "MM"), "Adobe RGB"),
    "dcf_srgb": (camera("SONY", exif(1, "R98")), "sRGB"),
    "dcf_r98_uncalibrated": (camera("SONY", exif(0xFFFF, "R98")), "sRGB"),
    "uncalibrated_without_index": (camera("SONY", exif(0xFFFF)), None),
    "r03_with_srgb_color_space": (camera("SONY", exif(1, "R03")), "sRGB"),
    "no_color_space": (camera("SONY", exif()), None),
    "no_exif_ifd": (camera("SONY", None), None),
    # Nikon: the Exif tag left out or "uncalibrated", the maker note says which
    "nikon_note_adobe": (camera("NIKON CORPORATION", exif(note=nikon_note(2))), "Adobe RGB"),
    "nikon_note_adobe_uncal": (
        camera("NIKON CORPORATION", exif(0xFFFF, note=nikon_note(2))),
        "Adobe RGB",
    ),
    "nikon_note_little_endian": (
        camera("NIKON", exif(note=nikon_note(2, "II")), "MM"),
        "Adobe RGB",
    ),
    "nikon_note_srgb": (camera("NIKON CORPORATION", exif(note=nikon_note(1))), "sRGB"),
    "nikon_note_hlg_unknown": (camera("NIKON CORPORATION", exif(note=nikon_note(4))), None),
    "exif_srgb_wins_over_note": (camera("NIKON", exif(1, note=nikon_note(2))), "sRGB"),
    "canon_note_adobe": (camera("Canon", exif(0xFFFF, note=canon_note(2))), "Adobe RGB"),
    "canon_note_big_endian": (camera("Canon", exif(note=canon_note(2, "MM")), "MM"), "Adobe RGB"),
    "canon_note_in_a_sony": (camera("SONY", exif(note=canon_note(2))), None),
    # DNG: the preview's PreviewColorSpace alone (its Exif says what the camera was set to)
    "dng_preview_adobe": (
        tiff("II", [(_DNG_VERSION, 1, b"\x01\x04\x00\x00"), (_PREVIEW_COLOR_SPACE, _LONG, 3)]),
        "Adobe RGB",
    ),
    "dng_preview_prophoto_in_subifd": (
        tiff(
            "II",
            [
                (_DNG_VERSION, 1, b"\x01\x04\x00\x00"),
                (_SUBIFDS, _LONG, [(0x00FE, _LONG, 1), (_PREVIEW_COLOR_SPACE, _LONG, 4)]),
            ],
        ),
        "ProPhoto RGB",
    ),
    "dng_exif_adobe_is_not_the_preview": (
        tiff(
            "II", [(_DNG_VERSION, 1, b"\x01\x04\x00\x00"), (_EXIF_IFD, _LONG, exif(0xFFFF, "R03"))]
        ),
        None,
    ),
    "dng_preview_gray_gamma": (
        tiff("II", [(_DNG_VERSION, 1, b"\x01\x04\x00\x00"), (_PREVIEW_COLOR_SPACE, _LONG, 1)]),
        None,
    ),
    # not TIFF-structured
    "cr3": (struct.pack(">I", 24) + b"ftypcrx " + bytes(64), None),
    "raf": (b"FUJIFILMCCD-RAW 0201FF383501" + bytes(64), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_raw_color_space(case: str) -> None:
    data, want = CASES[case]
    assert raw_color_space(data) == want


def _entry_offsets(data: bytes) -> list[int]:
    """Where every IFD entry's 4-byte value/offset field lies in a little-endian ``tiff``."""
    out, todo, seen = [], [struct.unpack_from("<I", data, 4)[0]], set()
    while todo:
        at = todo.pop()
        if at in seen or at + 2 > len(data):
            continue
        seen.add(at)
        for i in range(struct.unpack_from("<H", data, at)[0]):
            entry = at + 2 + 12 * i
            tag = struct.unpack_from("<H", data, entry)[0]
            out.append(entry + 8)
            if tag in (_EXIF_IFD, _INTEROP_IFD, _SUBIFDS):
                todo.append(struct.unpack_from("<I", data, entry + 8)[0])
    return out


@pytest.mark.parametrize(
    "case", ["dcf_adobe_rgb", "canon_note_adobe", "dng_preview_prophoto_in_subifd"]
)
def test_malformed_offsets_give_no_information_never_an_error(case: str) -> None:
    data, want = CASES[case]
    names = {want, None}
    for cut in range(len(data)):  # every truncation
        assert raw_color_space(data[:cut]) in names
    rng = random.Random(0)
    for at in _entry_offsets(data):  # every pointer and value aimed elsewhere
        for value in (0, 7, len(data) - 1, len(data), 0xFFFFFFF0, rng.getrandbits(32)):
            bad = data[:at] + struct.pack("<I", value) + data[at + 4 :]
            assert raw_color_space(bad) in {want, None, "sRGB"}
    for _ in range(300):  # random bytes flipped anywhere
        flipped = bytearray(data)
        for _ in range(3):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        assert raw_color_space(bytes(flipped)) in {None, "sRGB", "Adobe RGB", "ProPhoto RGB"}


def test_huge_counts_are_bounded() -> None:
    # An Exif IFD claiming 65535 entries, a SubIFDs tag claiming 2^32 of them: no reads beyond
    # the file, no loop over the claimed count.
    data = bytearray(camera("Canon", exif(0xFFFF, "R03")))
    pointer = data.index(struct.pack("<HHI", _EXIF_IFD, _LONG, 1)) + 8
    exif_at = struct.unpack_from("<I", data, pointer)[0]
    assert raw_color_space(bytes(data)) == "Adobe RGB"
    struct.pack_into("<H", data, exif_at, 0xFFFF)
    assert raw_color_space(bytes(data)) is None
    dng = tiff("II", [(_DNG_VERSION, 1, b"\x01\x04\x00\x00"), (_SUBIFDS, _LONG, 8)])
    at = dng.index(struct.pack("<HH", _SUBIFDS, _LONG)) + 4
    dng = dng[:at] + struct.pack("<I", 0xFFFFFFFF) + dng[at + 4 :]
    assert raw_color_space(dng) is None


# ------------------------------------------------------------------ the whole decode path


def _retag(data: bytes, changes: dict[int, tuple[int, int, int]]) -> bytes:
    """``make_dng``'s IFD0 with entries rewritten in place: tag -> (new tag, type, inline value)."""
    out = bytearray(data)
    at = struct.unpack_from("<I", out, 4)[0]
    for i in range(struct.unpack_from("<H", out, at)[0]):
        entry = at + 2 + 12 * i
        tag = struct.unpack_from("<H", out, entry)[0]
        if tag in changes:
            new, kind, value = changes[tag]
            struct.pack_into("<HHII", out, entry, new, kind, 1, value)
    return bytes(out)


def camera_raw(
    exif_entries: list[Entry] | None,
    *,
    make: str = "NIKON CORPORATION",
    preview: Image.Image | None = None,
    preview_exif: bytes | None = None,
) -> bytes:
    """A TIFF-based RAW libraw opens (``make_dng`` without its DNG tags: a NEF by its Make and
    layout), its preview a bare JPEG of ``swatch()``, and the given Exif IFD in place of
    make_dng's (appended at the end of the file, IFD0's pointer moved to it)."""
    dng = make_dng(
        None,
        preview=swatch() if preview is None else preview,
        make=make,
        model="D850",
        datetime_original="2026:01:02 03:04:05",  # so IFD0 has an ExifIFD entry to point over
        preview_exif=preview_exif,
    )
    # DNGVersion and DNGBackwardVersion become unknown private tags: not a DNG any more
    raw = _retag(dng, {_DNG_VERSION: (0xFDE8, _LONG, 0), _DNG_BACKWARD: (0xFDE9, _LONG, 0)})
    if exif_entries is None:
        return raw
    buf = bytearray(raw)
    exif_at = _Writer(buf, "II").ifd(exif_entries)
    return _retag(bytes(buf), {_EXIF_IFD: (_EXIF_IFD, _LONG, exif_at)})


def test_camera_raw_is_what_it_should_be() -> None:
    data = camera_raw(exif(0xFFFF, "R03"))
    preview = raw_preview(data)
    assert preview is not None
    assert preview.format == "NEF"
    assert preview.color_space == "Adobe RGB"
    assert raw_color_space(camera_raw(None)) is None
    # libraw's Exif segment in front of the bare preview names no colour space
    im = Image.open(io.BytesIO(preview.data))
    assert "icc_profile" not in im.info
    assert im.getexif().get_ifd(0x8769).get(_COLOR_SPACE) is None


ADOBE_CAMERAS = {
    "dcf": (exif(0xFFFF, "R03"), "NIKON CORPORATION"),
    "nikon_note": (exif(note=nikon_note(2)), "NIKON CORPORATION"),
    "canon_note": (exif(0xFFFF, note=canon_note(2)), "Canon"),
}


@pytest.mark.parametrize("case", sorted(ADOBE_CAMERAS))
def test_preview_of_an_adobe_rgb_raw_is_converted(case: str) -> None:
    entries, make = ADOBE_CAMERAS[case]
    out = decode_image(camera_raw(entries, make=make))
    want = expected_srgb(COLOURS, ADOBE_RGB)
    assert np.abs(block_means(out) - want).max() <= 2.0
    assert np.abs(want - COLOURS).max() > 10  # the conversion is visible, not rounding


@pytest.mark.parametrize(
    "entries",
    [None, exif(1, "R98"), exif(0xFFFF), exif(note=nikon_note(1))],
    ids=["no_exif", "srgb", "uncalibrated_alone", "nikon_note_srgb"],
)
def test_preview_of_an_srgb_or_silent_raw_is_left_alone(entries: list[Entry] | None) -> None:
    out = decode_image(camera_raw(entries))
    assert np.abs(block_means(out) - COLOURS).max() <= 2.0


def test_the_previews_own_colour_space_wins() -> None:
    adobe = exif(0xFFFF, "R03")
    # its own EXIF saying sRGB: sRGB
    own = Image.Exif()
    own.get_ifd(0x8769)[_COLOR_SPACE] = 1
    out = decode_image(camera_raw(adobe, preview_exif=own.tobytes()))
    assert np.abs(block_means(out) - COLOURS).max() <= 2.0
    # its own ICC profile (Display P3): that profile, not the RAW's Adobe RGB (make_dng drops
    # a preview's profile: the RawPreview is made here, as extract_raw_preview would)
    p3 = RawPreview(_jpeg_with_profile(rgb_profile(DISPLAY_P3)), 1, "NEF", color_space="Adobe RGB")
    out = decode_image(p3)
    assert np.abs(block_means(out) - expected_srgb(COLOURS, DISPLAY_P3)).max() <= 2.0


def _jpeg_with_profile(icc: bytes) -> bytes:
    buf = io.BytesIO()
    swatch().save(buf, "JPEG", quality=95, subsampling=0, icc_profile=icc)
    return buf.getvalue()


def test_dng_preview_color_space_is_converted() -> None:
    dng = make_dng(None, preview=swatch())
    assert np.abs(block_means(decode_image(dng)) - COLOURS).max() <= 2.0  # none: sRGB (spec)
    # CalibrationIlluminant1 rewritten as PreviewColorSpace, in IFD0: the preview's IFD here
    adobe = _retag(dng, {_ILLUMINANT1: (_PREVIEW_COLOR_SPACE, _LONG, 3)})
    preview = raw_preview(adobe)
    assert preview is not None
    assert preview.color_space == "Adobe RGB"
    want = expected_srgb(COLOURS, ADOBE_RGB)
    assert np.abs(block_means(decode_image(adobe)) - want).max() <= 2.0
    # ProPhoto RGB: gamma 1.8 against sRGB's curve, mid grey 128 is 146 in sRGB
    prophoto = _retag(dng, {_ILLUMINANT1: (_PREVIEW_COLOR_SPACE, _LONG, 4)})
    grey = block_means(decode_image(prophoto))[1]
    assert np.abs(grey - 146).max() <= 1.5


def test_fast_backends_convert_the_preview_as_the_reference_does() -> None:
    data = camera_raw(exif(0xFFFF, "R03"))
    reference = np.asarray(decode_image(data))
    turbo = TurboDecoder()
    assert np.array_equal(np.asarray(turbo.decode(data)), reference)
    assert (dict(turbo.delegated), turbo.decoded, turbo.color_converted) == ({}, 1, 1)
    gpu = GpuDecoder(device="cpu")
    preview = raw_preview(data)
    assert preview is not None
    out = gpu.decode_batch([(data, "DSC_0001.NEF"), (preview, "DSC_0001.NEF")])
    for got in out:
        assert not isinstance(got, Exception)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), reference)
    assert (dict(gpu.delegated), gpu.color_converted) == ({}, 2)
