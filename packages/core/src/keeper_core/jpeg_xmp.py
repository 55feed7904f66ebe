"""Write keeper's XMP into a JPEG original itself (``keeper pick --xmp embed``), and nothing else.

Lightroom Classic reads a sidecar for a RAW file only: a JPEG's rating and label it reads from
the XMP packet inside the file, so a photographer shooting JPEG sees keeper's picks there or
nowhere (Photo Mechanic writes its ratings into JPEGs for this reason).

    done = write_jpeg_xmp("photos/IMG_1.JPG", rating=5, label="Green", keeper_fields={"rank": "1"})
    done.changed  # False on a re-run: the file already held exactly this (same bytes, same mtime)

What changes is the file's standard XMP segment (APP1 ``http://ns.adobe.com/xap/1.0/``) and
nothing else. Its packet is merged by the sidecars' rules, with their code
(:func:`keeper_core.handback.merge_packet`): keeper's namespace replaced, a person's
``xmp:Rating`` / ``xmp:Label`` kept unless ``overwrite_ratings``, ``keeper:xmp`` recording
what keeper set them to, every other field kept. exiv2 only merges the packet and never writes
the file (writing a JPEG, it rebuilds the EXIF segment from what it parsed, and it does not know
multi-picture indexes). keeper splices the segment in itself: the new file is the
old one's bytes with that one segment replaced, or, where there was none, inserted after the
leading APP0/APP1 segments (JFIF, EXIF). A packet that fits in the old segment is padded to its
exact size, so the file keeps its length and no offset anywhere moves; a new segment gets
:data:`PADDING` bytes of room, so later runs (and Lightroom) change it in place.

Checked before the file is replaced (each failure is a :class:`DataError` naming why; the
original is left as it is):

- the file is a JPEG whose structure is walked from SOI through every scan to its EOI (a
  truncated or damaged one is refused), with at most one standard XMP segment;
- the new file, written to a temporary file in the same folder, fsynced and read back from
  disk, holds exactly the intended bytes, and walked again it has one XMP segment where keeper
  put it, every byte before it and every byte after it (EXIF and maker notes, IPTC, the ICC
  profile, every other segment, the scans, anything after EOI) identical to the original's, and
  its scans where they were, shifted by the segment's growth, complete through EOI;
- :func:`keeper_core.embedded_xmp.read_embedded_xmp` (what ``keeper feedback-from-xmp`` reads)
  and exiv2 (reading the whole JPEG) both find in it exactly the packet keeper merged (where
  exiv2 refuses the original too, for the same reason, such as out-of-order ICC profile chunks,
  keeper's reader is the check: every other byte is the original's);
- the original is unchanged since it was read (inode, size and modification time; a program
  saving it in the moment between that look and the rename is not seen: photo tools share no
  lock on a file).

Pixels are not decoded: a decoder reads the same tables, frame header and entropy-coded bytes,
which are compared byte for byte, so it can only agree (a 24 MP decode is ~100 ms more per
photo). Then the temporary file gets the original's permissions (and, run as root, its owner)
and Linux extended attributes, and ``os.replace`` renames it over the original: whatever
happens, the file is the old one or the new one, whole. Its modification time is the write's,
so photo tools and backups (rsync compares size and mtime) see the change.

Refused, each a :class:`DataError` with the reason: a symlink (keeper writes no original through
a link: its target may be outside the input, or another library's); a file with several hard
links (replacing it would leave the other names with the old bytes); a read-only file; a file
that is not a JPEG by its bytes; a packet over :data:`MAX_PACKET` bytes (keeper writes no
Extended XMP); an XMP segment that must grow but comes after the file's multi-picture index
(MPF: a camera's preview, an HDR gain map), whose offsets to the later images would no longer
fit. (Before the index, as keeper puts a new segment, those offsets move with the images; the
index's record of the first image's own size is left as it was, as exiv2 leaves it.) A linked
or read-only file that already holds keeper's packet is unchanged, not refused. On macOS
extended attributes (Finder tags) are not carried to the new file: Python has no call to list
them there.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, NamedTuple

from keeper_core import storage
from keeper_core.embedded_xmp import (
    JPEG_XMP_SIGNATURE,
    content_digest,
    jpeg_header,
    jpeg_image_end,
    read_embedded_xmp,
)
from keeper_core.errors import ConfigError, DataError, StorageError
from keeper_core.handback import (
    KeeperXmp,
    SidecarWrite,
    XmpRemoval,
    XmpValue,
    holds_keepers_fields,
    merge_packet,
    parse_image_xmp,
    parse_xmp_packet,
    remove_from_packet,
    restore_owner_and_mode,
)

#: Names of the photos whose XMP ``xmp=embed`` writes into the file; every other photo gets a
#: sidecar beside it.
EMBED_SUFFIXES = (".jpg", ".jpeg")
_SIG = len(JPEG_XMP_SIGNATURE)
#: The most bytes a JPEG's standard XMP segment holds after its signature (a segment's 16-bit
#: length counts its own two bytes).
MAX_PACKET = 0xFFFF - 2 - _SIG
#: Room left after the packet in a segment keeper makes (the XMP specification's 2 KB), so a
#: later change fits in place and the file keeps its size.
PADDING = 2048
_WS = b"\x00 \t\r\n"  # what a writer pads a packet with; embedded_xmp strips it too
_TRAILER = re.compile(rb"[ \t\r\n]*(<\?xpacket end=)")
_APP0, _APP1, _APP2, _SOS = 0xE0, 0xE1, 0xE2, 0xDA
_MPF = b"MPF\x00"


def embeds_into(uri: str) -> bool:
    """Whether ``xmp=embed`` writes ``uri``'s XMP into the file itself (a JPEG, by its name)."""
    return uri.lower().endswith(EMBED_SUFFIXES)


