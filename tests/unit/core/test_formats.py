"""keeper_core.formats and the safe decoder on phone and camera files: HEIC and camera RAW.

Every file is built in code (tests/support_photos.py): a DNG written by hand that libraw opens,
HEIC encoded by pillow-heif. Orientation is checked on pixels (coloured corner markers on a
non-square image), never only on sizes.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from support_photos import make_dng, make_heic

import keeper_core.images as images
from keeper_core.errors import ImageDecodeError
from keeper_core.formats import (
    IMAGE_SUFFIXES,
    RAW_SUFFIXES,
    RawPreview,
    extract_raw_preview,
    raw_format,
    register_heif,
)
from keeper_core.images import (
    DecodeLimits,
    decode_image,
    decode_jpeg_band,
    image_size,
    raw_preview,
    sniff_is_image,
)
from keeper_core.preparation import ImagePreparation
from keeper_core.quality import block_grid_ratio

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
SPEC = "keeper-tiny:random"


def marker(w: int = 96, h: int = 64, block: int = 16) -> Image.Image:
    """White, a red block at the stored top-left and a blue one at the stored top-right."""
    im = Image.new("RGB", (w, h), WHITE)
    im.paste(RED, (0, 0, block, block))
    im.paste(BLUE, (w - block, 0, w, block))
    return im


def displayed(im: Image.Image, orientation: int) -> Image.Image:
    """PIL's own EXIF transpose of ``im`` shown with ``orientation``: the oracle."""
    copy = im.copy()
    copy.getexif()[0x0112] = orientation
    return ImageOps.exif_transpose(copy)


def mean_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def exif_block(orientation: int | None) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Sony"  # Make: an Exif block that need not hold an Orientation
    if orientation is not None:
        exif[0x0112] = orientation
    return exif.tobytes()


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colours with texture: compresses like a photo, decodes close to itself."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    return base.resize((w, h), Image.Resampling.BICUBIC)


# ---------------------------------------------------------------- suffixes and detection


def test_suffixes() -> None:
    for suffix in IMAGE_SUFFIXES:
        assert suffix.startswith(".")
        assert suffix == suffix.lower()
    assert set(RAW_SUFFIXES) <= set(IMAGE_SUFFIXES)
    assert len(set(IMAGE_SUFFIXES)) == len(IMAGE_SUFFIXES)
    assert {".heic", ".heif", ".hif", ".jpg", ".tiff"} <= set(IMAGE_SUFFIXES)
    assert {".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2", ".raf", ".pef"} <= set(
        RAW_SUFFIXES
    )


MAGIC = {
    "CR2": b"II*\x00\x10\x00\x00\x00CR\x02\x00" + b"\x00" * 20,
    "CR3": struct.pack(">I", 24) + b"ftypcrx \x00\x00\x00\x01crx isom" + b"\x00" * 8,
    "ORF": b"IIRO\x08\x00\x00\x00" + b"\x00" * 24,
    "ORF-RS": b"IIRS\x08\x00\x00\x00" + b"\x00" * 24,
    "ORF-MM": b"MMOR\x00\x00\x00\x08" + b"\x00" * 24,
    "RW2": b"IIU\x00\x08\x00\x00\x00" + b"\x00" * 24,
    "RAF": b"FUJIFILMCCD-RAW 0201FF383501" + b"\x00" * 4,
}


@pytest.mark.parametrize("name", sorted(MAGIC))
def test_raw_by_magic(name: str) -> None:
    head = MAGIC[name]
    assert raw_format(head) == name.split("-")[0]
    assert sniff_is_image(head[:32])


def tiff_ifd0(order: str, entries: list[tuple[int, int, object]]) -> bytes:
    """A TIFF holding only IFD0 (no pixels): enough for raw_format. Types 2, 3 or 4."""
    o = "<" if order == "II" else ">"
    n = len(entries)
    extra_at = 8 + 2 + 12 * n + 4
    head, extra = struct.pack(o + "H", n), b""
    for tag, kind, value in sorted(entries, key=lambda e: e[0]):
        if kind == 2:
            payload = str(value).encode() + b"\x00"
        else:
            payload = struct.pack(o + ("H" if kind == 3 else "I"), value)
        count = len(payload) if kind == 2 else 1
        if len(payload) <= 4:
            field = payload.ljust(4, b"\x00")
        else:
            field = struct.pack(o + "I", extra_at + len(extra))
            extra += payload
        head += struct.pack(o + "HHI", tag, kind, count) + field
    magic = b"II*\x00" if order == "II" else b"MM\x00*"
    return magic + struct.pack(o + "I", 8) + head + b"\x00\x00\x00\x00" + extra


