"""keeper_core.jpeg_xmp: keeper's XMP written into a JPEG original (``keeper pick --xmp embed``)
changes its XMP segment and not one other byte; a person's rating stays; a re-run writes
nothing; a file keeper must not or cannot write is refused with its reason and left as it was.

The JPEGs are built in code (support_jpeg: EXIF with a maker note, ICC, IPTC, a comment, an XMP
packet Lightroom wrote) and read back by an oracle of the tests' own, PIL, exiv2 and keeper's
reader. Real files, real exiv2; each test takes milliseconds.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyexiv2
import pytest
from PIL import Image
from support_jpeg import (
    camera_jpeg,
    insert_segment,
    lightroom_packet,
    segments,
    set_rating_as_a_tool_does,
    xmp_segment,
)

from keeper_core import jpeg_xmp
from keeper_core.embedded_xmp import content_digest, read_embedded_xmp
from keeper_core.errors import ConfigError, DataError, KeeperError
from keeper_core.handback import RECORD_KEY, parse_xmp_packet, write_sidecar
from keeper_core.jpeg_xmp import PADDING, write_jpeg_xmp

RATING, LABEL = "Xmp.xmp.Rating", "Xmp.xmp.Label"
FIELDS = {"group": "g000001", "rank": "1", "decision": "keep"}


def _photo(tmp_path: Path, data: bytes, name: str = "IMG_0001.JPG") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _exiv2(path: Path) -> dict[str, object]:
    with pyexiv2.Image(str(path)) as img:
        return {
            "exif": img.read_exif(),
            "iptc": img.read_iptc(),
            "icc": img.read_icc(),
            "comment": img.read_comment(),
            "xmp": img.read_xmp(),
        }


def _no_temporary_files(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.mark.parametrize("progressive", [False, True])
def test_only_the_xmp_changes_and_keepers_values_land(tmp_path: Path, progressive: bool) -> None:
    before = camera_jpeg(lightroom_packet(), progressive=progressive)
    path = _photo(tmp_path, before)
    meta = _exiv2(path)

    done = write_jpeg_xmp(str(path), rating=5, label="Green", keeper_fields=FIELDS)

    assert done[:2] == (True, ())
    after = path.read_bytes()
    assert done.stamp == (len(after), path.stat().st_mtime_ns)  # what a listing now shows
    assert done.content_id == content_digest(after) == content_digest(before)
    others, packets, scans = segments(after)
    # Every other segment (JFIF, EXIF with its maker note, ICC, IPTC, the comment, the tables)
    # and every byte of the scans are the original's, in the same order.
    assert (others, scans) == segments(before)[0::2]
    assert len(packets) == 1
    assert np.array_equal(_pixels(after), _pixels(before))
    # keeper's reader, exiv2 and PIL read keeper's values; Lightroom's own fields stay.
    fields = read_embedded_xmp(str(path))
    assert fields is not None
    assert (fields[RATING], fields[LABEL], fields[RECORD_KEY]) == ("5", "Green", "5|Green")
    assert {k: fields[f"Xmp.keeper.{k}"] for k in FIELDS} == FIELDS
    assert fields["Xmp.dc.subject"] == ["wedding", "first dance"]
    assert fields["Xmp.photoshop.City"] == "Lisbon"
    assert fields["Xmp.crs.Exposure2012"] == "+0.35"
    now = _exiv2(path)
    assert now["xmp"] == fields
    assert {k: now[k] for k in ("exif", "iptc", "icc", "comment")} == {
        k: meta[k] for k in ("exif", "iptc", "icc", "comment")
    }
    with Image.open(path) as im:
        assert parse_xmp_packet(im.info["xmp"], str(path)) == fields
    _no_temporary_files(tmp_path, path.name)


def test_a_jpeg_without_xmp_gets_a_padded_segment_after_its_exif(tmp_path: Path) -> None:
    before = camera_jpeg()
    path = _photo(tmp_path, before)

    assert write_jpeg_xmp(str(path), rating=3, label=None).changed

    after = path.read_bytes()
    others, packets, scans = segments(after)
    assert (others, scans) == segments(before)[0::2]
    # After JFIF and EXIF (APP0, APP1), before the ICC profile (APP2), as photo tools put it.
    assert (
        after.index(b"http://ns.adobe.com/xap/1.0/\x00") - 4 == len(others[0]) + len(others[1]) + 2
    )
    assert packets[0].endswith(b'<?xpacket end="w"?>')
    assert packets[0].count(b" ") >= PADDING
    assert read_embedded_xmp(str(path)) == {RATING: "3", RECORD_KEY: "3|"}


def test_a_changed_choice_is_written_in_place_and_a_rerun_writes_nothing(tmp_path: Path) -> None:
    path = _photo(tmp_path, camera_jpeg(lightroom_packet()))
    write_jpeg_xmp(str(path), rating=3, label=None, keeper_fields=FIELDS)
    first = path.read_bytes()
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))

    again = write_jpeg_xmp(str(path), rating=3, label=None, keeper_fields=FIELDS)

    assert again == (False, (), None, None)
    assert path.read_bytes() == first
    assert path.stat().st_mtime_ns == 1_000_000_000

    # The next decision fits in the padding: the file keeps its length, nothing after it moves.
    assert write_jpeg_xmp(str(path), rating=1, label="Red", keeper_fields=FIELDS).changed
    second = path.read_bytes()
    assert len(second) == len(first)
    assert segments(second)[0::2] == segments(first)[0::2]
    assert read_embedded_xmp(str(path))[RATING] == "1"  # type: ignore[index]
    assert path.stat().st_mtime_ns != 1_000_000_000  # photo tools and rsync see the change


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_persons_rating_in_the_file_stays_unless_told(tmp_path: Path, overwrite: bool) -> None:
    path = _photo(tmp_path, camera_jpeg(lightroom_packet(rating=4, label="Red")))

    done = write_jpeg_xmp(str(path), rating=1, label=None, overwrite_ratings=overwrite)

    fields = read_embedded_xmp(str(path))
    assert fields is not None
    if overwrite:
        assert (done.kept, fields[RATING], LABEL in fields) == ((), "1", False)
    else:
        assert (done.kept, fields[RATING], fields[LABEL]) == (("rating", "label"), "4", "Red")
    # what keeper set: its rating when told to overwrite; else nothing, both being the person's
    assert fields[RECORD_KEY] == ("1|" if overwrite else "|")


def test_keepers_value_changed_in_a_photo_tool_is_the_persons(tmp_path: Path) -> None:
    path = _photo(tmp_path, camera_jpeg())
    write_jpeg_xmp(str(path), rating=3, label=None)
    set_rating_as_a_tool_does(str(path), 5)  # Lightroom's five stars, written into the file

    assert write_jpeg_xmp(str(path), rating=2, label=None).kept == ("rating",)
    assert read_embedded_xmp(str(path))[RATING] == "5"  # type: ignore[index]


def test_the_merge_is_the_sidecars(tmp_path: Path) -> None:
    """One merge: the packet in the file holds what a sidecar merged from the same packet does."""
    packet = lightroom_packet(rating=2, pad=0)
    path = _photo(tmp_path, camera_jpeg(packet))
    sidecar = tmp_path / "IMG_0001.xmp"
    sidecar.write_bytes(packet)
    for target in (str(path), str(sidecar)):
        writer = write_jpeg_xmp if target == str(path) else write_sidecar
        assert writer(target, rating=5, label="Blue", keeper_fields=FIELDS).kept == ("rating",)
    assert read_embedded_xmp(str(path)) == parse_xmp_packet(sidecar.read_bytes(), str(sidecar))


def test_permissions_and_extended_attributes_are_kept(tmp_path: Path) -> None:
    path = _photo(tmp_path, camera_jpeg())
    path.chmod(0o640)
    xattrs = hasattr(os, "setxattr")
    try:
        os.setxattr(path, "user.keeper.test", b"tagged")
    except (AttributeError, OSError):
        xattrs = False  # a file system without user attributes

    assert write_jpeg_xmp(str(path), rating=4, label=None).changed

    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    if xattrs:
        assert os.getxattr(path, "user.keeper.test") == b"tagged"


def _mpo(xmp: bytes | None = None) -> bytes:
    """A multi-picture JPEG as PIL writes one: SOI, JFIF, the MPF index, its XMP when given,
    ..., a second image."""
    first = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 32, 3), np.uint8))
    second = Image.new("RGB", (32, 24), (200, 30, 90))
    buf = io.BytesIO()
    kw = {} if xmp is None else {"xmp": xmp}
    first.save(buf, "MPO", save_all=True, append_images=[second], **kw)
    return buf.getvalue()


def _frames(data: bytes) -> list[np.ndarray]:
    with Image.open(io.BytesIO(data)) as im:
        out = []
        for k in range(im.n_frames):
            im.seek(k)
            out.append(np.asarray(im.convert("RGB")))
        return out


def test_a_damaged_maker_note_is_kept_as_it_is(tmp_path: Path) -> None:
    """exiv2 refuses to read EXIF whose maker note is damaged; keeper never asks it to write
    one, so such a photo is written, its EXIF byte for byte."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS R5"
    exif.get_ifd(0x8769)[0x927C] = b"\xff\xff" + bytes(range(64))  # 65535 entries, claimed
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (90, 60, 30)).save(buf, "JPEG", exif=exif.tobytes())
    path = _photo(tmp_path, buf.getvalue())

    assert write_jpeg_xmp(str(path), rating=4, label=None).changed

    assert segments(path.read_bytes())[0::2] == segments(buf.getvalue())[0::2]
    with Image.open(path) as im:
        assert im.info["exif"] == Image.open(io.BytesIO(buf.getvalue())).info["exif"]


