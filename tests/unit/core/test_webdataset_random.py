"""keeper_core.webdataset over seeded random tar shards and brace patterns, against a reference.

Seeded cases (``KEEPER_HISTORIES=2000`` runs more; a failure prints the seed and every member, so
it replays). Each shard is written here with ``tarfile`` in one of its three formats (USTAR, with
names over 100 bytes split into its prefix field; GNU, long names in ``L`` records; PAX, long and
non-ASCII names in extended headers, sometimes a global header) and then, for a few members, its
header patched: a size in GNU base-256 or a PAX ``size`` record beside a zero USTAR size field
(what a writer does for a member over 8 GiB), type ``7`` (contiguous) or ``\\0`` (old regular
file), an unknown type, a sparse member (old GNU; GNU tar's PAX 0.1 is written as such). Members
are what img2dataset writes (``.jpg`` ``.png`` ``.webp`` images of random bytes, ``.txt``
captions, ``.json`` metadata, ``.cls``) and what else a tar holds: folders, symlinks, hard links, FIFOs, devices, ``._x`` and other hidden
files, names with several dots or none, upper-case extensions, keys under folders (dotted folder
names too), non-ASCII and non-UTF-8 names, empty members, a second member with the same key and
extension (or the same name), captions that are not UTF-8 or over ``max_index_bytes`` (or exactly
at it), metadata that is valid (objects, and arrays, strings, numbers, null), invalid, empty, or
nested too deep to parse. Samples come grouped as img2dataset writes them, interleaved (a key
coming back after others) or shuffled. Then the shard is kept whole, cut at a random offset (0:
an empty file), ended with two, one or no zero blocks, followed by random garbage, or has one
member's first header block overwritten.

``reference`` is the module's documented rules written out over the member list (not over what
tarfile reads back): key = the path up to the first ``.`` of the basename, extension lower-cased;
hidden basenames and folders skipped; a link, device, sparse or unknown-type member an
``unsupported_member``; a second file member with a key's extension a ``duplicate_member`` (the
first kept); the image the first of jpg, jpeg, png, webp present; captions UTF-8 and metadata JSON
read unless over the limit; samples in order of their key's first member, problems in tar order.
For a damaged shard the expected samples are those of the members whose data lies wholly before
the damage, and ``error`` is set exactly when no whole zero block follows the last good member.
For each case:

- the samples equal the reference's (key, image member, caption, metadata, problems by reason
  and member), ``problems()`` / ``missing_image()`` / ``rows()`` / ``uris()`` agree with them,
  ``last_member`` is the last member before the damage, ``error`` names the shard and that
  member, and the JSON round trip of the index is exact;
- every member is accounted for: each member that is neither hidden nor a folder has its key
  among the samples, and every member the index names (image or problem) is one of the shard's;
- ``read_member`` at each row's offset and size gives exactly the member's bytes (with
  ``max_bytes`` equal to the size; one byte less is ``too_large``);
- on some cases the shard is indexed again through ``_RangeFile`` (the S3 reader: ranged reads of
  a random chunk size, here of the local file) and the index is the same.

``test_brace_expansion_is_the_reference`` checks ``_expand`` on random patterns (integer ranges
ascending and descending, zero-padded when an end is written with a leading zero, negative ends,
comma lists with empty and repeated items, literal ``{x}`` and ``{}``, several groups, and the
malformed: non-integer and stepped ranges, nested and unbalanced braces, over a million names)
and ``list_shards`` on the small ones against files made for them (sorted, deduplicated, a
missing shard counted and named, a non-.tar name refused). ``test_member_uri_round_trip`` checks
``member_uri`` / ``split_member_uri`` on random shard and member names.

The tests at the end pin what these cases found, each fixed since: a sparse member taken for a
truncated shard, tarfile's ValueError on a malformed PAX record raised out of ``index_shard``,
NaN / Infinity stored as metadata, and a shard path holding ``.tar#`` that no URI split back.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import tar_bytes

from keeper_core import webdataset
from keeper_core.errors import DataError, ImageDecodeError
from keeper_core.webdataset import (
    DEFAULT_MAX_INDEX_BYTES,
    SAMPLE_PROBLEMS,
    ShardIndex,
    _expand,
    index_shard,
    list_shards,
    member_uri,
    read_member,
    split_member_uri,
)

#: shards in the suite (~5 ms each); KEEPER_HISTORIES=2000 looks further
SEEDS = int(os.environ.get("KEEPER_HISTORIES", "250"))
BRACE_SEEDS = max(SEEDS, 50)
URI_SEEDS = max(SEEDS, 50)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in the order the index prefers them
FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
FILE_KINDS = {"file", "contiguous", "oldreg"}  # regular data, as tar types 0, 7 and \0
DATA_KINDS = FILE_KINDS | {"sparse", "paxsparse", "unknown"}  # members written with their data
UNSUPPORTED_KINDS = {"symlink", "hardlink", "fifo", "chrdev", "sparse", "paxsparse", "unknown"}
TYPES = {
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chrdev": tarfile.CHRTYPE,
}
INVALID = object()  # a metadata member that is not JSON
MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP", b""]
CAPTION_CHARS = "abc xyz é日本🙂\n\r\t\x00\ufeff\u2028\"'\\#"
NOT_UTF8 = [b"\xff", b"caf\xe9", b"\xed\xa0\x80 surrogate", b"\xc0\xaf overlong", b"ok \xe6\x97"]
NOT_JSON = [
    b"",
    b"{",
    b"{not json",
    b"{'single': 1}",
    b"[1,]",
    b'{"a": 1} trailing',
    b'"\xff"',
    b"\xff\xfe\x00",
    b"[" * 5000,  # deeper than the parser's recursion limit, or unterminated
    b"nul",
]


def chance(rng: random.Random, p: float) -> bool:
    return rng.random() < p


# ---------------------------------------------------------------------------------------------
# random shards


@dataclass
class Member:
    name: str
    kind: str  # "file", "contiguous", "oldreg", "dir", or one of UNSUPPORTED_KINDS
    data: bytes = b""
    size_field: str = "octal"  # "octal", "base256" (GNU), "pax" (PAX record, USTAR field 0)
    linkname: str = ""
    caption: str | None = None  # the text a .txt member decodes to (None: not UTF-8)
    value: Any = INVALID  # the value a .json member parses to

    def short(self) -> str:
        extra = f" -> {self.linkname!r}" if self.linkname else ""
        data = self.data if len(self.data) <= 24 else self.data[:24] + b"..."
        return f"{self.kind:10} {self.size_field:7} {self.name!r}{extra} {len(self.data)}B {data!r}"


@dataclass
class Shard:
    seed: int
    fmt: str
    limit: int
    members: list[Member]
    global_pax: bool
    order: str
    damage: str = "none"
    raw: bytes = b""
    layout: list[tuple[int, int, int]] = field(default_factory=list)  # offset, offset_data, size
    data_end: int = 0  # where the end-of-archive marker starts
    kept: int = 0  # members wholly before the damage
    error: bool = False  # whether the index must report the shard's error
    chunk: int | None = None  # index again through _RangeFile with this chunk size

    def describe(self) -> str:
        head = (
            f"seed {self.seed}: {self.fmt}, max_index_bytes={self.limit}, {self.order}, "
            f"damage {self.damage}, {len(self.raw)} bytes, {self.kept} of "
            f"{len(self.members)} members kept, error expected: {self.error}, "
            f"range chunk {self.chunk}, global pax header: {self.global_pax}"
        )
        rows = [
            f"  {i:3d} @{lay[0]:6d} {m.short()}"
            for i, (m, lay) in enumerate(zip(self.members, self.layout, strict=True))
        ]
        return "\n".join([head, *rows])


def random_key(rng: random.Random, fmt: str, i: int) -> str:
    style = rng.choice(
        ["num"] * 6 + ["sub", "deep", "dotted", "unicode", "odd", "surrogate", "long", "upper"]
    )
    if style == "num":
        return f"{i:09d}"
    if style == "sub":
        return f"part-{rng.randrange(3)}/{i:09d}"
    if style == "deep":
        return f"a/b c/{i}"
    if style == "dotted":  # a folder with dots: the key still runs up to the basename's dot
        return f"v1.{rng.randrange(3)}/{i:05d}"
    if style == "unicode":
        return f"café-日本-{i}"
    if style == "odd":
        return f"a b#%+={i}"
    if style == "surrogate":  # a non-UTF-8 byte in the name (tarfile's surrogateescape)
        return f"k\udce9{i}"
    if style == "upper":
        return f"IMG_{i:04d}"
    if fmt == "ustar":  # over 100 bytes only through the prefix field: a long folder
        return "d" * rng.randint(90, 150) + f"/{i:09d}"
    return "x" * rng.randint(90, 200) + f"{i}"


def image_data(rng: random.Random) -> bytes:
    n = rng.choice([0, 1, 3, 511, 512, 513, 1000, rng.randint(0, 3000), rng.randint(0, 3000)])
    if chance(rng, 0.02):
        n = rng.randint(20_000, 40_000)  # larger than the small _RangeFile chunks
    return (rng.choice(MAGIC) + rng.randbytes(n))[:n]


def caption_member(rng: random.Random, name: str, limit: int) -> Member:
    r = rng.random()
    if r < 0.15:
        return Member(name, "file", rng.choice(NOT_UTF8), caption=None)
    if r < 0.3 and limit <= 70_000:
        n = limit + rng.choice([0, 0, 1])  # at the limit (read) or one over it
        return Member(name, "file", b"a" * n, caption="a" * n)
    n = rng.choice([0, 1, 5, 20, 40])
    if chance(rng, 0.02):
        n = 70_000  # over the default limit
    text = "".join(rng.choice(CAPTION_CHARS) for _ in range(n))
    return Member(name, "file", text.encode(), caption=text)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 3 and r < 0.25:
        return {random_string(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if depth < 3 and r < 0.35:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return rng.choice(
        [
            None,
            True,
            False,
            rng.randint(-(10**6), 10**6),
            2**70,
            round(rng.uniform(-1e6, 1e6), 3),
            0.1,
            -0.0,
            1e300,
            random_string(rng),
        ]
    )


def random_string(rng: random.Random) -> str:
    chars = 'ab Zé日🙂"\\/\n\t\x01\x7f\u2028' + ("\udc80" if chance(rng, 0.05) else "")
    return "".join(rng.choice(chars) for _ in range(rng.randrange(8)))


def json_member(rng: random.Random, name: str) -> Member:
    if chance(rng, 0.2):
        return Member(name, "file", rng.choice(NOT_JSON), value=INVALID)
    if chance(rng, 0.6):  # img2dataset's shape
        value: Any = {
            "url": f"https://x.org/{rng.randrange(10**6)}.jpg",
            "caption": random_string(rng),
            "width": rng.randrange(1, 4000),
            "similarity": round(rng.random(), 6),
            "status": "success",
            "exif": None,
        }
        if chance(rng, 0.3):
            value["nested"] = random_value(rng)
    else:  # any JSON, an object or not
        value = random_value(rng)
    if chance(rng, 0.02):
        value = {"long": "x" * 70_000}  # over the default limit
    indent = rng.choice([None, None, 2, "\t"])
    text = json.dumps(value, indent=indent, ensure_ascii=chance(rng, 0.5))
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate: only escaped JSON can carry it
        raw = json.dumps(value, indent=indent).encode()
    return Member(name, "file", raw, value=value)


def sample_members(rng: random.Random, key: str, fmt: str, limit: int) -> list[Member]:
    out: list[Member] = []
    folder, _, stem = key.rpartition("/")
    here = f"{folder}/" if folder else ""
    n_images = rng.choices([0, 1, 2], [0.12, 0.73, 0.15])[0]
    for _ in range(n_images):
        ext = rng.choice(["jpg", "jpg", "jpeg", "png", "webp", "JPG", "Png", "WEBP"])
        out.append(Member(f"{key}.{ext}", "file", image_data(rng)))
    if chance(rng, 0.7):
        out.append(caption_member(rng, f"{key}.{rng.choice(['txt'] * 5 + ['TXT'])}", limit))
    if chance(rng, 0.6):
        out.append(json_member(rng, f"{key}.{rng.choice(['json'] * 5 + ['Json'])}"))
    if chance(rng, 0.2):
        out.append(Member(f"{key}.cls", "file", str(rng.randrange(1000)).encode()))
    if chance(rng, 0.2):  # several dots, or none: not an image, caption or metadata
        ext = rng.choice(["seg.png", "npy", "tar.gz", "", "json.txt", "txt.json", "jpg.txt"])
        name = f"{key}.{ext}" if ext else key
        out.append(Member(name, "file", rng.randbytes(rng.randrange(40))))
    if chance(rng, 0.1):
        kinds = ["symlink", "hardlink", "fifo", "chrdev", "unknown"]
        kinds += {"gnu": ["sparse"], "pax": ["paxsparse"]}.get(fmt, [])
        kind = rng.choice(kinds)
        name = f"{key}.{rng.choice(['jpg', 'png', 'txt', 'json', 'cls'])}"
        if kind == "symlink":
            out.append(Member(name, kind, linkname=f"../elsewhere/{stem}.jpg"))
        elif kind == "hardlink":
            target = (
                out[0].name
                if out and len(out[0].name.encode(errors="surrogateescape")) <= 100
                else "gone.jpg"
            )
            out.append(Member(name, kind, linkname=target))
        else:  # sparse and unknown types carry data; the others none
            data = rng.randbytes(rng.randrange(600)) if kind in DATA_KINDS else b""
            out.append(Member(name, kind, data))
    if chance(rng, 0.08):
        out.append(Member(f"{here}._{stem}.jpg", "file", b"\x00\x05\x16\x07 AppleDouble"))
    if chance(rng, 0.04):
        out.append(Member(f"{here}.hidden.txt", "file", b"hidden"))
    if chance(rng, 0.04):
        out.append(Member(f"{key}.jpg", "dir"))
    if out and chance(rng, 0.1):  # the same name again, other bytes
        again = rng.choice([m for m in out if m.kind == "file"] or [None])
        if again is not None:  # made as its extension says: in tar order it may come first
            ext = (key_and_ext(again.name) or ("", ""))[1]
            if ext == "txt":
                out.append(caption_member(rng, again.name, limit))
            elif ext == "json":
                out.append(json_member(rng, again.name))
            else:
                out.append(Member(again.name, "file", rng.randbytes(rng.randrange(30))))
    for m in out:
        if m.kind == "file" and chance(rng, 0.1):
            m.kind = rng.choice(["contiguous", "oldreg"])
        if m.kind in FILE_KINDS and chance(rng, 0.15):
            m.size_field = {"gnu": "base256", "pax": "pax"}.get(fmt, "octal")
    return out


@functools.cache  # the coverage test below looks at the same shards
def random_shard(seed: int) -> Shard:
    rng = random.Random(seed)
    fmt = rng.choice(list(FORMATS))
    limit = rng.choice([0, 1, 7, 64, 300, DEFAULT_MAX_INDEX_BYTES, DEFAULT_MAX_INDEX_BYTES])
    n_keys = rng.choice([0, 1, 2, 3, 4, 6, 8, 12])
    groups: list[list[Member]] = []
    folders: set[str] = set()
    for i in range(n_keys):
        key = random_key(rng, fmt, i)
        group = []
        folder = key.rpartition("/")[0]
        if folder and folder not in folders and chance(rng, 0.6):
            folders.add(folder)
            group.append(Member(folder, "dir"))
        group += sample_members(rng, key, fmt, limit)
        groups.append(group)
    order = rng.choices(["grouped", "interleaved", "shuffled"], [0.6, 0.25, 0.15])[0]
    members = [m for g in groups for m in g]
    if order == "interleaved":  # a few members moved: their key comes back after others
        for _ in range(rng.randint(1, 4)):
            if len(members) > 1:
                members.insert(
                    rng.randrange(len(members)), members.pop(rng.randrange(len(members)))
                )
    elif order == "shuffled":
        rng.shuffle(members)
    # A global header before no member: tarfile itself cannot read that (see the report).
    global_pax = fmt == "pax" and bool(members) and chance(rng, 0.3)
    shard = Shard(seed, fmt, limit, members, global_pax, order)
    write_shard(shard)
    damage(shard, rng)
    if chance(rng, 0.3):
        shard.chunk = rng.choice([1, 100, 512, 700, 4096, 1 << 20])
    return shard


# ---------------------------------------------------------------------------------------------
# writing and damaging


def set_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)


def patch_header(raw: bytearray, at: int, m: Member) -> None:
    """Rewrite a member's own header block (the one just before its data) as ``m`` asks."""
    h = bytearray(raw[at : at + 512])
    n = len(m.data)
    if m.size_field == "base256":
        h[124:136] = b"\x80" + n.to_bytes(11, "big")
    elif m.size_field == "pax":  # the PAX record holds the size (a writer's >8 GiB layout)
        h[124:136] = b"00000000000\0"
    kind = {"contiguous": b"7", "oldreg": b"\0", "unknown": b"Z", "sparse": b"S"}.get(m.kind)
    if kind is not None:
        h[156:157] = kind
    if m.kind == "sparse":  # one region, all of the data; real size = stored size
        h[386:482] = b"%011o\0" % 0 + b"%011o\0" % n + b"\0" * 72
        h[482] = 0  # no extension blocks
        h[483:495] = b"%011o\0" % n
    set_checksum(h)
    raw[at : at + 512] = h