class _Original(NamedTuple):
    path: str
    data: bytes
    st: os.stat_result


class _Splice(NamedTuple):
    """Where the new XMP segment goes in the original, and what is there now."""

    start: int  # the old XMP segment's first byte, or where a new one is inserted
    end: int  # just past the old segment (== start: none)
    packet: bytes  # the old packet without its padding (:func:`_unpadded`; b"": none)
    segments: int  # the original's segments up to its first scan
    sos: int  # the original's first SOS marker
    image_end: int  # just past the original's EOI
    mpf_before: bool  # a multi-picture index comes before ``start``


def write_jpeg_xmp(
    image_uri: str,
    *,
    rating: int,
    label: str | None,
    keeper_fields: Mapping[str, str] | None = None,
    overwrite_ratings: bool = False,
) -> SidecarWrite:
    """Merge keeper's rating, label and fields into the XMP packet inside a local JPEG.

    The packet is merged as :func:`keeper_core.handback.write_sidecar` merges a sidecar; a file
    whose packet would not change is not written (same bytes, same mtime). See the module
    docstring for what is checked before the file is replaced, and what is refused.

    Args:
        image_uri: a local JPEG.
        rating: -1 (rejected) to 5, as ``xmp:Rating``.
        label: the colour label (``xmp:Label``), or None for none.
        keeper_fields: ``keeper:<name>`` values.
        overwrite_ratings: set ``xmp:Rating`` and ``xmp:Label`` whoever set them before.

    Returns:
        Whether the file was written, and which of a person's values (rating, label) it kept.

    Raises:
        ConfigError: a bad rating, label or field, or an ``s3://`` URI.
        DataError: the file is refused or a check failed (it is left as it is).
        StorageError: reading or writing it failed (it is left as it is).
    """
    choice = KeeperXmp(rating, label, keeper_fields or {})
    if storage.is_s3(image_uri):
        raise ConfigError(f"keeper writes XMP into local JPEGs only; {image_uri} is on S3")
    old = _read_original(image_uri)
    splice = _splice(old.data, image_uri)
    merge = merge_packet(
        splice.packet,
        choice,
        source=image_uri,
        overwrite_ratings=overwrite_ratings,
        what="the JPEG's XMP packet",
    )
    if merge.packet == splice.packet:  # keeper's own packet, as it wrote it: nothing to do
        return SidecarWrite(False, merge.kept)
    _check_replaceable(old, image_uri)
    new = (
        old.data[: splice.start]
        + _segment(merge.packet, splice, image_uri)
        + old.data[splice.end :]
    )
    stamp = storage.replace_file(
        old.path, new, check=lambda tmp: _check(tmp, new, old, splice, merge.packet, image_uri)
    )
    return SidecarWrite(True, merge.kept, stamp, content_digest(old.data, image_uri))