def test_a_multi_picture_file_keeps_its_second_image(tmp_path: Path) -> None:
    """An MPO (a camera's preview, an HDR gain map): keeper's segment goes before the index, so
    its offsets to the second image move with it."""
    before = _mpo()
    path = _photo(tmp_path, before)

    assert write_jpeg_xmp(str(path), rating=5, label=None).changed

    after = _frames(path.read_bytes())
    assert len(after) == 2
    assert all(np.array_equal(a, b) for a, b in zip(after, _frames(before), strict=True))
    assert read_embedded_xmp(str(path))[RATING] == "5"  # type: ignore[index]


def test_a_packet_after_the_multi_picture_index_changes_only_in_place(tmp_path: Path) -> None:
    """Behind the index, a segment that grew would move the second image away from where the
    index says it is: refused; one that fits in its padding is written in place."""
    path = _photo(tmp_path, _mpo(lightroom_packet(rating=2, pad=0)))
    before = path.read_bytes()
    with pytest.raises(DataError, match="comes after its multi-picture index"):
        write_jpeg_xmp(str(path), rating=5, label=None, keeper_fields=FIELDS)
    assert path.read_bytes() == before

    roomy = _mpo(lightroom_packet(rating=2))
    path.write_bytes(roomy)
    assert write_jpeg_xmp(str(path), rating=5, label=None, keeper_fields=FIELDS).changed
    after = path.read_bytes()
    assert len(after) == len(roomy)
    assert all(np.array_equal(a, b) for a, b in zip(_frames(after), _frames(roomy), strict=True))