def write_shard(shard: Shard) -> None:
    bio = io.BytesIO()
    kw: dict[str, Any] = {"pax_headers": {"comment": "keeper test"}} if shard.global_pax else {}
    with tarfile.open(fileobj=bio, mode="w", format=FORMATS[shard.fmt], **kw) as tar:
        for m in shard.members:
            info = tarfile.TarInfo(m.name)
            info.mtime = 1_700_000_000
            if m.kind in DATA_KINDS:
                info.size = len(m.data)
                if m.size_field == "pax":
                    info.pax_headers = {"size": str(len(m.data))}
                if m.kind == "paxsparse":  # GNU tar's PAX sparse 0.1: one region, all the data
                    info.name = "GNUSparseFile.0/x"
                    info.pax_headers = {
                        "GNU.sparse.name": m.name,
                        "GNU.sparse.size": str(len(m.data)),
                        "GNU.sparse.map": f"0,{len(m.data)}",
                    }
                tar.addfile(info, io.BytesIO(m.data))
            else:
                info.type = TYPES[m.kind]
                info.linkname = m.linkname
                info.devmajor, info.devminor = (1, 3) if m.kind == "chrdev" else (0, 0)
                tar.addfile(info)
    raw = bytearray(bio.getvalue())
    for m, info in zip(shard.members, read_back(bytes(raw)), strict=True):
        if m.size_field != "octal" or m.kind in ("contiguous", "oldreg", "unknown", "sparse"):
            patch_header(raw, info.offset_data - 512, m)
    shard.raw = bytes(raw)
    infos = read_back(shard.raw)
    # The generator's own check: tarfile reads back what was meant.
    got = [(i.name, i.size if i.isreg() or i.type == b"Z" else 0) for i in infos]
    assert got == [(m.name, len(m.data)) for m in shard.members], shard.describe()
    shard.layout = [(i.offset, i.offset_data, i.size) for i in infos]
    with tarfile.open(fileobj=io.BytesIO(shard.raw), mode="r:") as tf:
        tf.getmembers()
        shard.data_end = tf.offset