def remove_jpeg_xmp(image_uri: str, *, dry_run: bool = False, links_going: int = 0) -> XmpRemoval:
    """Take keeper's fields out of the XMP packet inside a local JPEG (``keeper unpick`` after
    ``keeper pick --xmp embed``), by the sidecars' rule (:func:`keeper_core.handback.
    remove_from_packet`): a person's rating or label stays, every other field stays.

    Where nothing else is left in the packet, the XMP segment goes: a JPEG keeper wrote into
    that had no XMP before is then byte for byte what it was before keeper ran (keeper inserted
    that one segment and changed nothing else). Otherwise the packet without keeper's fields is
    written into the segment as :func:`write_jpeg_xmp` writes one, with the same checks before
    the file is replaced. A JPEG whose packet holds none of keeper's fields is not written.

    Args:
        image_uri: a local JPEG.
        dry_run: change nothing; the outcome says what would happen (a file that would be
            refused is refused).
        links_going: hard links to the file a dry run of ``keeper unpick --keepers`` would
            have removed first (``keepers``' own), not counted against it.

    Returns:
        ``cleaned``, ``deleted`` (the segment removed), ``untouched`` (no keeper field) or
        ``absent`` (no file, or no XMP in it), with the new stamp and content digest of a file
        written.

    Raises:
        ConfigError: an ``s3://`` URI.
        DataError: the file is refused or a check failed (it is left as it is).
        StorageError: reading or writing it failed (it is left as it is).
    """
    if storage.is_s3(image_uri):
        raise ConfigError(f"keeper writes XMP into local JPEGs only; {image_uri} is on S3")
    path = image_uri.removeprefix("file://")
    if not os.path.lexists(path):
        return XmpRemoval("absent")
    if os.path.islink(path):
        # keeper never writes through a link (write_jpeg_xmp refuses one): a linked JPEG that
        # holds keeper's fields got them elsewhere, and is refused below like any write.
        found = read_embedded_xmp(image_uri) if os.path.exists(path) else None
        if found is None:
            return XmpRemoval("absent")
        if not holds_keepers_fields(found):
            return XmpRemoval("untouched")
    old = _read_original(image_uri)
    splice = _splice(old.data, image_uri)
    if not splice.packet:
        return XmpRemoval("absent")
    removal = remove_from_packet(splice.packet, source=image_uri, what="the JPEG's XMP packet")
    if not removal.changed:
        return XmpRemoval("untouched")
    outcome: Literal["cleaned", "deleted"] = "deleted" if removal.packet is None else "cleaned"
    _check_replaceable(old, image_uri, links_going=links_going)
    if dry_run:
        return XmpRemoval(outcome, removal.kept)
    segment = b"" if removal.packet is None else _segment(removal.packet, splice, image_uri)
    new = old.data[: splice.start] + segment + old.data[splice.end :]
    stamp = storage.replace_file(
        old.path, new, check=lambda tmp: _check(tmp, new, old, splice, removal.packet, image_uri)
    )
    return XmpRemoval(outcome, removal.kept, stamp, content_digest(old.data, image_uri))


def _read_original(uri: str) -> _Original:
    """The file's bytes and stat, once it is known to be one keeper may replace."""
    path = uri.removeprefix("file://")
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise DataError(
                "a symlink: keeper writes into no original through a link (its target may be "
                "outside the input, or another library's); left as it is",
                source=uri,
            )
        if not stat.S_ISREG(st.st_mode):
            raise DataError("not a regular file; left as it is", source=uri)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        with os.fdopen(os.open(path, flags), "rb") as f:
            opened = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        raise StorageError(uri, f"cannot read the photo: {e.strerror or e}") from e
    if (opened.st_ino, opened.st_dev) != (st.st_ino, st.st_dev) or len(data) != opened.st_size:
        raise DataError("changed while keeper read it; left as it is", source=uri)
    return _Original(path, data, opened)