def _read_only(path: Path) -> None:
    path.chmod(0o444)


def _symlink(path: Path) -> None:
    target = path.with_name("elsewhere.jpg")
    path.rename(target)
    path.symlink_to(target)


def _hard_link(path: Path) -> None:
    os.link(path, path.with_name("keepers-copy.jpg"))


REFUSED = {
    "read-only": (_read_only, "read-only"),
    "symlink": (_symlink, "a symlink"),
    "hard link": (_hard_link, "has 2 hard links"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-200]), "cut short"),
    "no EOI": (lambda p: p.write_bytes(p.read_bytes()[:-2]), "cut short"),
    "not a JPEG": (lambda p: Image.new("RGB", (8, 8)).save(p, "PNG"), "not a JPEG"),
    "two packets": (
        lambda p: p.write_bytes(insert_segment(p.read_bytes(), xmp_segment(lightroom_packet(3)))),
        "2 standard XMP segments",
    ),
    "damaged segment": (
        lambda p: p.write_bytes(p.read_bytes()[:4] + b"\x00\x02" + p.read_bytes()[6:]),
        "no JPEG segment marker",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_file_keeper_must_not_write_is_refused_and_left_as_it_is(
    tmp_path: Path, case: str
) -> None:
    spoil, reason = REFUSED[case]
    path = _photo(tmp_path, camera_jpeg(lightroom_packet(rating=2)))
    spoil(path)
    names = sorted(p.name for p in tmp_path.iterdir())
    real = Path(os.path.realpath(path))
    data, mtime = real.read_bytes(), real.stat().st_mtime_ns

    with pytest.raises(DataError, match=reason) as e:
        write_jpeg_xmp(str(path), rating=5, label=None)

    assert "left as it is" in str(e.value)
    assert (real.read_bytes(), real.stat().st_mtime_ns) == (data, mtime)
    assert path.is_symlink() == (case == "symlink")
    _no_temporary_files(tmp_path, *names)


@pytest.mark.parametrize("seed", range(40))
def test_damage_anywhere_is_a_reason_or_a_clean_write_never_a_crash(
    tmp_path: Path, seed: int
) -> None:
    """Seeded damage to a JPEG's header or scans: a KeeperError naming the file and the file
    left as it was, or (damage keeper's walk cannot see, inside a segment's body or the scans)
    a write whose every byte but the XMP segment is the damaged file's."""
    rng = np.random.default_rng(seed)
    data = bytearray(camera_jpeg(lightroom_packet(rating=2), seed=seed))
    if seed % 4 == 0:
        data = data[: int(rng.integers(2, len(data)))]
    else:
        for at in rng.integers(0, min(len(data), 4000), int(rng.integers(1, 4))):
            data[at] = int(rng.integers(0, 256))
    path = _photo(tmp_path, bytes(data))
    error: KeeperError | None = None
    try:
        write_jpeg_xmp(str(path), rating=5, label=None)
    except KeeperError as e:
        error = e
    if error is not None:
        assert str(path) in str(error)
        assert path.read_bytes() == data
    else:
        others, _, scans = segments(path.read_bytes())
        assert (others, scans) == segments(bytes(data))[0::2]
    _no_temporary_files(tmp_path, path.name)


def test_a_file_changed_while_keeper_writes_it_is_left_to_the_other_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _photo(tmp_path, camera_jpeg())
    theirs = camera_jpeg(lightroom_packet(rating=1), seed=7)
    check = jpeg_xmp.parse_image_xmp

    def meanwhile(*args: object, **kw: object) -> object:
        path.write_bytes(theirs)  # a photo tool saves the file after keeper read it
        return check(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(jpeg_xmp, "parse_image_xmp", meanwhile)
    with pytest.raises(DataError, match="changed since keeper read it"):
        write_jpeg_xmp(str(path), rating=5, label=None)
    assert path.read_bytes() == theirs
    _no_temporary_files(tmp_path, path.name)


def _refuses_new_files(before: bytes) -> Callable[..., dict[str, object]]:
    """exiv2's whole-file read (``parse_image_xmp``) refusing every file but ``before``."""
    real = jpeg_xmp.parse_image_xmp

    def parse(data: bytes, source: str, *, mime: str) -> dict[str, object]:
        if data != before:
            raise DataError("exiv2 says no", source=source)
        return real(data, source, mime=mime)

    return parse


#: A check of the new file failing: what is replaced, by what (given the original), the reason.
FAILED_CHECKS = {
    "keeper's reader disagrees": (
        "read_embedded_xmp",
        lambda before: lambda uri: {},
        "keeper's reader does not find the intended packet",
    ),
    "exiv2 reads the original, not the new file": (
        "parse_image_xmp",
        _refuses_new_files,
        r"exiv2 cannot read the new file \(exiv2 says no\)",
    ),
}


@pytest.mark.parametrize("case", list(FAILED_CHECKS))
def test_a_failed_check_of_the_new_file_leaves_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    name, make, reason = FAILED_CHECKS[case]
    before = camera_jpeg(lightroom_packet())
    path = _photo(tmp_path, before)
    monkeypatch.setattr(jpeg_xmp, name, make(before))
    with pytest.raises(DataError, match=reason):
        write_jpeg_xmp(str(path), rating=5, label=None)
    assert path.read_bytes() == before
    _no_temporary_files(tmp_path, path.name)


def test_an_oversized_packet_and_s3_are_refused(tmp_path: Path) -> None:
    path = _photo(tmp_path, camera_jpeg())
    before = path.read_bytes()
    with pytest.raises(DataError, match="more than a JPEG's XMP segment holds"):
        write_jpeg_xmp(str(path), rating=5, label=None, keeper_fields={"reasons": "x" * 70_000})
    assert path.read_bytes() == before
    with pytest.raises(ConfigError, match="local JPEGs only"):
        write_jpeg_xmp("s3://photos/IMG_1.JPG", rating=5, label=None)


def _icc_chunks_reversed(data: bytes) -> bytes:
    """``data`` with its one ICC segment split into two chunks stored second first: valid (the
    ICC specification numbers the chunks so that readers put them in order; PIL does), but
    exiv2 refuses the whole file ("Not a valid ICC Profile")."""
    sig = b"ICC_PROFILE\x00"
    at = data.index(b"\xff\xe2")
    assert data[at + 4 : at + 4 + len(sig)] == sig
    end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    profile = data[at + 4 + len(sig) + 2 : end]

    def chunk(number: int, body: bytes) -> bytes:
        payload = sig + bytes([number, 2]) + body
        return b"\xff\xe2" + (len(payload) + 2).to_bytes(2, "big") + payload

    half = len(profile) // 2
    return data[:at] + chunk(2, profile[half:]) + chunk(1, profile[:half]) + data[end:]


def test_a_jpeg_exiv2_refuses_for_its_icc_chunks_gets_keepers_xmp(tmp_path: Path) -> None:
    """exiv2 refused the whole file, so the check of the new file did, with a wrong reason
    ("not a file of type image/jpeg"): the original's ICC chunks, not the write, are what exiv2
    refuses, and every byte but the XMP segment is the original's, so keeper's own reader checks
    the packet. A new file exiv2 refuses where it read the original is still refused."""
    before = _icc_chunks_reversed(camera_jpeg(lightroom_packet(rating=2)))
    with pytest.raises(RuntimeError, match="ICC"):
        pyexiv2.ImageData(before)
    with Image.open(io.BytesIO(before)) as im:
        icc = im.info["icc_profile"]
    path = _photo(tmp_path, before)

    done = write_jpeg_xmp(str(path), rating=5, label="Green", keeper_fields=FIELDS)

    assert done[:2] == (True, ("rating",))
    after = path.read_bytes()
    assert segments(after)[0::2] == segments(before)[0::2]
    fields = read_embedded_xmp(str(path))
    assert fields is not None
    assert (fields[RATING], fields[LABEL]) == ("2", "Green")
    with Image.open(path) as im:
        assert im.info["icc_profile"] == icc
        assert parse_xmp_packet(im.info["xmp"], str(path)) == fields
    _no_temporary_files(tmp_path, path.name)