def read_back(raw: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        return tf.getmembers()


def damage(shard: Shard, rng: random.Random) -> None:
    """Cut, end or corrupt the shard; set which members stay and whether it is an error."""
    n, end = len(shard.members), shard.data_end
    kind = rng.choices(["none", "cut", "end", "garbage", "header"], [45, 25, 10, 10, 10])[0]
    shard.damage, shard.kept, shard.error = kind, n, False
    if kind == "cut":
        starts = [lay[0] for lay in shard.layout]
        cut = rng.choice(
            [
                0,
                rng.randrange(len(shard.raw)),
                rng.randrange(len(shard.raw)),
                rng.choice([*starts, end]) + rng.choice([-1, 0, 1, 100, 511, 512, 513]),
                end + rng.randrange(1100),
            ]
        )
        cut = max(0, min(cut, len(shard.raw)))
        shard.damage = f"cut at {cut}"
        shard.raw = shard.raw[:cut]
        # Every member whose data lies wholly inside the cut; a zero block must follow them.
        shard.kept = sum(1 for _, data_at, size in shard.layout if data_at + size <= cut)
        shard.error = cut < end + 512
    elif kind in ("end", "garbage"):
        blocks = rng.choice([0, 1, 2])
        garbage = rng.randbytes(rng.randint(1, 1500)) if kind == "garbage" else b""
        base = (
            shard.raw if kind == "garbage" and chance(rng, 0.3) else shard.raw[: end + 512 * blocks]
        )
        shard.raw = base + garbage
        shard.damage = (
            f"{kind}: {len(base) - end} bytes after the members, {len(garbage)} of garbage"
        )
        shard.error = len(base) - end < 512  # a whole zero block ends a tar, whatever follows
    elif kind == "header" and n:
        j = rng.randrange(n)
        at = shard.layout[j][0]
        junk = rng.randbytes(512)
        shard.raw = shard.raw[:at] + junk + shard.raw[at + 512 :]
        shard.damage = f"header of member {j} at {at} overwritten"
        shard.kept, shard.error = j, True
    elif kind == "header":
        shard.damage = "none"


# ---------------------------------------------------------------------------------------------
# the reference


@dataclass
class Want:
    key: str
    image: Member | None = None
    caption: str | None = None
    metadata: Any = None  # the parsed value (None: none)
    has_metadata: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason, member)
    images: dict[str, Member] = field(default_factory=dict)


