"""keeper's fields out of a sidecar or a JPEG again (``keeper unpick``'s file operations):
``handback.remove_from_packet`` / ``remove_from_sidecar`` and ``jpeg_xmp.remove_jpeg_xmp``,
named cases beside test_unpick_history's random ones."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support_jpeg import camera_jpeg, lightroom_packet, segments
from test_xmp_resources import LICENCE, WIKIMEDIA, _link

from keeper_core.embedded_xmp import read_embedded_xmp
from keeper_core.errors import ConfigError, DataError
from keeper_core.handback import (
    parse_xmp_packet,
    read_sidecar,
    remove_from_packet,
    remove_from_sidecar,
    write_sidecar,
)
from keeper_core.jpeg_xmp import remove_jpeg_xmp, write_jpeg_xmp

KEEPERS = {"group": "g1", "rank": "1", "decision": "keep", "reasons": "sharpest"}


def _keepers(fields: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if k.startswith("Xmp.keeper.")}


@pytest.mark.parametrize(
    "before",
    [
        lightroom_packet(),  # keywords, a city, develop settings; no rating
        lightroom_packet(rating=4, label="Blue"),  # a person's rating and label before keeper
        WIKIMEDIA,  # a licence link (rdf:resource)
    ],
    ids=["lightroom", "rated", "licence"],
)
def test_a_sidecar_keeper_merged_into_holds_its_own_fields_again(
    tmp_path: Path, before: bytes
) -> None:
    path = tmp_path / "IMG_1.xmp"
    path.write_bytes(before)
    fields = read_sidecar(str(path))
    assert write_sidecar(str(path), rating=2, label="Red", keeper_fields=KEEPERS).changed
    assert _keepers(read_sidecar(str(path)))

    done = remove_from_sidecar(str(path))

    assert done.outcome == "cleaned"
    assert done.kept == tuple(n for n, k in (("rating", "Rating"), ("label", "Label"))
                              if f"Xmp.xmp.{k}" in fields)  # fmt: skip
    assert read_sidecar(str(path)) == fields
    if before is WIKIMEDIA:
        assert _link(path.read_bytes(), "http://creativecommons.org/ns#", "license") == LICENCE


def test_a_sidecar_keeper_made_is_deleted_and_one_it_never_wrote_is_left(tmp_path: Path) -> None:
    made, theirs = tmp_path / "IMG_1.xmp", tmp_path / "IMG_2.xmp"
    write_sidecar(str(made), rating=5, label="Green", keeper_fields=KEEPERS)
    theirs.write_bytes(lightroom_packet(rating=3))
    os.utime(theirs, ns=(1, 1))

    assert remove_from_sidecar(str(made), dry_run=True).outcome == "deleted"
    assert made.exists()
    assert remove_from_sidecar(str(made)).outcome == "deleted"
    assert not made.exists()
    assert remove_from_sidecar(str(made)).outcome == "absent"
    assert remove_from_sidecar(str(theirs)).outcome == "untouched"
    assert theirs.read_bytes() == lightroom_packet(rating=3)
    assert theirs.stat().st_mtime_ns == 1


def test_a_rating_a_person_changed_after_the_run_stays(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.xmp"
    write_sidecar(str(path), rating=2, label=None, keeper_fields=KEEPERS)
    path.write_text(path.read_text().replace('xmp:Rating="2"', 'xmp:Rating="5"'))

    done = remove_from_sidecar(str(path))

    assert (done.outcome, done.kept) == ("cleaned", ("rating",))
    assert read_sidecar(str(path)) == {"Xmp.xmp.Rating": "5"}


def test_an_older_keepers_sidecar_without_a_record_is_keepers_whole() -> None:
    """A sidecar an older keeper wrote (its fields, no ``keeper:xmp``): the rating is keeper's."""
    packet = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        b'xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        b'xmlns:keeper="https://keeper.invalid/ns/xmp/1.0/" xmp:Rating="5" keeper:rank="1"/>'
        b"</rdf:RDF></x:xmpmeta>"
    )
    assert remove_from_packet(packet, source="old.xmp") == (None, True, ())


def test_a_symlinked_sidecar_is_emptied_through_the_link(tmp_path: Path) -> None:
    real, link = tmp_path / "store" / "IMG_1.xmp", tmp_path / "IMG_1.xmp"
    real.parent.mkdir()
    write_sidecar(str(real), rating=5, label=None, keeper_fields=KEEPERS)
    link.symlink_to(real)

    assert remove_from_sidecar(str(link)).outcome == "cleaned"  # the file stays, empty

    assert link.is_symlink()
    assert real.exists()
    assert parse_xmp_packet(real.read_bytes(), str(real)) == {}


