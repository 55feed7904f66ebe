"""keeper_core.webdataset on local shards made here with tarfile, as img2dataset lays them out."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keeper_core import storage
from keeper_core.errors import DataError, ImageDecodeError, StorageError
from keeper_core.webdataset import (
    SAMPLE_PROBLEMS,
    ShardIndex,
    index_cache_name,
    index_shard,
    is_webdataset,
    list_shards,
    load_or_index,
    member_uri,
    read_member,
    split_member_uri,
)

MAX = 1 << 20


def image_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8 + seed % 5, 10, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    folder: Path,
    n_shards: int,
    per_shard: int,
    *,
    with_caption: bool = True,
    with_json: bool = True,
) -> dict[str, dict[str, object]]:
    """Shards ``00000.tar``... as img2dataset writes them (jpg or png, txt, json per sample, a
    ``.parquet`` and ``_stats.json`` sidecar per shard); returns the truth by ``shard#member``."""
    folder.mkdir(parents=True, exist_ok=True)
    truth: dict[str, dict[str, object]] = {}
    for s in range(n_shards):
        shard = folder / f"{s:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                ext, fmt = ("jpg", "JPEG") if i % 2 == 0 else ("png", "PNG")
                data = image_bytes(s * per_shard + i, fmt)
                caption = f"photo {key} of a café"
                meta = {"url": f"https://x.org/{key}.{ext}", "key": key, "caption": caption}
                add_member(tar, f"{key}.{ext}", data)
                if with_caption:
                    add_member(tar, f"{key}.txt", caption.encode())
                if with_json:
                    add_member(tar, f"{key}.json", json.dumps(meta).encode())
                truth[member_uri(str(shard), f"{key}.{ext}")] = {
                    "data": data,
                    "caption": caption if with_caption else None,
                    "metadata": meta if with_json else None,
                    "key": key,
                }
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1 not read")
        (folder / f"{s:05d}_stats.json").write_text("{}")
    return truth


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, dict[str, object]]]:
    return tmp_path / "shards", write_shards(tmp_path / "shards", 3, 5)


# ---------------------------------------------------------------------------------------------
# URIs and listing


@pytest.mark.parametrize(
    ("shard", "member"),
    [
        ("s3://b/shards/00001.tar", "000010012.jpg"),
        ("/data/x/00000.TAR", "sub/dir/000.seg.png"),
        ("rel/00000.tar", "a#b.jpg"),
    ],
)
def test_member_uri_round_trip(shard: str, member: str) -> None:
    uri = member_uri(shard, member)
    assert uri == f"{shard}#{member}"
    assert split_member_uri(uri) == (shard, member)


@pytest.mark.parametrize("uri", ["s3://b/a.jpg", "/x/00000.tar", "/x/00000.tar#", "/x/a.jpg#1"])
def test_split_member_uri_of_other_uris_is_none(uri: str) -> None:
    assert split_member_uri(uri) is None


def test_member_uri_needs_a_tar_and_a_member() -> None:
    with pytest.raises(DataError, match=r"end in \.tar"):
        member_uri("s3://b/x.zip", "a.jpg")
    with pytest.raises(DataError, match="empty member"):
        member_uri("s3://b/x.tar", "")


def test_is_webdataset(tmp_path: Path, corpus: tuple[Path, dict[str, dict[str, object]]]) -> None:
    folder, _ = corpus
    assert is_webdataset(str(folder))
    assert is_webdataset(str(folder / "00000.tar"))
    assert is_webdataset("s3://b/shards/{00000..00009}.tar")
    assert is_webdataset(str(folder) + "/{00000..00002}.tar")
    assert not is_webdataset("s3://b/photos/{a,b}")  # a pattern, but not of shards
    assert not is_webdataset(str(tmp_path / "missing"))
    (tmp_path / "m.csv").write_text("image_uri\na.jpg\n")
    assert not is_webdataset(str(tmp_path / "m.csv"))
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.jpg").write_bytes(image_bytes(0, "JPEG"))
    assert not is_webdataset(str(loose))
    write_tar(loose / "00000.tar", [("0.jpg", b"x")])
    assert not is_webdataset(str(loose))  # tars beside loose images: a folder of images
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not is_webdataset(str(empty))