MAKE, SUBFILE, PHOTOMETRIC, SUBIFDS, DNG_VERSION, DNG_PRIVATE = (
    0x010F,
    0x00FE,
    0x0106,
    0x014A,
    0xC612,
    0xC634,
)
TIFF_RULE = {
    "dng_without_make": ("II", [(DNG_VERSION, 4, 0x00000401)], "DNG"),
    "nikon_subifds": ("II", [(MAKE, 2, "NIKON CORPORATION"), (SUBIFDS, 4, 4096)], "NEF"),
    "sony_preview_ifd0": ("II", [(MAKE, 2, "SONY"), (SUBFILE, 4, 1)], "ARW"),
    "pentax_cfa_big_endian": ("MM", [(MAKE, 2, "PENTAX"), (PHOTOMETRIC, 3, 32803)], "PEF"),
    "samsung_private": ("II", [(MAKE, 2, "SAMSUNG"), (DNG_PRIVATE, 4, 4096)], "SRW"),
    "leica_linear_raw": ("II", [(MAKE, 2, "LEICA CAMERA AG"), (PHOTOMETRIC, 3, 34892)], "RAW"),
    # A TIFF exported from a Canon raw keeps the Make: still an ordinary RGB TIFF.
    "canon_export_rgb": ("II", [(MAKE, 2, "Canon"), (PHOTOMETRIC, 3, 2), (SUBFILE, 4, 0)], None),
    "unknown_maker_subifds": ("II", [(MAKE, 2, "Acme Scanners"), (SUBIFDS, 4, 4096)], None),
    "no_make": ("MM", [(PHOTOMETRIC, 3, 32803)], None),
}


@pytest.mark.parametrize("case", sorted(TIFF_RULE))
def test_tiff_based_raw_rule(case: str) -> None:
    order, entries, expected = TIFF_RULE[case]
    data = tiff_ifd0(order, entries)
    assert raw_format(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"II*\x00\xff\xff\xff\x7f",  # IFD0 offset past the end
        b"II*\x00\x08\x00\x00\x00\xff\xff",  # 65535 entries in a 10-byte file
        b"MM\x00*\x00\x00\x00\x08\x00\x01" + b"\x01\x0f\x00\x02\xff\xff\xff\xff\xff\xff\xff\xf0",
        b"\xff\xd8\xff\xe0",
        b"",
    ],
)
def test_raw_format_on_damaged_or_other_bytes(data: bytes) -> None:
    assert raw_format(data) is None


# ---------------------------------------------------------------- RAW: the embedded preview


def test_dng_decodes_to_its_preview() -> None:
    preview = photo(120, 80)
    dng = make_dng(None, preview=preview, make="Canon", model="EOS R5")
    assert raw_format(dng) == "DNG"
    assert sniff_is_image(dng)
    assert raw_format(dng[:32]) is None  # IFD0 lies further on: a 32-byte head says "TIFF"
    assert sniff_is_image(dng[:32])
    # PIL alone would open IFD0 of this file as a TIFF: keeper must go through libraw.
    got = raw_preview(dng)
    assert isinstance(got, RawPreview)
    assert got.data.startswith(b"\xff\xd8")
    assert got.orientation == 1
    assert got.format == "DNG"
    out = decode_image(dng)
    assert out.mode == "RGB"
    assert out.size == (120, 80)
    assert mean_diff(out, preview) < 2.0  # quality 95, 4:4:4
    assert image_size(dng) == (120, 80)
    assert image_size(got) == (120, 80)
    assert mean_diff(decode_image(got), out) == 0.0