def test_what_cannot_be_changed_is_refused_and_left(tmp_path: Path) -> None:
    read_only = tmp_path / "IMG_1.xmp"
    write_sidecar(str(read_only), rating=5, label=None, keeper_fields=KEEPERS)
    read_only.chmod(stat.S_IRUSR)
    broken = tmp_path / "IMG_2.xmp"
    broken.write_bytes(b"\x00 not xmp")
    before = read_only.read_bytes()

    with pytest.raises(DataError, match="read-only"):
        remove_from_sidecar(str(read_only))
    with pytest.raises(DataError, match="not an XMP sidecar"):
        remove_from_sidecar(str(broken))
    with pytest.raises(ConfigError, match=r"must end in \.xmp"):
        remove_from_sidecar(str(tmp_path / "IMG_1.jpg"))
    assert read_only.read_bytes() == before
    assert broken.read_bytes() == b"\x00 not xmp"


def test_a_jpeg_with_a_tools_packet_gets_it_back_in_place(tmp_path: Path) -> None:
    """The packet without keeper's fields goes back into the segment, padded to its size: the
    file keeps its length, and every other segment and the scans are the original's."""
    path = tmp_path / "IMG_1.JPG"
    photo = camera_jpeg(lightroom_packet())
    path.write_bytes(photo)
    want = read_embedded_xmp(str(path))
    write_jpeg_xmp(str(path), rating=5, label="Green", keeper_fields=KEEPERS)
    written = path.read_bytes()

    done = remove_jpeg_xmp(str(path))

    assert (done.outcome, done.kept) == ("cleaned", ())
    assert read_embedded_xmp(str(path)) == want
    after = path.read_bytes()
    assert len(after) == len(written)
    others, packets, scans = segments(after)
    assert (others, scans) == (segments(photo)[0], segments(photo)[2])
    assert len(packets) == 1


def test_a_jpeg_keeper_never_wrote_into_is_not_written(tmp_path: Path) -> None:
    rated, bare = tmp_path / "IMG_1.JPG", tmp_path / "IMG_2.JPG"
    rated.write_bytes(camera_jpeg(lightroom_packet(rating=4)))
    bare.write_bytes(camera_jpeg(seed=2))
    for path in (rated, bare):
        os.utime(path, ns=(1, 1))
    link = tmp_path / "IMG_3.JPG"
    link.symlink_to(rated)

    assert remove_jpeg_xmp(str(rated)).outcome == "untouched"
    assert remove_jpeg_xmp(str(bare)).outcome == "absent"
    assert remove_jpeg_xmp(str(link)).outcome == "untouched"
    assert remove_jpeg_xmp(str(tmp_path / "IMG_4.JPG")).outcome == "absent"
    assert rated.stat().st_mtime_ns == bare.stat().st_mtime_ns == 1
    with pytest.raises(ConfigError, match="local JPEGs only"):
        remove_jpeg_xmp("s3://bucket/IMG_1.JPG")


def test_a_read_only_or_linked_jpeg_holding_keepers_fields_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.JPG"
    path.write_bytes(camera_jpeg())
    write_jpeg_xmp(str(path), rating=5, label=None, keeper_fields=KEEPERS)
    written = path.read_bytes()
    link = tmp_path / "IMG_2.JPG"
    link.symlink_to(path)
    with pytest.raises(DataError, match="symlink"):
        remove_jpeg_xmp(str(link))
    os.link(path, tmp_path / "IMG_1_hardlink.JPG")
    with pytest.raises(DataError, match="hard links"):
        remove_jpeg_xmp(str(path))
    (tmp_path / "IMG_1_hardlink.JPG").unlink()
    path.chmod(stat.S_IRUSR)
    with pytest.raises(DataError, match="read-only"):
        remove_jpeg_xmp(str(path))
    with pytest.raises(DataError, match="read-only"):  # a dry run says so too
        remove_jpeg_xmp(str(path), dry_run=True)
    assert path.read_bytes() == written


def test_sidecars_on_s3(s3_bucket: str) -> None:
    """A mirror in a bucket (``out_dir=input_root`` on S3): the same outcomes through S3's
    requests; a bucket that is not there is an error, not an absent sidecar."""
    from keeper_core import storage
    from keeper_core.errors import StorageError

    made, merged = f"s3://{s3_bucket}/a/IMG_1.xmp", f"s3://{s3_bucket}/a/IMG_2.xmp"
    write_sidecar(made, rating=5, label=None, keeper_fields=KEEPERS)
    storage.write_bytes(merged, lightroom_packet(rating=4))
    write_sidecar(merged, rating=1, label="Red", keeper_fields=KEEPERS)

    assert remove_from_sidecar(made).outcome == "deleted"
    assert not storage.exists(made)
    done = remove_from_sidecar(merged)
    assert (done.outcome, done.kept) == ("cleaned", ("rating",))
    assert read_sidecar(merged) == parse_xmp_packet(lightroom_packet(rating=4), merged)
    assert remove_from_sidecar(made).outcome == "absent"
    with pytest.raises(StorageError):
        remove_from_sidecar(f"s3://{s3_bucket}-not-there/IMG_1.xmp")