def key_and_ext(name: str) -> tuple[str, str] | None:
    """The WebDataset rule as the module states it; None for a hidden basename or none."""
    if "/" in name:
        folder, base = name.rsplit("/", 1)
    else:
        folder, base = "", name
    if base == "" or base[0] == ".":
        return None
    if "." in base:
        stem, ext = base[: base.index(".")], base[base.index(".") + 1 :]
    else:
        stem, ext = base, ""
    return (folder + "/" + stem if folder else stem), ext.lower()


def reference(members: list[Member], limit: int) -> list[Want]:
    by_key: dict[str, Want] = {}
    kept: set[tuple[str, str]] = set()
    for m in members:
        parts = key_and_ext(m.name)
        if parts is None or m.kind == "dir":
            continue  # hidden files and folders are no part of a sample
        key, ext = parts
        want = by_key.setdefault(key, Want(key))
        if m.kind in UNSUPPORTED_KINDS:
            want.problems.append(("unsupported_member", m.name))
            continue
        if (key, ext) in kept:
            want.problems.append(("duplicate_member", m.name))
            continue
        kept.add((key, ext))
        if ext in IMAGE_EXTS:
            want.images[ext] = m
        elif ext == "txt" and len(m.data) > limit:
            want.problems.append(("caption_too_long", m.name))
        elif ext == "txt" and m.caption is None:
            want.problems.append(("caption_not_utf8", m.name))
        elif ext == "txt":
            want.caption = m.caption
        elif ext == "json" and len(m.data) > limit:
            want.problems.append(("metadata_too_long", m.name))
        elif ext == "json" and m.value is INVALID:
            want.problems.append(("invalid_json", m.name))
        elif ext == "json":
            want.metadata, want.has_metadata = m.value, True
    for want in by_key.values():
        want.image = next((want.images[e] for e in IMAGE_EXTS if e in want.images), None)
    return list(by_key.values())


