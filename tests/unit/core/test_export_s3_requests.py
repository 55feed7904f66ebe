"""export_keepers through S3 (moto) tells a copy already there by its ETag, without downloading
it, where an ETag can say so, and still never overwrites a file that is not keeper's own copy.

Requests are counted on keeper's own S3 client (botocore's ``before-call`` event). A re-run over
unchanged keepers: S3 to S3 with keeper's record, two HEADs and no GET (it was five requests and
both objects downloaded); a multipart original (its ETag no MD5) is downloaded once, the copy
not; S3 to a local folder and a local folder to S3, no GET. Taking the copies back
(``remove_keepers_export``, what ``keeper unpick --keepers`` runs) tells keeper's copies by the
ETags the record keeps: a HEAD each, no download, where it read every copy whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from support import import_benchmark

from keeper_core import storage
from keeper_core.errors import StorageError
from keeper_core.handback import EXPORT_RECORD, export_keepers, remove_keepers_export

counted = import_benchmark("sidecar_s3_requests").counted_s3_calls


def _photos(n: int = 3) -> list[bytes]:
    return [hashlib.sha256(bytes([i])).digest() * (1000 + i) for i in range(n)]


def _put_s3(root: str, photos: list[bytes]) -> list[str]:
    uris = [storage.join(root, f"day1/IMG_{i}.JPG") for i in range(len(photos))]
    for uri, data in zip(uris, photos, strict=True):
        storage.write_bytes(uri, data)
    return uris


def test_s3_to_s3_rerun_reads_no_object(s3_bucket: str) -> None:
    root, dest = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/keepers"
    uris = _put_s3(root, _photos())
    assert export_keepers(uris, input_root=root, dest=dest, mode="copy").exported == 3
    with counted() as calls:
        res = export_keepers(uris, input_root=root, dest=dest, mode="copy")
    assert (res.already_there, res.failed) == (3, [])
    assert calls["HeadObject"] == 7  # the copy's and the original's, each; the record's
    assert calls["GetObject"] == 1  # the record; no photo
    assert calls["PutObject"] == 0


def test_a_multipart_original_is_read_once_and_its_copy_not(s3_bucket: str) -> None:
    import boto3

    root, dest = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/keepers"
    data = bytes(range(256)) * (6 * 4096 + 7)  # 6 MiB and a bit: two parts of >= 5 MiB
    client = boto3.client("s3", endpoint_url=storage.s3_client().meta.endpoint_url)
    key = "photos/day1/PANO.JPG"
    up = client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    parts = []
    for n, chunk in enumerate((data[: 5 << 20], data[5 << 20 :]), start=1):
        etag = client.upload_part(
            Bucket=s3_bucket, Key=key, UploadId=up["UploadId"], PartNumber=n, Body=chunk
        )["ETag"]
        parts.append({"ETag": etag, "PartNumber": n})
    client.complete_multipart_upload(
        Bucket=s3_bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    uri = f"s3://{s3_bucket}/{key}"
    assert "-" in storage.object_info(uri).etag  # no MD5 of the bytes
    assert export_keepers([uri], input_root=root, dest=dest, mode="copy").exported == 1
    with counted() as calls:
        res = export_keepers([uri], input_root=root, dest=dest, mode="copy")
    assert res.already_there == 1
    assert calls["GetObject"] == 2  # the record and the original; the copy's ETag is its MD5
    record = json.loads(storage.read_bytes(storage.join(dest, EXPORT_RECORD)))
    assert record["files"] == {"day1/PANO.JPG": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("direction", ["s3-to-local", "local-to-s3"])
def test_between_s3_and_a_local_folder_the_s3_side_is_not_read(
    s3_bucket: str, tmp_path: Path, direction: str
) -> None:
    photos = _photos()
    if direction == "s3-to-local":
        root, dest = f"s3://{s3_bucket}/photos", str(tmp_path / "keepers")
        uris = _put_s3(root, photos)
    else:
        root, dest = str(tmp_path / "photos"), f"s3://{s3_bucket}/keepers"
        uris = []
        for i, data in enumerate(photos):
            path = tmp_path / "photos" / "day1" / f"IMG_{i}.JPG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            uris.append(str(path))
    assert export_keepers(uris, input_root=root, dest=dest, mode="copy").exported == 3
    with counted() as calls:
        res = export_keepers(uris, input_root=root, dest=dest, mode="copy")
    assert (res.already_there, res.failed) == (3, [])
    record_gets = 1 if direction == "local-to-s3" else 0
    assert calls["GetObject"] == record_gets
    assert calls["PutObject"] == 0


def test_what_is_not_keepers_copy_is_still_refused_and_keepers_copy_replaced(
    s3_bucket: str,
) -> None:
    root, dest = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/keepers"
    photos = _photos(3)
    uris = _put_s3(root, photos)
    assert export_keepers(uris[:2], input_root=root, dest=dest, mode="copy").exported == 2
    # IMG_0: a person edited keeper's copy (same size); IMG_1: the original changed (same
    # size); IMG_2: a person's own file of the same size where keeper would copy.
    storage.write_bytes(storage.join(dest, "day1/IMG_0.JPG"), bytes(len(photos[0])))
    storage.write_bytes(uris[1], bytes(reversed(photos[1])))
    storage.write_bytes(storage.join(dest, "day1/IMG_2.JPG"), bytes(len(photos[2])))

    res = export_keepers(uris, input_root=root, dest=dest, mode="copy")

    assert res.updated == 1  # IMG_1: keeper's own copy, replaced
    assert sorted(Path(f.image_uri).name for f in res.failed) == ["IMG_0.JPG", "IMG_2.JPG"]
    assert storage.read_bytes(storage.join(dest, "day1/IMG_1.JPG")) == bytes(reversed(photos[1]))
    assert storage.read_bytes(storage.join(dest, "day1/IMG_0.JPG")) == bytes(len(photos[0]))
    assert storage.read_bytes(storage.join(dest, "day1/IMG_2.JPG")) == bytes(len(photos[2]))


def _record(dest: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(storage.read_bytes(storage.join(dest, EXPORT_RECORD)))
    return doc


@pytest.mark.parametrize("origin", ["s3", "local"])
def test_the_record_keeps_each_s3_copys_etag_and_taking_them_back_reads_none(
    s3_bucket: str, tmp_path: Path, origin: str
) -> None:
    photos = _photos(4)
    dest = f"s3://{s3_bucket}/keepers"
    if origin == "s3":
        root = f"s3://{s3_bucket}/photos"
        uris = _put_s3(root, photos)
    else:
        root = str(tmp_path / "photos")
        uris = [str(tmp_path / "photos" / "day1" / f"IMG_{i}.JPG") for i in range(len(photos))]
        for uri, data in zip(uris, photos, strict=True):
            storage.write_bytes(uri, data)
    assert export_keepers(uris, input_root=root, dest=dest, mode="copy").exported == 4
    etags = _record(dest)["etags"]
    assert etags == {
        f"day1/IMG_{i}.JPG": storage.object_info(storage.join(dest, f"day1/IMG_{i}.JPG")).etag
        for i in range(4)
    }
    # IMG_0: changed by a person (same size: its ETag differs, so it is read and hashed);
    # IMG_1: gone; IMG_2: its recorded ETag no longer the object's, the bytes still keeper's
    # (what SSE-KMS does to a rewrite of the same bytes): read, hashed, removed.
    storage.write_bytes(storage.join(dest, "day1/IMG_0.JPG"), bytes(len(photos[0])))
    storage.delete(storage.join(dest, "day1/IMG_1.JPG"))
    doc = _record(dest)
    doc["etags"] = {**etags, "day1/IMG_2.JPG": "0" * 32}  # type: ignore[dict-item]
    storage.write_bytes(storage.join(dest, EXPORT_RECORD), json.dumps(doc).encode())

    with counted() as calls:
        done = remove_keepers_export(dest, uris, input_root=root, io_threads=4)

    assert (done.removed, done.absent) == (2, 1)  # IMG_2, IMG_3; IMG_1
    assert [p for p, _ in done.left] == [storage.join(dest, "day1/IMG_0.JPG")]
    assert calls["GetObject"] == 3  # the record, IMG_0 and IMG_2; not IMG_3
    assert calls["DeleteObject"] == 2
    assert _record(dest) == {
        "version": 1,
        "files": {"day1/IMG_0.JPG": hashlib.sha256(photos[0]).hexdigest()},
        "etags": {"day1/IMG_0.JPG": etags["day1/IMG_0.JPG"]},
    }
    left = sorted(u for u in storage.list_files(dest) if not u.endswith(EXPORT_RECORD))
    assert left == [storage.join(dest, "day1/IMG_0.JPG")]


def test_a_record_without_etags_still_takes_keepers_copies_back(s3_bucket: str) -> None:
    """A record keeper wrote before it kept ETags: every copy is read and hashed, as then."""
    root, dest = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/keepers"
    uris = _put_s3(root, _photos(2))
    export_keepers(uris, input_root=root, dest=dest, mode="copy")
    doc = _record(dest)
    del doc["etags"]
    storage.write_bytes(storage.join(dest, EXPORT_RECORD), json.dumps(doc).encode())
    with counted() as calls:
        done = remove_keepers_export(dest, uris, input_root=root)
    assert (done.removed, done.left) == (2, [])
    assert calls["GetObject"] == 3  # the record and both copies
    assert not storage.exists(storage.join(dest, EXPORT_RECORD))


def test_a_local_folders_record_has_no_etags(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "A.JPG").write_bytes(b"jpeg")
    dest = str(tmp_path / "keepers")
    export_keepers(
        [str(tmp_path / "photos" / "A.JPG")],
        input_root=str(tmp_path / "photos"),
        dest=dest,
        mode="copy",
    )
    assert set(_record(dest)) == {"version", "files"}


def test_a_first_export_asks_for_the_bucket_once_not_per_keeper(s3_bucket: str) -> None:
    """A new keeper's copy is not there yet: the 404 of its HEAD is not followed by a HEAD of
    the bucket seen a moment ago (it was one a keeper)."""
    root, dest = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/keepers-new"
    uris = _put_s3(root, _photos(5))
    with counted() as calls:
        res = export_keepers(uris, input_root=root, dest=dest, mode="copy", io_threads=1)
    assert res.exported == 5
    assert calls["HeadBucket"] <= 1  # at most the record's 404, if the bucket was not seen
    assert calls["HeadObject"] == 6  # the record and each copy


def test_a_bucket_gone_is_still_named_once_its_sighting_is_old(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=storage.s3_client().meta.endpoint_url)
    client.create_bucket(Bucket="keeper-short-lived")
    storage.write_bytes("s3://keeper-short-lived/a.jpg", b"x")
    assert storage.exists("s3://keeper-short-lived/a.jpg")  # the bucket seen
    client.delete_object(Bucket="keeper-short-lived", Key="a.jpg")
    client.delete_bucket(Bucket="keeper-short-lived")
    monkeypatch.setattr(storage, "_BUCKET_SEEN_S", 0.0)  # the sighting is old
    with pytest.raises(StorageError, match="bucket does not exist"):
        storage.exists("s3://keeper-short-lived/b.jpg")