def _check_replaceable(old: _Original, uri: str, *, links_going: int = 0) -> None:
    """Refuse a file keeper must not replace; asked only of one whose packet would change, so
    a keeper hard-linked by ``--link-keepers``, or a read-only file, that already holds keeper's
    packet is unchanged, not failed, on a re-run."""
    if old.st.st_nlink - links_going > 1:
        raise DataError(
            f"has {old.st.st_nlink} hard links: replacing it would leave the other names with "
            "the old bytes; left as it is",
            source=uri,
        )
    # The rename needs only the folder's permission: a file marked read-only, or one this user
    # may not write, is refused here, as a photo tool would refuse to save it.
    if not old.st.st_mode & stat.S_IWUSR or not os.access(old.path, os.W_OK):
        raise DataError("read-only; left as it is", source=uri)


def _splice(data: bytes, uri: str) -> _Splice:
    """Where keeper's segment goes, once the file is known to be a whole JPEG."""
    if data[:2] != b"\xff\xd8":
        raise DataError("not a JPEG (no SOI marker first); left as it is", source=uri)
    try:
        header = jpeg_header(data, uri)
        first = header.segments[-1]
        if first.marker != _SOS:
            raise DataError("no image data: it ends before any scan", source=uri)
        image_end = jpeg_image_end(data, first.start, uri)
    except DataError as e:
        why = str(e).removeprefix(f"{uri}: ")
        raise DataError(f"a damaged JPEG: {why}; left as it is", source=uri) from e
    if len(header.xmp) > 1:
        raise DataError(
            f"holds {len(header.xmp)} standard XMP segments: which one a photo tool reads is "
            "not defined; left as it is",
            source=uri,
        )
    if header.xmp:
        seg = header.segments[header.xmp[0]]
        start, end = seg.start, seg.end
        packet = _unpadded(data[start + 4 + _SIG : end])
    else:
        start = end = 2
        for seg in header.segments:  # after JFIF and EXIF, where photo tools put it
            if seg.marker not in (_APP0, _APP1):
                break
            start = end = seg.end
        packet = b""
    mpf_before = any(
        s.marker == _APP2 and data[s.start + 4 : s.start + 8] == _MPF and s.start < start
        for s in header.segments
    )
    return _Splice(start, end, packet, len(header.segments), first.start, image_end, mpf_before)


def _unpadded(packet: bytes) -> bytes:
    """A packet without its padding, laid out as exiv2 ends one (a newline before the trailer):
    keeper's own packet, padded in the file, reads back as the bytes it merged."""
    if not packet.strip(_WS):
        return b""
    return _TRAILER.sub(rb"\n\1", packet.strip(_WS), count=1)


