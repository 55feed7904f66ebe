"""Objects keeper writes to S3 carry a Content-Type from their name, so a browser shows a contact
sheet (S3 static hosting, a presigned URL) instead of downloading it. Against a real moto_server
(the s3_bucket fixture), read back with HEAD."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from keeper_core import storage
from keeper_core.contact_sheet import SheetSummary, thumbnail_name, write_contact_sheet
from keeper_core.storage import write_bytes, write_parquet


def _head_type(uri: str) -> str:
    bucket, key = storage.split_s3(uri)
    return str(storage.s3_client().head_object(Bucket=bucket, Key=key)["ContentType"])


CASES = [  # (key, Content-Type)
    ("sheet/index.html", "text/html; charset=utf-8"),
    ("sheet/pages/page-0001.html", "text/html; charset=utf-8"),
    ("sheet/thumbs/ab/abcdef.jpg", "image/jpeg"),
    ("photos/IMG_0001.JPG", "image/jpeg"),  # the suffix's case does not matter
    ("photos/scan.jpeg", "image/jpeg"),
    ("photos/a.png", "image/png"),
    ("photos/a.webp", "image/webp"),
    ("out/_SUMMARY.json", "application/json"),
    ("out/picks.csv", "text/csv; charset=utf-8"),
    ("out/picks.parquet", "application/vnd.apache.parquet"),
    ("out/xmp/IMG_0001.xmp", "application/rdf+xml"),
    ("models/head.safetensors", "application/octet-stream"),
    ("out/no-suffix", "application/octet-stream"),
    ("out/weights.pt", "application/octet-stream"),  # a suffix no table knows
    ("out/index.json.gz", "application/octet-stream"),  # compressed: not JSON to a browser
]


@pytest.mark.parametrize(("key", "expected"), CASES)
def test_write_bytes_stores_the_content_type_of_the_name(
    s3_bucket: str, key: str, expected: str
) -> None:
    uri = f"s3://{s3_bucket}/{key}"
    write_bytes(uri, b"x")
    assert _head_type(uri) == expected
    assert storage.read_bytes(uri) == b"x"  # the body is as written


def test_content_type_is_the_same_for_a_local_path() -> None:
    for key, expected in CASES:
        assert storage.content_type(f"/data/{key}") == expected
        assert storage.content_type(f"s3://b/{key}") == expected


def test_write_parquet_is_stored_as_parquet(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/emb/embeddings/part-0.parquet"
    write_parquet(pa.table({"image_uri": ["a.jpg"]}), uri)
    assert _head_type(uri) == "application/vnd.apache.parquet"
    assert storage.read_parquet(uri).column("image_uri").to_pylist() == ["a.jpg"]


def test_a_contact_sheet_on_s3_is_served_as_html_and_jpeg(s3_bucket: str) -> None:
    from keeper_core.contact_sheet import thumbnail_jpeg

    out = f"s3://{s3_bucket}/culls/wedding"
    image_id = "ab" * 32
    picks = pd.DataFrame(
        {
            "image_uri": ["s3://photos/IMG_1.JPG"],
            "image_id": [image_id],
            "group": [0],
            "group_size": [1],
            "capture_time": ["2024-05-01T09:00:00"],
            "camera": ["Canon EOS R5"],
            "rank": [1],
            "score": [1.0],
            "prob": [1.0],
            "decision": ["keep"],
            "reasons": [["the only photo of its group"]],
            "duplicate_of": [-1],
            "duplicate_kind": [None],
        }
    )
    thumb = storage.join(out, thumbnail_name(image_id))
    write_bytes(thumb, thumbnail_jpeg(Image.new("RGB", (32, 24), (200, 10, 10))))
    summary = SheetSummary(
        images=1,
        groups=1,
        keepers=1,
        alternates=0,
        rejects=0,
        duplicates=0,
        failed=0,
        seconds={},
        ranker="zero-shot rule",
    )
    index = write_contact_sheet(out, picks, summary)
    pages = storage.list_files(storage.join(out, "pages"), suffixes=[".html"])
    assert pages
    for uri in [index, *pages]:
        assert _head_type(uri) == "text/html; charset=utf-8", uri
    assert _head_type(thumb) == "image/jpeg"