def test_raw_file_is_never_modified(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.DNG"
    make_dng(path, preview=photo(640, 427), orientation=6)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = path.read_bytes()
    digest, stat = hashlib.sha256(before).hexdigest(), path.stat()
    data = path.read_bytes()
    decode_image(data)
    decode_image(data, draft_size=(64, 64))
    image_size(data)
    ImagePreparation(SPEC).decode(data, source=str(path))
    assert data == before  # libraw read the caller's buffer in place: it must not write to it
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert path.stat().st_mtime_ns == stat.st_mtime_ns == 1_000_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IMG_0001.DNG"]  # nothing beside it


@pytest.mark.parametrize("orientation", range(1, 9))
def test_raw_orientation_maps_libraw_flip(orientation: int) -> None:
    dng = make_dng(None, preview=marker(), orientation=orientation)
    assert extract_raw_preview(dng).orientation == orientation


# (RAW orientation, the preview JPEG's own Exif: None = no Exif segment, "bare" = an Exif block
# without Orientation, or its Orientation) -> the orientation shown, exactly once.
ORIENTATION_CASES = {
    "libraw_writes_raws_into_preview": (6, None, 6),
    "preview_exif_without_orientation": (6, "bare", 6),
    "preview_says_1_raw_says_6": (6, 1, 6),
    "both_say_6_rotated_once": (6, 6, 6),
    "preview_own_orientation_wins": (1, 6, 6),
    "raw_8": (8, None, 8),
    "raw_3_bare_preview_exif": (3, "bare", 3),
    "mirror_5": (5, "bare", 5),
}


@pytest.mark.parametrize("case", sorted(ORIENTATION_CASES))
def test_raw_orientation_applied_once(case: str) -> None:
    raw_orientation, own, expected = ORIENTATION_CASES[case]
    stored = marker()
    exif = None if own is None else exif_block(None if own == "bare" else int(own))
    dng = make_dng(None, preview=stored, orientation=raw_orientation, preview_exif=exif)
    out = decode_image(dng)
    want = displayed(stored, expected)
    assert out.size == want.size
    assert mean_diff(out, want) < 2.0
    assert image_size(dng) == out.size


def test_raw_orientation_6_puts_marker_top_right() -> None:
    out = decode_image(make_dng(None, preview=marker(), orientation=6))
    assert out.size == (64, 96)
    # rotated 90 degrees clockwise: stored top-left -> top-right, stored top-right -> bottom-right
    assert out.getpixel((64 - 6, 6)) == pytest.approx(RED, abs=30)
    assert out.getpixel((64 - 6, 96 - 6)) == pytest.approx(BLUE, abs=30)
    assert out.getpixel((6, 6)) == pytest.approx(WHITE, abs=30)


def test_raw_preview_is_drafted_in_displayed_coordinates() -> None:
    dng = make_dng(None, preview=photo(1024, 683), orientation=6)
    out = decode_image(dng, draft_size=(100, 100))
    assert out.size[0] < out.size[1]  # portrait, as displayed
    assert 100 <= out.size[0] < 683
    assert out.size[1] < 1024


def test_the_largest_preview_is_decoded() -> None:
    dng = make_dng(None, preview=photo(192, 128), thumbnail=Image.new("RGB", (48, 32), BLUE))
    assert image_size(dng) == (192, 128)
    assert mean_diff(decode_image(dng), photo(192, 128)) < 2.0


@pytest.mark.parametrize(
    ("kw", "detail"),
    [
        ({"preview": None}, "DNG file without an embedded preview"),
        ({"preview": marker(), "preview_format": "RGB"}, "without an embedded JPEG preview"),
    ],
)
def test_raw_without_jpeg_preview_is_unsupported(kw: dict[str, object], detail: str) -> None:
    dng = make_dng(None, **kw)  # type: ignore[arg-type]
    assert sniff_is_image(dng)
    for call in (lambda: decode_image(dng, source="s3://b/x.dng"), lambda: image_size(dng)):
        with pytest.raises(ImageDecodeError) as err:
            call()
        assert err.value.reason == "unsupported"
        assert detail in err.value.detail
    with pytest.raises(ImageDecodeError) as err:
        decode_image(dng, source="s3://b/x.dng")
    assert err.value.source == "s3://b/x.dng"


@pytest.mark.parametrize(
    ("keep", "reason"),
    [
        (0.9999, "truncated"),
        (0.97, "truncated"),
        (0.9, "truncated"),
        (0.5, "truncated"),
        (0.1, None),
    ],
)
def test_truncated_raw_is_a_decode_error(keep: float, reason: str | None) -> None:
    """A preview cut by the end of the file is refused every time.

    libraw copies the preview's declared length into a buffer it does not clear, so the cut
    copy ends in uninitialised memory, which sometimes decoded (1 run in ~6 failed here
    before the preview was checked against the file's bytes): hence the repeats.
    """
    dng = make_dng(None, preview=photo(320, 213))  # IFDs, raw data, then the ~15 KB preview
    cut = dng[: int(len(dng) * keep)]
    for _ in range(10):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(cut, source="mem://cut")
        assert err.value.source == "mem://cut"
        if reason is not None:
            assert err.value.reason == reason
            assert "past the end of the file" in err.value.detail


@pytest.mark.parametrize("name", ["CR3", "RAF", "ORF", "RW2", "CR2"])
def test_raw_libraw_cannot_read_is_unsupported(name: str) -> None:
    data = MAGIC[name] + bytes(range(256)) * 8  # the right magic, then nothing a camera wrote
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == "unsupported"
    assert "libraw" in err.value.detail
    assert name in err.value.detail


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the metadata we break
def test_damaged_raw_never_escapes_as_other_errors() -> None:
    """Flip bytes of DNGs (header and data): an RGB image or an ImageDecodeError, no crash.

    The uncompressed-preview variant matters: rawpy hands such a preview over as an array
    longer than its buffer, and reading it segfaulted on damaged files before it was refused.
    """
    preview = photo(64, 48)
    files = [
        make_dng(None, preview=preview),
        make_dng(None, preview=preview, preview_format="RGB"),
        make_dng(None, preview=preview, thumbnail=preview.resize((32, 24)), orientation=6),
    ]
    rng = np.random.default_rng(0)
    outcomes = set()
    for i in range(300):
        data = bytearray(files[i % len(files)])
        span = 700 if i % 2 else len(data)  # the IFDs sit in the first ~700 bytes
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, span))] = int(rng.integers(0, 256))
        try:
            out = decode_image(bytes(data))
        except ImageDecodeError as e:
            outcomes.add(e.reason)
        else:
            assert out.mode == "RGB"
            outcomes.add("ok")
    assert {"ok", "unsupported"} <= outcomes