def has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    return False


# ---------------------------------------------------------------------------------------------
# the checks


def check_index(index: ShardIndex, shard: Shard, uri: str) -> None:
    what = shard.describe()
    kept = shard.members[: shard.kept]
    wants = reference(kept, shard.limit)
    assert index.shard == uri, what
    assert index.size == len(shard.raw), what
    assert index.max_index_bytes == shard.limit, what

    # The shard's error, and the last member read whole.
    last = kept[-1].name if kept else None
    assert index.last_member == last, f"{what}\nlast_member {index.last_member!r}"
    if shard.error:
        assert index.error is not None, f"{what}\nno error"
        assert uri in index.error, f"{what}\n{index.error}"
        after = "at the first member" if last is None else f"after member {last!r}"
        assert f"corrupt or truncated tar {after}" in index.error, f"{what}\n{index.error}"
        with pytest.raises(DataError):
            index.raise_for_error()
    else:
        assert index.error is None, f"{what}\n{index.error}"
        index.raise_for_error()

    # The samples: keys in order, image member, caption, metadata, problems.
    got = [(s.key, s.image, s.caption, [(r, m) for r, m, _ in s.problems]) for s in index.samples]
    want = [
        (w.key, None if w.image is None else w.image.name, w.caption, w.problems) for w in wants
    ]
    assert got == want, f"{what}\ngot  {got}\nwant {want}"
    for s, w in zip(index.samples, wants, strict=True):
        assert all(r in SAMPLE_PROBLEMS and d for r, _, d in s.problems), what
        if not w.has_metadata:
            assert s.metadata is None, f"{what}\n{s.key}: {s.metadata!r}"
            continue
        assert s.metadata is not None, f"{what}\n{s.key}: no metadata"
        s.metadata.encode("utf-8")  # storable as text: a lone surrogate stays escaped
        assert json.loads(s.metadata) == w.metadata, f"{what}\n{s.key}: {s.metadata!r}"
        if not has_surrogate(w.metadata):  # compact, and non-ASCII kept readable
            compact = json.dumps(w.metadata, separators=(",", ":"), ensure_ascii=False)
            assert s.metadata == compact, f"{what}\n{s.key}: {s.metadata!r}"

    # problems(), missing_image(), rows(), uris() as the samples say.
    problems = []
    for w in wants:
        if w.image is None:
            problems.append((member_uri(uri, w.key), w.key, "missing_image"))
        problems += [(member_uri(uri, m), w.key, r) for r, m in w.problems]
    assert [(p.uri, p.key, p.reason) for p in index.problems()] == problems, what
    assert index.missing_image() == [w.key for w in wants if w.image is None], what
    rows = index.rows()
    assert index.uris() == [r["image_uri"] for r in rows], what
    with_image = [w for w in wants if w.image is not None]
    assert [(r["key"], r["image_uri"], r["caption"], r["shard"]) for r in rows] == [
        (w.key, member_uri(uri, w.image.name), w.caption, uri)
        for w in with_image
        if w.image is not None
    ], what
    assert [r["metadata"] for r in rows] == [s.metadata for s in index.samples if s.image], what

    # Every member accounted for: its key is a sample, or it is hidden or a folder; every member
    # the index names is one of the shard's.
    keys = {s.key for s in index.samples}
    for m in kept:
        parts = key_and_ext(m.name)
        if parts is not None and m.kind != "dir":
            assert parts[0] in keys, f"{what}\n{m.name!r} is in no sample"
    named = Counter(m.name for m in kept)
    problem_members = Counter(m for s in index.samples for _, m, _ in s.problems)
    assert not problem_members - named, what
    assert {s.image for s in index.samples if s.image} <= set(named), what

    # Each image's bytes, exactly, at the place the index gives.
    layout = dict(zip(map(id, shard.members), shard.layout, strict=True))
    for row, w in zip(rows, with_image, strict=True):
        assert w.image is not None
        _, data_at, size = layout[id(w.image)]
        assert (row["offset"], row["size"]) == (data_at, len(w.image.data)), what
        assert row["offset"] + row["size"] <= len(shard.raw), what
        got_bytes = read_member(row["image_uri"], row["offset"], row["size"], max_bytes=size)
        assert got_bytes == w.image.data, f"{what}\n{row}"
    big = next((r for r in rows if r["size"] > 0), None)
    if big is not None:
        with pytest.raises(ImageDecodeError) as e:
            read_member(big["image_uri"], big["offset"], big["size"], max_bytes=big["size"] - 1)
        assert e.value.reason == "too_large"

    # The cached form is the index, exactly (odd names and the error included).
    text = index.to_json()
    text.decode("ascii")
    assert ShardIndex.from_json(text) == index, what


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's cases (a tmp_path each costs more than a case)."""
    return tmp_path_factory.mktemp("random")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_index_shard_is_the_reference_on_random_shards(
    seed: int, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = random_shard(seed)
    path = folder / f"{seed:05d}.tar"
    path.write_bytes(shard.raw)
    uri = str(path)
    index = index_shard(uri, max_index_bytes=shard.limit)
    check_index(index, shard, uri)
    if shard.chunk is not None:  # the S3 reader's ranged reads, of the same bytes
        chunk = shard.chunk
        monkeypatch.setattr(
            webdataset, "_open_shard", lambda u, size: webdataset._RangeFile(u, size, chunk)
        )
        again = index_shard(uri, max_index_bytes=shard.limit)
        assert again == index, f"{shard.describe()}\nthrough _RangeFile: {again}"


def test_the_random_shards_cover_the_cases() -> None:
    """The generator makes what the docstring says (on the default seeds), so a change to it
    cannot quietly stop testing a case."""
    seen: Counter[str] = Counter()
    for seed in range(min(SEEDS, 250)):
        shard = random_shard(seed)
        seen[shard.fmt] += 1
        seen[shard.order] += 1
        seen[shard.damage.split(" ")[0].rstrip(":")] += 1
        seen["error"] += shard.error
        seen["empty file"] += shard.raw == b""
        seen["range"] += shard.chunk is not None
        seen["global pax header"] += shard.global_pax
        for m in shard.members:
            seen[m.kind] += 1
            seen[m.size_field] += 1
        for w in reference(shard.members[: shard.kept], shard.limit):
            seen["missing_image"] += w.image is None
            seen["metadata"] += w.has_metadata
            seen["not an object"] += w.has_metadata and not isinstance(w.metadata, dict)
            seen["caption"] += w.caption is not None
            seen.update(r for r, _ in w.problems)
    wanted = [*FORMATS, "grouped", "interleaved", "shuffled", "none", "cut", "end", "garbage"]
    wanted += ["header", "error", "empty file", "range", "global pax header", "missing_image"]
    wanted += ["metadata", "not an object", "caption"]
    wanted += ["file", "dir", "contiguous", "oldreg", "base256", "pax", *UNSUPPORTED_KINDS]
    wanted += [r for r in SAMPLE_PROBLEMS if r != "missing_image"]
    if SEEDS >= 250:
        assert not [w for w in wanted if not seen[w]], seen


# ---------------------------------------------------------------------------------------------
# brace patterns


class Malformed(Exception):
    pass


def ref_alternatives(body: str) -> list[str]:
    if ".." in body:
        ends = body.split("..")
        digits = set("0123456789")
        if len(ends) != 2 or not all(
            e.removeprefix("-") and set(e.removeprefix("-")) <= digits for e in ends
        ):
            raise Malformed(f"not an integer range: {{{body}}}")
        lo, hi = int(ends[0]), int(ends[1])
        if abs(hi - lo) + 1 > 1_000_000:
            raise Malformed("too many")
        # braceexpand's rule: padded when either end, other than 0 or -0, starts with 0 or -0
        padded = any(e not in ("0", "-0") and e.removeprefix("-").startswith("0") for e in ends)
        width = max(len(e) for e in ends) if padded else 0
        step = 1 if hi >= lo else -1
        return [str(i).zfill(width) for i in range(lo, hi + step, step)]  # "-5" -> "-05"
    if "," in body:
        return body.split(",")
    return ["{" + body + "}"]


def ref_pieces(pattern: str) -> list[list[str]]:
    """The literal text and each group's alternatives, in turn; Malformed as documented."""
    pieces: list[list[str]] = []
    text, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "}":
            raise Malformed("unbalanced }")
        if c == "{":
            j = pattern.find("}", i)
            if j < 0 or "{" in pattern[i + 1 : j]:
                raise Malformed("unbalanced or nested {")
            pieces += [[text], ref_alternatives(pattern[i + 1 : j])]
            text, i = "", j + 1
            continue
        text += c
        i += 1
    pieces.append([text])
    if math.prod(len(p) for p in pieces) > 1_000_000:
        raise Malformed("too many")
    return pieces


def ref_expand(pattern: str) -> list[str]:
    """Every name the pattern makes, first group slowest (bash's order)."""
    return ["".join(combo) for combo in itertools.product(*ref_pieces(pattern))]


def random_group(rng: random.Random, small: bool) -> str:
    r = rng.random()
    if r < 0.4:
        lo = rng.randint(-12, 30) if chance(rng, 0.2) else rng.randint(0, 30)
        hi = lo + rng.randint(-6, 8) if small else rng.randint(-20, 150)

        def written(v: int) -> str:
            pad = rng.choice([0, 0, 1, 2, 3])
            return ("-" if v < 0 else "") + "0" * pad + str(abs(v))

        return "{" + written(lo) + ".." + written(hi) + "}"
    if r < 0.7:
        items = [rng.choice(["a", "b", "", "x1", "b", "0", "00"]) for _ in range(rng.randint(2, 4))]
        return "{" + ",".join(items) + "}"
    if r < 0.78:
        return rng.choice(["{x}", "{}", "{0}"])
    if small and chance(rng, 0.7):
        return "{" + rng.choice(["a", "0", "1"]) + "," + rng.choice(["b", "2"]) + "}"
    return rng.choice(
        [
            "{a..c}",
            "{0..10..2}",
            "{1..}",
            "{..3}",
            "{1..3,5}",
            "{+1..3}",
            "{1...3}",
            "{0..1}{0..999}{0..999}",
            "{0..2000000}",
            "{a,{b,c}}",
            "{0..2",
            "0..2}",
            "{{0..2}}",
            "}{",
        ]
    )


def random_pattern(rng: random.Random, small: bool) -> str:
    """A pattern naming at most 20,000 names (or over a million, or malformed)."""
    while True:
        pattern = draw_pattern(rng, small)
        try:
            n = math.prod(len(p) for p in ref_pieces(pattern))
        except Malformed:
            return pattern
        if n <= 20_000:
            return pattern


def draw_pattern(rng: random.Random, small: bool) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        parts.append(rng.choice(["", "s-", "a_", "x"]))
        parts.append(random_group(rng, small))
    parts.append(rng.choice([".tar", ".tar", ".TAR", "-x.tar", ".jpg", ""]))
    return "".join(parts)


@pytest.mark.parametrize("seed", range(BRACE_SEEDS))
def test_brace_expansion_is_the_reference(seed: int, folder: Path) -> None:
    rng = random.Random(seed)
    tmp_path = folder / f"brace-{seed}"
    tmp_path.mkdir()
    pattern = random_pattern(rng, small=False)
    try:
        want: list[str] | None = ref_expand(pattern)
    except Malformed:
        want = None
    if want is None:
        with pytest.raises(DataError):
            _expand(pattern)
    else:
        assert _expand(pattern) == want, f"seed {seed}: {pattern!r}"

    # list_shards on a small pattern, against files made for it (some left out)
    pattern = "s" + random_pattern(rng, small=True)
    try:
        names: list[str] | None = ref_expand(pattern)
    except Malformed:
        names = None
    full = f"{tmp_path}/{pattern}"
    what = f"seed {seed}: {pattern!r} -> {names}"
    if names is None:
        with pytest.raises(DataError):
            list_shards(full)
        return
    if not any(".." in g or "," in g for g in re.findall(r"\{([^{}]*)\}", pattern)):
        return  # no group to expand: a plain path, not a pattern
    names = sorted(set(names))
    if not all(n.lower().endswith(".tar") for n in names):
        with pytest.raises(DataError, match=r"non-\.tar"):
            list_shards(full)
        return
    present = [n for n in names if not chance(rng, 0.15)]
    for n in present:
        (tmp_path / n).write_bytes(b"")
    missing = [n for n in names if n not in present]
    if missing:
        count = f"{len(missing)} of {len(names)} shards do not exist, first {missing[0]!r}"
        with pytest.raises(DataError) as e:
            list_shards(full)
        assert count.replace(missing[0], f"{tmp_path}/{missing[0]}") in str(e.value), what
    else:
        assert list_shards(full) == [f"{tmp_path}/{n}" for n in names], what


# ---------------------------------------------------------------------------------------------
# member URIs

SHARD_HEADS = ["", "s3://bucket/", "/abs/", "file:///x/", "rel/", "s3://b/a b/"]
SEGMENTS = ["a", "a b", "#1", "x.tar", "x.tar.gz", "ü", "日本", "100%", "q?", "TAR", "a#b.TAR"]
MEMBERS = ["0.jpg", "a b.png", "#", "x.tar#y.jpg", "sub/dir/0.seg.png", "ü.JPG", "?", ".tar#"]


@pytest.mark.parametrize("seed", range(URI_SEEDS))
def test_member_uri_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        folders = [rng.choice(SEGMENTS) for _ in range(rng.randrange(3))]
        stem = rng.choice(["00001", "a#b", "x.tar", ""])
        shard = rng.choice(SHARD_HEADS) + "".join(f + "/" for f in folders) + stem
        shard += rng.choice([".tar", ".TAR", ".Tar", ".tar.gz", ".zip", ""])
        member = "".join(rng.choice(MEMBERS) for _ in range(rng.randrange(3)))
        what = f"seed {seed}: {shard!r} {member!r}"
        # A shard whose own path holds ".tar#" could not be split back: refused.
        tar_hash = ".tar#" in shard.lower()
        if not shard.lower().endswith(".tar") or not member or tar_hash:
            with pytest.raises(DataError):
                member_uri(shard, member)
            continue
        uri = member_uri(shard, member)
        assert uri == f"{shard}#{member}", what
        assert split_member_uri(uri) == (shard, member), what
        # Cut off before its member, or never a member: None.
        assert split_member_uri(shard) is None, what
        assert split_member_uri(shard + "#") is None, what


# ---------------------------------------------------------------------------------------------
# what the random cases found


def test_a_sparse_member_is_a_sample_problem_not_the_shards_error(tmp_path: Path) -> None:
    raw = tar_bytes(
        [("a.jpg", b"A" * 100), ("b.jpg", b"B" * 512), ("c.jpg", b"C" * 7)],
        tarfile.GNU_FORMAT,
    )
    # b.jpg as GNU tar -S writes a 1 GiB file holding 512 bytes of data: one region, at 0.
    at = read_back(bytes(raw))[1].offset
    h = bytearray(raw[at : at + 512])
    assert h[:5] == b"b.jpg"
    h[156:157] = b"S"
    h[386:410] = b"%011o\0" % 0 + b"%011o\0" % 512
    h[483:495] = b"%011o\0" % (1 << 30)
    set_checksum(h)
    raw[at : at + 512] = h
    shard = tmp_path / "00000.tar"
    shard.write_bytes(raw)
    with tarfile.open(shard) as tf:  # tarfile (and GNU tar) read it whole
        assert [(m.name, m.issparse()) for m in tf] == [
            ("a.jpg", False),
            ("b.jpg", True),
            ("c.jpg", False),
        ]
    index = index_shard(str(shard))
    assert index.error is None, index.error  # "member 'b.jpg' needs 1073743360 bytes, ..."
    assert [s.key for s in index.samples] == ["a", "b", "c"]
    assert [p.reason for p in index.problems()] == ["missing_image", "unsupported_member"]


@pytest.mark.parametrize("raw", [b'{"x": 1e400}', b'{"x": NaN}', b"[-Infinity]"])
def test_metadata_is_strict_json_or_a_problem(tmp_path: Path, raw: bytes) -> None:
    shard = tmp_path / "00000.tar"
    shard.write_bytes(tar_bytes([("a.jpg", b"x"), ("a.json", raw)], tarfile.GNU_FORMAT))
    (sample,) = index_shard(str(shard)).samples
    assert sample.metadata is None
    assert [(r, m) for r, m, _ in sample.problems] == [("invalid_json", "a.json")]
    assert "is not JSON" in sample.problems[0][2] or "Out of range" in sample.problems[0][2]


def pax_shard(path: Path, pax: dict[str, str]) -> Path:
    """Three members, the second with these PAX records."""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, records in [("a.jpg", {}), ("b.jpg", pax), ("c.jpg", {})]:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = 3, records
            tar.addfile(info, io.BytesIO(b"abc"))
    path.write_bytes(bio.getvalue())
    return path


@pytest.mark.parametrize(
    "pax",
    [
        {"GNU.sparse.map": "x,y"},
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"},  # no map at the data's start
        {"comment": "1 hdrcharset=?"},  # made non-UTF-8 below
    ],
)
def test_a_malformed_pax_record_is_the_shards_error(tmp_path: Path, pax: dict[str, str]) -> None:
    shard = pax_shard(tmp_path / "00000.tar", pax)
    raw = shard.read_bytes()
    shard.write_bytes(raw.replace(b"hdrcharset=?", b"hdrcharset=\xff"))
    index = index_shard(str(shard))
    assert index.error is not None
    assert "after member 'a.jpg'" in index.error
    assert [s.key for s in index.samples] == ["a"]


def test_a_negative_max_index_bytes_is_refused(tmp_path: Path) -> None:
    shard = pax_shard(tmp_path / "00000.tar", {})
    with pytest.raises(ValueError, match=">= 0"):
        index_shard(str(shard), max_index_bytes=-1)
    assert [s.key for s in index_shard(str(shard), max_index_bytes=0).samples] == ["a", "b", "c"]


def test_a_shard_whose_path_holds_tar_hash_is_refused(tmp_path: Path) -> None:
    """split_member_uri cuts at the first '.tar#': a shard whose own path held one (a folder
    'x.tar#1/') would split into another shard and member, and read_member would read the byte
    range from the wrong file. Such a shard is refused, by name, when it is listed."""
    shard = "s3://b/backup.tar#1/00000.tar"
    with pytest.raises(DataError, match="must not hold"):
        member_uri(shard, "000.jpg")
    folder = tmp_path / "backup.TAR#1"
    folder.mkdir()
    pax_shard(folder / "00000.tar", {})
    for src in (str(tmp_path), str(folder / "00000.tar"), f"{folder}/{{00000..00000}}.tar"):
        with pytest.raises(DataError, match="rename it") as e:
            list_shards(src)
        assert "backup.TAR#1/00000.tar" in str(e.value)