def _padded(packet: bytes, n: int) -> bytes:
    """``packet`` with ``n`` bytes of whitespace before its trailer (or after it, if none), in
    lines of 100 as the XMP specification writes padding."""
    pad = ((b" " * 99 + b"\n") * (n // 100 + 1))[:n]
    m = _TRAILER.search(packet)
    if m is None:
        return packet + pad
    return packet[: m.start(1)] + pad + packet[m.start(1) :]


def _segment(packet: bytes, splice: _Splice, uri: str) -> bytes:
    """The APP1 segment holding ``packet``: the old segment's size when it fits, else grown."""
    if len(packet) > MAX_PACKET:
        raise DataError(
            f"keeper's XMP packet would be {len(packet)} bytes, more than a JPEG's XMP segment "
            f"holds ({MAX_PACKET}; keeper writes no Extended XMP); left as it is",
            source=uri,
        )
    room = splice.end - splice.start - 4 - _SIG
    if splice.end > splice.start and len(packet) <= room:
        body = _padded(packet, room - len(packet))  # in place: no byte after it moves
    else:
        if splice.mpf_before:
            raise DataError(
                "its XMP segment must grow, and comes after its multi-picture index (MPF: a "
                "camera's preview or an HDR gain map), whose offsets to those images would no "
                "longer fit; left as it is",
                source=uri,
            )
        body = _padded(packet, min(PADDING, MAX_PACKET - len(packet)))
    return b"\xff\xe1" + struct.pack(">H", 2 + _SIG + len(body)) + JPEG_XMP_SIGNATURE + body


def _check(
    tmp: str, new: bytes, old: _Original, splice: _Splice, packet: bytes | None, uri: str
) -> None:
    """Everything checked of the new file (written, fsynced, not yet renamed) before it
    replaces the original; raising leaves the original as it is. ``packet`` None: the XMP
    segment was removed (:func:`remove_jpeg_xmp`)."""

    def refuse(why: str) -> DataError:
        return DataError(f"{why}; left as it is", source=uri)

    got = Path(tmp).read_bytes()
    if got != new:
        raise refuse("the new file read back from disk is not what was written")
    try:
        header = jpeg_header(got, uri)
        scans_end = jpeg_image_end(got, header.segments[-1].start, uri)
    except DataError as e:
        raise refuse(f"the new file's structure cannot be walked ({e})") from e
    removed = packet is None
    if len(header.xmp) != (0 if removed else 1):
        raise refuse(
            f"the new file holds {len(header.xmp)} XMP segments, not {'none' if removed else 'one'}"
        )
    if removed:
        start = end = splice.start
    else:
        seg = header.segments[header.xmp[0]]
        start, end = seg.start, seg.end
    if got[:start] != old.data[: splice.start] or got[end:] != old.data[splice.end :]:
        raise refuse("bytes outside the XMP segment would change")
    grown = (end - start) - (splice.end - splice.start)
    first = header.segments[-1]
    added = int(not removed) - int(splice.end > splice.start)  # 1 inserted, 0 replaced, -1 gone
    if (
        (first.marker, first.start) != (_SOS, splice.sos + grown)
        or len(header.segments) != splice.segments + added
        or scans_end != splice.image_end + grown
    ):
        raise refuse("the new file's segments or scans are not the original's")
    want = None if packet is None else parse_xmp_packet(packet, uri, what="keeper's XMP packet")
    if read_embedded_xmp(tmp) != want:
        raise refuse("keeper's reader does not find the intended packet in the new file")
    try:
        by_exiv2 = _exiv2_reads(got, old.data, uri)
    except DataError as e:
        raise refuse(f"exiv2 cannot read the new file ({str(e).removeprefix(uri + ': ')})") from e
    if by_exiv2 not in (want or {}, None):
        raise refuse("exiv2 does not find the intended packet in the new file")
    try:
        restore_owner_and_mode(tmp, old.st)
    except StorageError as e:
        raise StorageError(uri, f"the new file cannot get the original's mode: {e}") from e
    _copy_xattrs(old.path, tmp, uri)
    now = os.lstat(old.path)
    if (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) != (
        old.st.st_ino,
        old.st.st_dev,
        old.st.st_size,
        old.st.st_mtime_ns,
    ):
        raise refuse("changed since keeper read it (another program wrote it?)")


def _exiv2_reads(new: bytes, old: bytes, uri: str) -> dict[str, XmpValue] | None:
    """The XMP fields exiv2 finds reading the whole new file; None where it cannot read the
    original either, for the same reason.

    exiv2 refuses some valid JPEGs for a segment that is not the XMP's: ICC profile chunks
    stored out of order ("Not a valid ICC Profile"; the ICC specification numbers the chunks
    so that a reader can put them in order, as libjpeg and Pillow do). Every byte outside the
    XMP segment is the original's (checked before), so that refusal is the original's, not the
    write's, and keeper's own reader of the segment stands as the check of the packet.

    Raises:
        DataError: exiv2 cannot read the new file, where it could read the original or
            refused it for another reason.
    """
    try:
        return parse_image_xmp(new, uri, mime="image/jpeg")
    except DataError as e:
        try:
            parse_image_xmp(old, uri, mime="image/jpeg")
        except DataError as before:
            if str(before) == str(e):
                return None
        raise


def _copy_xattrs(src: str, dst: str, uri: str) -> None:
    """The original's extended attributes onto the new file (Linux; see the module docstring).

    A ``security.*`` attribute (an SELinux label) that cannot be set is left to the folder's
    default, as any program's save leaves it; any other that cannot be carried refuses the write.
    """
    if not hasattr(os, "listxattr"):
        return
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return  # a file system without extended attributes
    for name in names:
        try:
            value = os.getxattr(src, name, follow_symlinks=False)
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as e:
            if name.startswith("security."):
                continue
            raise DataError(
                f"its extended attribute {name} cannot be carried to the new file "
                f"({e.strerror or e}); left as it is",
                source=uri,
            ) from e