def test_raw_limits() -> None:
    dng = make_dng(None, preview=photo(200, 100))
    preview = raw_preview(dng)
    assert preview is not None
    n = len(dng)
    # max_bytes applies to the preview, max_raw_bytes to the RAW file
    assert decode_image(dng, limits=DecodeLimits(max_bytes=len(preview.data))).size == (200, 100)
    cases = {
        "too_large": DecodeLimits(max_raw_bytes=n - 1),
        "too_many_pixels": DecodeLimits(max_pixels=200 * 100 - 1),
        "too_small": DecodeLimits(min_side=101),
    }
    for reason, limits in cases.items():
        with pytest.raises(ImageDecodeError) as err:
            decode_image(dng, limits=limits)
        assert err.value.reason == reason
    with pytest.raises(ImageDecodeError) as err:
        decode_image(dng, limits=DecodeLimits(max_bytes=len(preview.data) - 1))
    assert err.value.reason == "too_large"
    assert DecodeLimits().max_raw_bytes == 256 * 1024 * 1024


def test_plain_tiff_with_a_camera_make_is_still_a_tiff() -> None:
    im = photo(40, 30)
    buf = io.BytesIO()
    im.save(buf, "TIFF", tiffinfo={0x010F: "Canon", 0x0110: "EOS R5"})
    data = buf.getvalue()
    assert raw_format(data) is None
    assert raw_preview(data) is None
    assert mean_diff(decode_image(data), im) == 0.0  # lossless: PIL decoded the TIFF itself
    assert image_size(data) == (40, 30)


# ---------------------------------------------------------------- preparation on RAW