def test_list_shards_of_a_folder_skips_sidecars_and_hidden_files(
    corpus: tuple[Path, dict[str, dict[str, object]]],
) -> None:
    folder, _ = corpus
    (folder / ".00003.tar").write_bytes(b"")  # a half-written temp file
    assert list_shards(str(folder)) == [str(folder / f"{i:05d}.tar") for i in range(3)]
    assert list_shards(str(folder / "00001.tar")) == [str(folder / "00001.tar")]


def test_list_shards_of_brace_patterns(corpus: tuple[Path, dict[str, dict[str, object]]]) -> None:
    folder, _ = corpus
    want = [str(folder / f"{i:05d}.tar") for i in range(3)]
    assert list_shards(f"{folder}/{{00000..00002}}.tar") == want
    assert list_shards(f"{folder}/{{00002..00000}}.tar") == want  # descending: still sorted
    assert list_shards(f"{folder}/0000{{2,0}}.tar") == [want[0], want[2]]
    assert list_shards(f"{folder}/{{00000..00001}}.tar") == want[:2]


def test_list_shards_names_a_missing_shard(
    tmp_path: Path, corpus: tuple[Path, dict[str, dict[str, object]]]
) -> None:
    folder, _ = corpus
    with pytest.raises(DataError, match=r"2 of 5 shards do not exist, first .*00003\.tar"):
        list_shards(f"{folder}/{{00000..00004}}.tar")
    with pytest.raises(DataError, match="3 of 3 shards"):
        list_shards(f"{tmp_path}/nowhere/{{0..2}}.tar")
    with pytest.raises(DataError, match="does not exist"):
        list_shards(str(folder / "00009.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.tar shards"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such folder"):
        list_shards(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("{0..2}.tar", ["0.tar", "1.tar", "2.tar"]),
        ("{8..10}.tar", ["10.tar", "8.tar", "9.tar"]),  # no leading zero: no padding
        ("{08..10}.tar", ["08.tar", "09.tar", "10.tar"]),
        ("{a,b}-{0..1}.tar", ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]),
    ],
)
def test_brace_expansion(tmp_path: Path, pattern: str, names: list[str]) -> None:
    for n in names:
        write_tar(tmp_path / n, [("0.jpg", b"x")])
    assert list_shards(f"{tmp_path}/{pattern}") == [str(tmp_path / n) for n in names]


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ("/x/{a..c}.tar", "integers only"),
        ("/x/{0..5,{1,2}}.tar", "nested or unbalanced"),
        ("/x/{0..99999999}.tar", "over 1,000,000"),
        ("/x/{0..3}.jpg", "non-.tar"),
    ],
)
def test_bad_brace_patterns(pattern: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        list_shards(pattern)


# ---------------------------------------------------------------------------------------------
# Index and reads


def test_index_and_read_member_give_the_exact_bytes_captions_and_metadata(
    corpus: tuple[Path, dict[str, dict[str, object]]],
) -> None:
    folder, truth = corpus
    seen = {}
    for shard in list_shards(f"{folder}/{{00000..00002}}.tar"):
        index = index_shard(shard)
        assert index.error is None
        assert index.missing_image() == []
        assert index.problems() == []
        assert index.uris() == [r["image_uri"] for r in index.rows()]
        for row in index.rows():
            assert set(row) == {
                "image_uri",
                "offset",
                "size",
                "caption",
                "metadata",
                "shard",
                "key",
            }
            assert row["shard"] == shard
            seen[row["image_uri"]] = row
    assert sorted(seen) == sorted(truth)
    for uri, row in seen.items():
        want = truth[uri]
        assert read_member(uri, row["offset"], row["size"], max_bytes=MAX) == want["data"]
        assert row["caption"] == want["caption"]
        assert json.loads(row["metadata"]) == want["metadata"]
        assert row["key"] == want["key"]
        assert "café" in row["metadata"]  # kept readable, not \u-escaped


def test_index_without_captions_or_metadata(tmp_path: Path) -> None:
    truth = write_shards(tmp_path, 1, 3, with_caption=False, with_json=False)
    rows = index_shard(str(tmp_path / "00000.tar")).rows()
    assert [r["image_uri"] for r in rows] == list(truth)
    assert all(r["caption"] is None and r["metadata"] is None for r in rows)


def test_sample_problems_are_recorded_not_raised(tmp_path: Path) -> None:
    jpg, png = image_bytes(1, "JPEG"), image_bytes(2, "PNG")
    shard = write_tar(
        tmp_path / "00000.tar",
        [
            ("a.txt", b"caption without an image"),
            ("a.json", b"{}"),
            ("b.png", png),
            ("b.jpg", jpg),  # jpg is preferred over png whatever the order
            ("b.txt", b"x" * 65),
            ("b.json", b"{not json"),
            ("c.jpg", jpg),
            ("c.txt", b"\xff\xfe bad"),
            ("c.jpg", png),  # a duplicate: the first is kept
            ("._c.jpg", b"macOS droppings"),
            ("d/e.seg.png", png),  # extension "seg.png": not the image
            ("d/e.webp", b"webp bytes"),
            ("d/e.json", json.dumps({"caption": "naïve \udc80"}).encode()),
        ],
    )
    index = index_shard(str(shard), max_index_bytes=64)
    assert index.error is None
    assert [s.key for s in index.samples] == ["a", "b", "c", "d/e"]
    assert index.missing_image() == ["a"]
    by_key = {s.key: s for s in index.samples}
    assert by_key["a"].caption == "caption without an image"
    assert by_key["b"].image == "b.jpg"
    assert by_key["b"].caption is None
    assert by_key["b"].metadata is None
    assert by_key["c"].caption is None
    assert by_key["d/e"].image == "d/e.webp"
    assert json.loads(by_key["d/e"].metadata or "") == {"caption": "naïve \udc80"}
    (by_key["d/e"].metadata or "").encode("utf-8")  # a lone surrogate stays escaped
    got = [(p.key, p.reason, p.uri) for p in index.problems()]
    assert got == [
        ("a", "missing_image", f"{shard}#a"),
        ("b", "caption_too_long", f"{shard}#b.txt"),
        ("b", "invalid_json", f"{shard}#b.json"),
        ("c", "caption_not_utf8", f"{shard}#c.txt"),
        ("c", "duplicate_member", f"{shard}#c.jpg"),
    ]
    assert {p.reason for p in index.problems()} <= set(SAMPLE_PROBLEMS)
    row = next(r for r in index.rows() if r["key"] == "c")
    assert read_member(row["image_uri"], row["offset"], row["size"], max_bytes=MAX) == jpg


def test_long_member_names_through_pax_headers(tmp_path: Path) -> None:
    name = "deep/" + "x" * 150 + "/000123.jpg"  # over ustar's 100 characters
    data = image_bytes(3, "JPEG")
    shard = write_tar(tmp_path / "00000.tar", [(name, data), (name[:-3] + "txt", b"long")])
    (row,) = index_shard(str(shard)).rows()
    assert row["key"] == name[:-4]
    assert row["caption"] == "long"
    assert read_member(row["image_uri"], row["offset"], row["size"], max_bytes=MAX) == data


def _members(n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [(f"{i:03d}.png", image_bytes(i, "PNG")), (f"{i:03d}.txt", b"caption")]
    return out


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        ("mid_member", "member '002.png' needs"),
        ("after_member", "no end-of-archive marker"),
        ("garbage_header", "invalid tar header at offset"),
    ],
)
def test_corrupt_tar_keeps_the_whole_members_and_names_the_last(
    tmp_path: Path, cut: str, why: str
) -> None:
    good = write_tar(tmp_path / "good.tar", _members(4))
    with tarfile.open(good) as tf:
        third = tf.getmember("002.png")
    raw = good.read_bytes()
    if cut == "mid_member":  # inside 002.png's data
        bad = raw[: third.offset_data + 10]
    elif cut == "after_member":  # at the header after 001.txt: no end-of-archive marker
        bad = raw[: third.offset]
    else:
        bad = raw[: third.offset] + b"\x07" * 512 + raw[third.offset + 512 :]
    shard = tmp_path / "00000.tar"
    shard.write_bytes(bad)
    index = index_shard(str(shard))
    assert index.error is not None
    assert str(shard) in index.error
    assert "'001.txt'" in index.error
    assert why in index.error
    assert index.last_member == "001.txt"
    assert [s.key for s in index.samples] == ["000", "001"]
    for row in index.rows():
        read_member(row["image_uri"], row["offset"], row["size"], max_bytes=MAX)
    with pytest.raises(DataError, match=r"corrupt or truncated tar after member .001\.txt."):
        index.raise_for_error()


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100])
def test_not_a_tar(tmp_path: Path, content: bytes) -> None:
    shard = tmp_path / "00000.tar"
    shard.write_bytes(content)
    index = index_shard(str(shard))
    assert index.samples == ()
    assert index.last_member is None
    assert index.error is not None
    assert "at the first member" in index.error


