"""Manifests and listings that used to be misread or abort a job (an audit's findings).

- an unquoted comma in a CSV path made pandas take the first field as the row index and shift
  every column: other files were named, with no error;
- one image named twice in two spellings was embedded twice, and exact repeats vanished
  uncounted;
- a series manifest naming one file two ways, or holding a column the embedding table has,
  failed deep in a pandas merge or a KeyError;
- one unreadable file of unknown type stopped a folder's listing;
- a WebDataset sample's dropped members (a duplicate, a bad caption) were not counted.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from support import write_embed_table

from keeper_core import storage
from keeper_core.errors import DataError, StorageError
from keeper_core.series import read_series_manifest
from keeper_train.data import join_series
from keeper_train.jobs import embed

SPEC = "keeper-tiny:random"


@pytest.mark.parametrize(
    "text",
    [
        "image_uri\nSmith, John/IMG_1.jpg\nSmith, John/IMG_2.jpg\n",  # every row one too many
        "image_uri,series_id\nx/a,b.jpg,s1\nc.jpg,s1\n",  # one row too many
        "image_uri,series_id\nc.jpg\n",  # one row too few
    ],
)
def test_a_csv_row_of_another_field_count_is_refused_naming_its_line(
    tmp_path: Path, text: str
) -> None:
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(DataError, match=r"field count other than the header's .*line 2 has"):
        embed.list_inputs(str(m))


def test_a_quoted_comma_is_a_path(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text('image_uri\n"Smith, John/IMG_1.jpg"\n\nb.jpg\n')  # a blank line is skipped
    uris, _ = embed.list_inputs(str(m))
    assert uris == [str(tmp_path / "Smith, John" / "IMG_1.jpg"), str(tmp_path / "b.jpg")]


def test_a_series_manifest_with_an_unquoted_comma_is_refused(tmp_path: Path) -> None:
    m = tmp_path / "series.csv"
    m.write_text(
        "series_id,image_uri,is_best\ns1,Smith, John/IMG_1.jpg,1\ns1,Smith, John/IMG_2.jpg,0\n"
    )
    with pytest.raises(DataError, match="line 2 has 4, line 3 has 4") as e:
        read_series_manifest(str(m))
    assert str(e.value).count(str(m)) == 1  # the source is named once


def test_one_file_named_twice_in_a_manifest_is_embedded_once_and_counted(tmp_path: Path) -> None:
    (tmp_path / "man").mkdir()
    m = tmp_path / "man" / "m.csv"
    a = tmp_path / "man" / "a.jpg"
    m.write_text(f"image_uri\na.jpg\n{a}\nfile://{a}\nb.jpg\nb.jpg\n")
    uris, ignored, repeated = embed.scan_inputs(str(m))
    assert uris == [str(a), str(tmp_path / "man" / "b.jpg")]
    assert (ignored, repeated) == (0, 3)  # 5 rows = 2 images + 3 repeats


def test_a_series_manifest_naming_one_file_two_ways_is_a_duplicate(tmp_path: Path) -> None:
    m = tmp_path / "series.csv"
    m.write_text(
        f"series_id,image_uri,is_best\ns1,a.jpg,1\ns1,{tmp_path / 'a.jpg'},0\ns1,b.jpg,0\n"
    )
    with pytest.raises(DataError, match=r"duplicate image_uri in rows 0, 1$"):
        read_series_manifest(str(m))


def test_a_manifest_column_the_table_has_is_refused_by_name(tmp_path: Path) -> None:
    uris = [str(tmp_path / f"{i}.jpg") for i in range(4)]
    write_embed_table(tmp_path / "emb", uris)
    m = tmp_path / "series.csv"
    pd.DataFrame(
        {
            "series_id": ["s", "s", "t", "t"],
            "image_uri": uris,
            "is_best": [1, 0, 1, 0],
            "sharpness": [9.0] * 4,
        }
    ).to_csv(m, index=False)
    with pytest.raises(DataError, match=r"manifest columns \['sharpness'\] are also columns"):
        join_series(str(tmp_path / "emb"), str(m))


def test_an_unreadable_file_of_unknown_type_becomes_an_input_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "archived.bin").write_bytes(b"x")
    (tmp_path / "notes.bin").write_bytes(b"plain text")

    def read_head(uri: str, n: int = 64) -> bytes:
        if uri.endswith("archived.bin"):  # what an archived S3 object or a lost file raises
            raise StorageError(uri, "InvalidObjectState")
        return Path(uri).read_bytes()[:n]

    monkeypatch.setattr(storage, "read_head", read_head)
    uris, ignored = embed.list_inputs(str(tmp_path))
    assert sorted(Path(u).name for u in uris) == ["a.jpg", "archived.bin"]  # its read then fails
    assert ignored == 1  # notes.bin


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_shards_dropped_members_are_counted_by_reason(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    jpg = buf.getvalue()
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        _member(tar, "a.jpg", jpg)
        _member(tar, "a.txt", b"\xff\xfe not utf-8")
        _member(tar, "b.jpg", jpg)
        _member(tar, "b.jpg", jpg)  # the second is dropped
        _member(tar, "c.txt", b"no image")
    uris, ignored, _, failures, problems = embed.list_webdataset(
        str(shard.parent), str(tmp_path / "cache")
    )
    assert len(uris) == 2
    assert ignored == 1
    assert failures == {}
    assert problems == {"caption_not_utf8": 1, "duplicate_member": 1}