def test_preparation_decodes_raw_through_its_preview(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = images.extract_raw_preview

    def counting(data: bytes, *, source: str | None = None) -> RawPreview:
        calls.append(source)
        return real(data, source=source)

    monkeypatch.setattr(images, "extract_raw_preview", counting)
    dng = make_dng(None, preview=photo(1600, 1000), orientation=6)
    prep = ImagePreparation(SPEC)
    decoded = prep.decode(dng, source="mem://raw")
    assert calls == ["mem://raw"]  # extracted once for the decode, the size and the band
    assert (decoded.width, decoded.height) == (1000, 1600)  # the preview's displayed size
    assert decoded.image.size[0] < decoded.image.size[1]  # drafted, still portrait
    assert decoded.image.size != (1000, 1600)
    preview = real(dng)
    band = decode_jpeg_band(preview.data, pixels=64 * 64)
    assert decoded.blockiness == pytest.approx(block_grid_ratio(np.asarray(band)))
    feats = prep.quality([decoded])
    assert feats.shape[0] == 1
    assert np.isfinite(feats).all()


# ---------------------------------------------------------------- HEIC


def test_heic_round_trip() -> None:
    im = photo(96, 64)
    data = make_heic(im, quality=95)
    assert sniff_is_image(data)
    assert sniff_is_image(data[:32])
    assert raw_format(data) is None
    out = decode_image(data)
    assert out.mode == "RGB"
    assert out.size == (96, 64)
    assert mean_diff(out, im) < 4.0  # HEVC at quality 95
    assert image_size(data) == (96, 64)


@pytest.mark.parametrize("orientation", [1, 3, 5, 6, 8])
def test_heic_orientation_applied_exactly_once(orientation: int) -> None:
    """pillow-heif writes both an EXIF Orientation and the HEIF irot/imir, as phones do."""
    stored = marker()
    data = make_heic(stored, orientation=orientation, quality=95)
    out = decode_image(data)
    want = displayed(stored, orientation)
    assert out.size == want.size
    assert image_size(data) == out.size
    assert mean_diff(out, want) < 4.0


def test_heic_orientation_6_marker_and_size() -> None:
    data = make_heic(marker(), exif=exif_block(None), orientation=6, quality=95)
    assert image_size(data) == (64, 96)  # swapped once: not back to (96, 64)
    out = decode_image(data)
    assert out.size == (64, 96)
    assert out.getpixel((64 - 6, 6)) == pytest.approx(RED, abs=40)
    assert out.getpixel((64 - 6, 96 - 6)) == pytest.approx(BLUE, abs=40)
    assert out.getpixel((6, 6)) == pytest.approx(WHITE, abs=40)


def test_heic_in_preparation_is_not_drafted() -> None:
    data = make_heic(photo(600, 400), orientation=8)
    decoded = ImagePreparation(SPEC).decode(data)
    assert (decoded.width, decoded.height) == (400, 600)
    assert decoded.image.size == (400, 600)
    assert decoded.blockiness is None


def test_truncated_heic_is_a_decode_error() -> None:
    data = make_heic(photo(96, 64))
    for keep in (0.5, 0.9):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(data[: int(len(data) * keep)])
        assert err.value.reason == "truncated"


def test_register_heif_is_idempotent() -> None:
    import pillow_heif

    before = {k: getattr(pillow_heif.options, k) for k in dir(pillow_heif.options) if k.isupper()}
    assert register_heif() is True
    assert register_heif() is True
    assert "HEIF" in Image.OPEN
    after = {k: getattr(pillow_heif.options, k) for k in dir(pillow_heif.options) if k.isupper()}
    assert after == before  # pillow-heif's global options are left alone


def test_heif_without_plugin_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "register_heif", lambda: False)  # pillow-heif not installed
    monkeypatch.delitem(Image.OPEN, "HEIF", raising=False)
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    assert sniff_is_image(heic)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(heic)
    assert err.value.reason == "unsupported"
    assert "HEIF" in err.value.detail


def test_plugins_load_on_first_use_not_at_import(tmp_path: Path) -> None:
    """Importing the decoder loads neither pillow-heif nor rawpy; the first HEIC/RAW does."""
    heic, dng = tmp_path / "a.heic", tmp_path / "b.dng"
    heic.write_bytes(make_heic(marker()))
    make_dng(dng, preview=marker())
    script = textwrap.dedent(
        f"""
        import sys
        from PIL import Image
        from keeper_core.images import decode_image
        assert "pillow_heif" not in sys.modules and "rawpy" not in sys.modules
        assert "HEIF" not in Image.OPEN
        assert decode_image(open({str(heic)!r}, "rb").read()).size == (96, 64)
        assert "pillow_heif" in sys.modules and "HEIF" in Image.OPEN
        assert "rawpy" not in sys.modules
        assert decode_image(open({str(dng)!r}, "rb").read()).size == (96, 64)
        assert "rawpy" in sys.modules
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