def test_missing_shard_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such file"):
        index_shard(str(tmp_path / "00000.tar"))


def test_index_json_round_trip(corpus: tuple[Path, dict[str, dict[str, object]]]) -> None:
    folder, _ = corpus
    index = index_shard(str(folder / "00001.tar"))
    again = ShardIndex.from_json(index.to_json())
    assert again == index
    assert again.rows() == index.rows()
    index.to_json().decode("ascii")
    other_version = index.to_json().replace(b'"version":1', b'"version":9')
    for bad in [b"{", b"[]", b'{"format": "other"}', other_version]:
        with pytest.raises(DataError, match=r"cache\.json"):
            ShardIndex.from_json(bad, source="cache.json")
    doc = json.loads(index.to_json())
    doc["samples"][0] = doc["samples"][0][:3]
    with pytest.raises(DataError, match="malformed shard index"):
        ShardIndex.from_json(json.dumps(doc))


def test_load_or_index_uses_the_cache_until_the_shard_changes(tmp_path: Path) -> None:
    write_shards(tmp_path / "s", 1, 2)
    shard = str(tmp_path / "s" / "00000.tar")
    cache_dir = str(tmp_path / "out" / "_shards")
    first = load_or_index(shard, cache_dir)
    cache = Path(cache_dir) / index_cache_name(shard)
    assert cache.name.endswith(".json")
    assert len(cache.stem) == 40
    assert ShardIndex.from_json(cache.read_bytes()) == first
    # Mark the cached copy: a second call returns it without reading the shard.
    cache.write_bytes(cache.read_bytes().replace(b"photo 000000000", b"CACHED 000000000"))
    assert load_or_index(shard, cache_dir).samples[0].caption == "CACHED 000000000 of a café"
    assert load_or_index(shard, cache_dir, max_index_bytes=5).samples[0].caption is None
    write_shards(tmp_path / "s", 1, 3)  # rewritten: another size and mtime
    assert len(load_or_index(shard, cache_dir).samples) == 3
    cache.write_bytes(b"garbage")
    assert len(load_or_index(shard, cache_dir).samples) == 3


def test_read_member_checks_the_size_before_reading(tmp_path: Path) -> None:
    uri = member_uri(str(tmp_path / "absent.tar"), "0.jpg")
    with pytest.raises(ImageDecodeError) as e:
        read_member(uri, 512, 2_000, max_bytes=1_000)
    assert e.value.reason == "too_large"
    assert e.value.source == uri
    with pytest.raises(StorageError):  # within the limit: now it reads, and the shard is absent
        read_member(uri, 512, 1_000, max_bytes=1_000)
    with pytest.raises(DataError, match="not a shard member URI"):
        read_member(str(tmp_path / "a.jpg"), 0, 1, max_bytes=MAX)


# ---------------------------------------------------------------------------------------------
# storage.read_range


def test_read_range_local(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 4
    path.write_bytes(data)
    assert storage.read_range(str(path), 0, 1024) == data
    assert storage.read_range(str(path), 300, 17) == data[300:317]
    assert storage.read_range(f"file://{path}", 1023, 1) == data[1023:]
    assert storage.read_range(str(path), 5000, 0) == b""
    with pytest.raises(DataError, match=r"read 24 of 100 bytes at offset 1000"):
        storage.read_range(str(path), 1000, 100)
    with pytest.raises(DataError, match="read 0 of 1 bytes"):
        storage.read_range(str(path), 1024, 1)
    with pytest.raises(ValueError, match=">= 0"):
        storage.read_range(str(path), -1, 1)
    with pytest.raises(StorageError, match="no such file"):
        storage.read_range(str(tmp_path / "absent"), 0, 1)
