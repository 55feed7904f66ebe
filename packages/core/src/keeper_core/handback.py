"""Hand the picks back to photo tools: XMP sidecars and copies or links of the keepers.

Nothing here opens an original for writing (:mod:`keeper_core.jpeg_xmp` writes the same
packet into a JPEG, for ``keeper pick --xmp embed``). Sidecars are separate ``.xmp`` files that
Lightroom, Capture One, darktable and digiKam read; the keepers are copied or linked into a
folder of their own, under the same relative paths they had under the input root.

    plans = plan_sidecars(uris, input_root="photos", mode="mirror", out_dir="out/xmp")
    for plan in plans:  # one per sidecar; a RAW+JPEG pair's JPEG is in plan.skipped
        write_sidecar(plan.sidecar_uri, rating=5, label="Green", keeper_fields={"rank": "1"})
    export_keepers(keepers, input_root="photos", dest="out/keepers", mode="hardlink")

Sidecars are written with pyexiv2 (the exiv2 library); a new one, whose layout is fixed, from
exiv2's layout without it (:func:`fresh_packet`, the same bytes). An existing sidecar is merged:
keeper's own namespace (:data:`KEEPER_NS`, prefix ``keeper``) changes, every other field stays,
and ``xmp:Rating`` / ``xmp:Label`` change only where keeper set them (``keeper:xmp`` records what
it last set them to): a rating or label a person gave in a photo tool is theirs, and stays
(:func:`merge_packet`, the one merge of a sidecar and of a JPEG's own packet). Writes are
atomic (:func:`storage.write_bytes`), and a sidecar whose content would not change is not
rewritten, so re-runs leave its mtime alone (Lightroom takes a newer sidecar for an outside edit).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Literal, NamedTuple

from keeper_core import storage
from keeper_core.errors import ConfigError, DataError, StorageError
from keeper_core.exiv2_session import Level, exiv2
from keeper_core.formats import RAW_SUFFIXES
from keeper_core.progress import Progress
from keeper_core.xmp_resources import restore_resources

log = logging.getLogger(__name__)

#: keeper's XMP namespace; its fields are ``Xmp.keeper.<name>`` (``keeper:group`` in the file).
#: A namespace URI is a name, never fetched; ``.invalid`` (RFC 2606) can never belong to anyone.
KEEPER_NS = "https://keeper.invalid/ns/xmp/1.0/"
KEEPER_PREFIX = "keeper"

# What exiv2 writes for a sidecar that does not exist yet (its own header and footer).
_EMPTY_PACKET = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
    b' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    b" </rdf:RDF>\n"
    b"</x:xmpmeta>\n"
    b'<?xpacket end="w"?>'
)
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
_XMP_MIME = "application/rdf+xml"
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# Characters XML 1.0 cannot hold at all (escaping does not help); lone surrogates are what
# Python makes of a file name's bytes that are not UTF-8 (exiv2 cannot encode them either).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# ...and DEL, which XML holds but exiv2 writes as a space: what xml_text escapes.
_ESCAPED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")
_OWN_KEY = re.compile(rf"^Xmp\.{KEEPER_PREFIX}\.[^/\[]+$")
#: keeper's record of the rating and label it chose, ``"<rating>|<label>"`` (``keeper:xmp``): a
#: sidecar still holding those values holds keeper's own; other values are a person's.
RECORD_KEY = f"Xmp.{KEEPER_PREFIX}.xmp"
RATING_KEY, LABEL_KEY = "Xmp.xmp.Rating", "Xmp.xmp.Label"
#: keeper's reasons: words and numbers that move as a library grows (robust spreads are pooled
#: over every group), so a packet whose other fields all hold keeper's choice keeps its reasons
#: as they are (:func:`merge_packet`), and the file is not rewritten for them alone
REASONS_KEY = f"Xmp.{KEEPER_PREFIX}.reasons"

#: An XMP value as pyexiv2 reads it: text, an array's items, or a language alternative's
#: ``{'lang="x-default"': text}``.
XmpValue = str | list[str] | dict[str, str]


class SidecarWrite(NamedTuple):
    """What :func:`write_sidecar` did to one sidecar (or ``jpeg_xmp.write_jpeg_xmp`` to the XMP
    inside one JPEG)."""

    changed: bool  # the file was written (False: it already held exactly this)
    #: ``"rating"`` / ``"label"``: a person's value the sidecar holds, left in place of keeper's
    kept: tuple[str, ...] = ()
    #: a JPEG written (``write_jpeg_xmp``): its new stamp, and the content digest of what it
    #: holds (``embedded_xmp.content_digest``: the same before and after, as only XMP changed)
    stamp: storage.Stamp | None = None
    content_id: str | None = None


class SidecarPlan(NamedTuple):
    """One sidecar to write, and the images of the list that it stands for without one.

    Attributes:
        image_uri: the image whose rating goes into the sidecar.
        sidecar_uri: where the sidecar goes (``.xmp``).
        skipped: ``(image_uri, reason)`` for each other image of the list that maps onto the
            same sidecar name (the JPEG of a RAW+JPEG pair); they get no sidecar of their own.
        in_file: the image takes its XMP in its own file (``plan_sidecars``' ``in_file``), not
            in a sidecar; ``sidecar_uri`` is then the name a sidecar of its own would have, which
            another plan may own (``IMG_1.HEIC``'s, beside ``IMG_1.JPG``).
    """

    image_uri: str
    sidecar_uri: str
    skipped: tuple[tuple[str, str], ...] = ()
    in_file: bool = False


class ExportFailure(NamedTuple):
    """An image :func:`export_keepers` could not export, and why."""

    image_uri: str
    reason: str


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_keepers` did: each image is counted exactly once."""

    exported: int = 0
    already_there: int = 0
    #: keeper's own copies from an earlier run, replaced because the original changed since
    #: (its XMP rewritten by ``--xmp embed`` or by a photo tool): see :data:`EXPORT_RECORD`
    updated: int = 0
    failed: list[ExportFailure] = field(default_factory=list)
    #: why :data:`EXPORT_RECORD` could not be read or written (the export itself went on)
    record_problem: str | None = None
    #: keeper's copies from earlier runs, still as it wrote them, of images not among these
    #: keepers (no longer kept, or gone): left in place, listed here (``dest``'s paths)
    not_kept: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Relative paths


def _relative(uri: str, root: str) -> str | None:
    """``uri``'s path under ``root`` (``a/b.jpg``), or None when it is not under it."""
    if storage.is_s3(uri) != storage.is_s3(root):
        return None
    if storage.is_s3(uri):
        prefix = root.rstrip("/") + "/"
        rel = uri[len(prefix) :] if uri.startswith(prefix) else ""
    else:
        rel = os.path.relpath(storage.same_key(uri), storage.same_key(root))
        rel = PurePosixPath(Path(rel)).as_posix()
    parts = rel.split("/")
    if not rel or rel == "." or ".." in parts or "" in parts:
        return None
    return rel


def _relatives(uris: Sequence[str], root: str) -> list[str]:
    rels = [_relative(u, root) for u in uris]
    outside = [u for u, r in zip(uris, rels, strict=True) if r is None]
    if outside:
        shown = ", ".join(outside[:5]) + (
            f" (+{len(outside) - 5} more)" if len(outside) > 5 else ""
        )
        raise ConfigError(
            f"input_root {root!r}: {len(outside)} image(s) are not under it, so they have no "
            f"relative path to mirror: {shown}"
        )
    return [r for r in rels if r is not None]


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


# ---------------------------------------------------------------------------------------------
# Sidecar plans


def _sidecar_name(name: str, naming: Literal["basename", "full"]) -> str:
    if naming == "full":
        return name + ".xmp"
    stem, dot, _ = name.rpartition(".")
    return (stem if dot and stem else name) + ".xmp"


def _is_raw(uri: str) -> bool:
    return uri.lower().endswith(RAW_SUFFIXES)


def plan_sidecars(
    image_uris: Sequence[str],
    *,
    input_root: str,
    mode: Literal["mirror", "beside"],
    out_dir: str | None,
    naming: Literal["basename", "full"] = "basename",
    in_file: Callable[[str], bool] | None = None,
) -> list[SidecarPlan]:
    """Where each image's XMP sidecar goes, one plan per sidecar, in the images' order.

    Images whose sidecar names coincide (compared case-insensitively, as on macOS and Windows
    disks) share one: with ``naming="basename"`` a RAW+JPEG pair ``IMG_1.CR2`` + ``IMG_1.JPG``
    maps onto ``IMG_1.xmp``, which belongs to the RAW, as in Lightroom and Capture One. Among
    two non-RAW files with one stem (``IMG_1.HEIC`` + ``IMG_1.JPG``) the first by name owns it.
    The others are listed in the owner's ``skipped`` with the reason, so every input image is
    either a plan's ``image_uri`` or in one plan's ``skipped``.

    An image for which ``in_file`` is true takes its XMP in its own file (a JPEG under ``keeper
    pick --xmp embed``): it needs no sidecar name, so it gets a plan of its own (``in_file``
    set) beside the non-RAW files of its stem, and the first of those by name owns the sidecar.
    Beside a RAW it stays in the RAW's ``skipped``: photo tools show the pair as one photo,
    whose XMP is the RAW's sidecar. The same file listed twice is one plan either way.

    Args:
        image_uris: the images (local paths or ``s3://`` URIs).
        input_root: the folder or prefix the images are under; ``mirror`` keeps their paths
            relative to it.
        mode: ``mirror``: under ``out_dir`` at the image's relative path (local or ``s3://``);
            ``beside``: next to the image (local images only).
        out_dir: where ``mirror`` writes; must be None for ``beside``.
        naming: ``basename``: ``IMG_1.CR2`` -> ``IMG_1.xmp`` (Lightroom, Capture One);
            ``full``: ``IMG_1.CR2.xmp`` (darktable, digiKam).

    Raises:
        ConfigError: an unknown mode or naming, ``out_dir`` missing (mirror) or given
            (beside), ``beside`` for an ``s3://`` image (keeper does not write into a source
            bucket unasked; mirror with ``out_dir=input_root`` does that explicitly), an image
            outside ``input_root`` (mirror), or an input that is itself an ``.xmp`` file.
    """
    if mode not in ("mirror", "beside"):
        raise ConfigError(f"mode must be 'mirror' or 'beside', got {mode!r}")
    if naming not in ("basename", "full"):
        raise ConfigError(f"naming must be 'basename' or 'full', got {naming!r}")
    xmps = [u for u in image_uris if u.lower().endswith(".xmp")]
    if xmps:
        raise ConfigError(f"image_uris holds sidecars, not images: {xmps[:5]}")
    names = [u.rpartition("/")[2] for u in image_uris]
    folders = [u for u, n in zip(image_uris, names, strict=True) if not n]
    if folders:
        raise ConfigError(f"image_uris holds folders, not files: {folders[:5]}")
    if mode == "mirror":
        if not out_dir:
            raise ConfigError("mode='mirror' needs out_dir")
        rels = _relatives(image_uris, input_root)
        names = [PurePosixPath(r).name for r in rels]
        sidecars = [
            storage.join(out_dir, str(PurePosixPath(r).with_name(_sidecar_name(n, naming))))
            for r, n in zip(rels, names, strict=True)
        ]
    else:
        if out_dir is not None:
            raise ConfigError("mode='beside' writes next to each image; out_dir must be None")
        on_s3 = [u for u in image_uris if storage.is_s3(u)]
        if on_s3:
            raise ConfigError(
                f"mode='beside' writes into the originals' folders, local ones only; "
                f"{on_s3[0]} is on S3 (use mode='mirror', with out_dir=input_root to mean it)"
            )
        # The last path component replaced, so the sidecar URI is written the way the image's is.
        sidecars = [
            u[: len(u) - len(n)] + _sidecar_name(n, naming)
            for u, n in zip(image_uris, names, strict=True)
        ]

    by_sidecar: dict[str, list[int]] = {}
    for i, sidecar in enumerate(sidecars):
        by_sidecar.setdefault(name_key(sidecar), []).append(i)

    def owner_order(i: int) -> tuple[bool, str, str]:
        return (not _is_raw(image_uris[i]), names[i].casefold(), image_uris[i])

    def plan(members: list[int], *, into_file: bool) -> tuple[int, SidecarPlan]:
        owner, *others = sorted(members, key=owner_order)
        skipped = tuple((image_uris[i], why(i, owner, into_file)) for i in others)
        return owner, SidecarPlan(image_uris[owner], sidecars[owner], skipped, into_file)

    def why(i: int, owner: int, into_file: bool) -> str:
        if into_file and storage.same_key(image_uris[i]) != storage.same_key(image_uris[owner]):
            return f"the same file as {image_uris[owner]} on a disk that ignores case"
        return _skip_reason(image_uris[i], image_uris[owner], sidecars[owner])

    plans: list[tuple[int, SidecarPlan]] = []
    for members in by_sidecar.values():
        files = [i for i in members if in_file is not None and in_file(image_uris[i])]
        if not files or any(_is_raw(image_uris[i]) for i in members):
            plans.append(plan(members, into_file=False))
            continue
        by_image: dict[str, list[int]] = {}
        for i in files:  # the same file listed twice is one plan: no two writers of one file
            by_image.setdefault(name_key(image_uris[i]), []).append(i)
        plans.extend(plan(same, into_file=True) for same in by_image.values())
        rest = sorted(set(members) - set(files))
        if rest:
            plans.append(plan(rest, into_file=False))
    return [plan for _, plan in sorted(plans, key=lambda p: p[0])]


def name_key(uri: str) -> str:
    """What tells two files apart on every disk a library lives on: case folded, as on macOS and
    Windows disks, and NFC (macOS stores names decomposed, other tools composed; APFS and HFS+
    take both spellings for one file, as case-insensitive disks take both cases)."""
    return unicodedata.normalize("NFC", storage.same_key(uri)).casefold()


def _skip_reason(image: str, owner: str, sidecar: str) -> str:
    if storage.same_key(image) == storage.same_key(owner):
        return "listed more than once"
    why = "the RAW of the pair" if _is_raw(owner) else "the first by name"
    return f"shares sidecar {sidecar} with {owner} ({why}), which owns it"


# ---------------------------------------------------------------------------------------------
# Sidecars


@contextmanager
def _exiv2(level: Level = "error") -> Iterator[ModuleType]:
    """pyexiv2 for one operation: exiv2's process-wide state (the XMP toolkit's namespace
    registry, pyexiv2's error log) held for this thread, keeper's namespace registered.

    The "error" level, not "mute": warnings are quiet, but pyexiv2 turns error-level messages
    into exceptions only when they are logged, so muting them would hide failures
    (:mod:`keeper_core.exiv2_session`).
    """
    with exiv2(level) as pyexiv2:
        pyexiv2.registerNs(KEEPER_NS, KEEPER_PREFIX)
        yield pyexiv2


def xml_text(value: str) -> str:
    """``value`` with each character XML cannot store written as its escape (``\\x01``).

    For text that comes from data, such as a file name quoted in a reason (a name may hold any
    byte but ``/`` and NUL): :func:`write_sidecar` refuses those characters, this keeps them
    readable instead. DEL is escaped too (exiv2 would write it as a space). Text without them
    comes back unchanged.
    """
    return _ESCAPED.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), value)


def _check_text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {type(value).__name__}")
    if _NOT_XML.search(value):
        raise ConfigError(
            f"{what} holds a control character or lone surrogate XML cannot store: {value!r} "
            "(handback.xml_text escapes them)"
        )
    if value.startswith("type="):
        # exiv2 reads a leading 'type=' as an array declaration and drops the text.
        raise ConfigError(f"{what} must not start with 'type=': {value!r}")
    return value


def _has_properties(packet: bytes) -> bool:
    """Whether an XMP packet holds any property: False only for a well-formed, empty one."""
    try:
        root = ET.fromstring(packet)
    except ET.ParseError:
        return True  # not even XML: cannot prove it empty
    for desc in root.iter(f"{_RDF}Description"):
        if len(desc) or any(k != f"{_RDF}about" for k in desc.attrib):
            return True
    return False


#: The prefixes keeper reads and writes by name (``Xmp.xmp.Rating``, ``Xmp.keeper.group``) and
#: their namespaces. exiv2 keeps one prefix registry for the whole process, and parsing a packet
#: that binds one of these prefixes to another URI (a damaged or hand-edited sidecar, a photo's
#: own XMP) re-registers it: every sidecar written after would put ``xmp:Rating`` in that other
#: namespace, where no photo tool looks, while exiv2 itself still read it back as the rating.
_OWN_NAMESPACES = (("http://ns.adobe.com/xap/1.0/", "xmp"), (KEEPER_NS, KEEPER_PREFIX))


#: Prefixes whose bindings are the XMP container's, not a schema's.
_FIXED_PREFIXES = frozenset({"x", "rdf", "xml", "xmlns"})


# A start or end tag, its quoted attribute values whole (they may hold '>'); comments, CDATA
# and processing instructions as themselves, so that nothing in them is taken for a tag.
_MARKUP = re.compile(
    rb"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<(?:[^>\"']|\"[^\"]*\"|'[^']*')*>", re.S
)
_QUOTED = re.compile(rb"(\"[^\"]*\"|'[^']*')")


def one_prefix_per_namespace(
    packet: bytes, bindings: Sequence[tuple[str, str]] | None = None
) -> bytes:
    """``packet`` with each namespace under one prefix, where it has one under several.

    An old Photoshop description binds Adobe's namespace as ``xap:``, and a tool that added
    another description beside it may bind it as ``xmp:``: exiv2's XMP toolkit refuses any
    packet with one namespace under two prefixes ("Schema namespace URI and prefix
    mismatch"), so such a sidecar could not be read or rated. A prefix is only a name for its
    namespace, so the later ones are renamed to the first, in tags only. Adobe's namespace and
    keeper's go under their own prefixes (``xmp``, ``keeper``) wherever the packet leaves those
    free: exiv2 writes them back so anyway, and cannot resolve a struct field named by another
    (``xap:Op`` in a Photoshop packet: "Unknown namespace prefix for qualified name"); another
    namespace bound under one of those and another prefix keeps the other one.
    The packet is returned as it is when nothing needs renaming, when a prefix names two
    namespaces somewhere in it, or when the renamed packet does not parse to the same
    elements, attributes and text by namespace as the original (then exiv2 refuses it, as
    before). ``bindings``: the packet's (prefix, namespace) declarations in order, where the
    caller has parsed it already.
    """
    if bindings is None:
        try:
            bindings = [b for _, b in ET.iterparse(io.BytesIO(packet), events=("start-ns",))]
        except ET.ParseError:
            return packet
    prefixes: dict[str, str] = {}
    by_ns: dict[str, list[str]] = {}
    for prefix, ns in bindings:
        if prefixes.setdefault(prefix, ns) != ns:
            return packet  # one name for two namespaces: renaming could merge them
        if prefix and prefix not in by_ns.setdefault(ns, []):
            by_ns[ns].append(prefix)
    # each namespace's prefix: keeper's own for its namespaces (Adobe's ``xmp``), else the
    # first that is not one of those
    reserved = {p for _, p in _OWN_NAMESPACES}
    keep = {
        ns: next((p for n, p in _OWN_NAMESPACES if n == ns and p in names), None)
        or next((p for p in names if p not in reserved), names[0])
        for ns, names in by_ns.items()
    }
    for ns, own in _OWN_NAMESPACES:
        if ns in keep and keep[ns] != own and own not in keep.values():
            # Adobe's namespace as Photoshop's ``xap:`` alone: exiv2 writes it back as
            # ``xmp:`` anyway, and cannot name a struct field ``xap:Op`` ("Unknown namespace
            # prefix for qualified name")
            keep[ns] = own
    rename = {
        p.encode(): keep[ns].encode() for ns, names in by_ns.items() for p in names if p != keep[ns]
    }
    if not rename:
        return packet
    old = b"|".join(map(re.escape, rename))
    # a qualified name's prefix (after '<', '</' or a space), or the prefix an xmlns declares;
    # never a local name (``ea:xap="1"`` keeps its ``xap``)
    name = re.compile(rb"(?<=[<\s/])(" + old + rb")(?=:)|(?<=xmlns:)(" + old + rb")(?=\s*=)")

    def tag(m: re.Match[bytes]) -> bytes:
        text = m.group()
        if text.startswith((b"<!", b"<?")):
            return text
        parts = _QUOTED.split(text)  # odd parts are quoted values
        return b"".join(
            part if i % 2 else name.sub(lambda n: rename[n.group(1) or n.group(2)], part)
            for i, part in enumerate(parts)
        )

    out = _MARKUP.sub(tag, packet)
    return out if _same_xml(packet, out) else packet


def _same_xml(a: bytes, b: bytes) -> bool:
    """Whether two packets parse to the same elements, attributes and text, by namespace."""
    try:
        x, y = ET.fromstring(a), ET.fromstring(b)
    except ET.ParseError:
        return False

    def same(e: ET.Element, f: ET.Element) -> bool:
        return (
            (e.tag, e.attrib, e.text, e.tail) == (f.tag, f.attrib, f.text, f.tail)
            and len(e) == len(f)
            and all(same(c, d) for c, d in zip(e, f, strict=True))
        )

    return same(x, y)


def _check_packet(
    pyexiv2: ModuleType, packet: bytes, uri: str, what: str, *, writing: bool
) -> bytes:
    """The packet to give exiv2 (:func:`one_prefix_per_namespace` of it); refuses a packet
    exiv2 would misread, or (``writing``) write back changed, and binds in exiv2's registry
    each prefix the packet binds, as the packet binds it.

    - exiv2 names a property by its prefix, not its namespace: in a packet that binds ``xmp``
      to ``http://example.com/other/``, that namespace's ``xmp:Rating`` reads as the rating
      (``Xmp.xmp.Rating``), and written back it lands in Adobe's namespace, beside whatever else
      that namespace held (``xmp:Mood``): a rating nobody gave, shown by every photo tool. Such
      a packet is refused. Adobe's namespace under another prefix (``xap:``, as Photoshop wrote
      it) is read by its namespace and is fine.
    - exiv2's registry is one for the process, and what a packet bound stayed bound for the
      packets after it: once one sidecar had bound ``dc`` to another namespace, every later
      merge wrote its ``dc:subject`` (a person's keywords) into that namespace, where no photo
      tool looks; and a sidecar whose struct fields name a namespace by another prefix than an
      earlier file used for it (``foo:`` where that one said ``ea:``) could not be written back
      ("Unknown namespace prefix for qualified name"). Hence the binding, before each parse.
    - Refused when writing: a namespace URI that ends in neither '/' nor '#' (exiv2 appends a
      '/': every property of ``http://example.com/ns`` would be written back in
      ``http://example.com/ns/``, another namespace); a value that starts with ``type=``
      (exiv2 reads ``type=Bag x`` as a declaration, and writes back an empty bag).

    A packet that is not XML is left to exiv2 and the checks after it.
    """
    own = {prefix: ns for ns, prefix in _OWN_NAMESPACES}

    def parsed(data: bytes) -> tuple[list[Any], list[tuple[str, str]]]:
        events = list(ET.iterparse(io.BytesIO(data), events=("start-ns", "end")))
        return events, [b for event, b in events if event == "start-ns"]

    try:
        events, bindings = parsed(packet)
    except ET.ParseError:
        return packet
    renamed = one_prefix_per_namespace(packet, bindings)
    if renamed is not packet:
        packet = renamed
        events, bindings = parsed(packet)

    def refuse(why: str) -> DataError:
        return DataError(f"{what} {why}; left as it is", source=uri)

    for prefix, ns in bindings:
        if prefix in own and ns != own[prefix]:
            raise refuse(
                f"binds the prefix {prefix!r} to {xml_text(ns)!r}, not to {own[prefix]!r}: "
                "exiv2 would read and write that namespace's properties as its own (a foreign "
                "Rating as the rating)"
            )
        if writing and prefix and prefix not in _FIXED_PREFIXES and not ns.endswith(("/", "#")):
            raise refuse(
                f"has the namespace {xml_text(ns)!r} (prefix {prefix!r}), which exiv2 would "
                "write back as another, with a '/' appended (XMP namespace URIs end in '/' or '#')"
            )
    if writing:
        for event, elem in events:
            if event != "end":
                continue
            for value in (elem.text or "", *elem.attrib.values()):
                if value.startswith("type="):
                    raise refuse(
                        f"holds the value {xml_text(value[:40])!r}, which exiv2 reads as a type "
                        "declaration and would write back as an empty array"
                    )
    for prefix, ns in bindings:
        if prefix and prefix not in _FIXED_PREFIXES and ns not in own.values():
            pyexiv2.registerNs(ns, prefix)
    return packet


def _parse(
    pyexiv2: ModuleType,
    data: bytes,
    uri: str,
    what: str = "an XMP sidecar",
    mime: str = _XMP_MIME,
    *,
    writing: bool = False,
) -> tuple[Any, dict[str, XmpValue]]:
    """exiv2's image of ``data`` (a file of type ``mime``) and its XMP fields; the caller holds
    the exiv2 lock. The prefixes of ``_OWN_NAMESPACES`` are bound to their namespaces again
    after every parse; a packet that binds them to other namespaces is refused
    (``_check_packet``), and the packet's other prefixes are bound as it binds them; ``writing``:
    the packet is to be merged and written back."""
    if mime == _XMP_MIME:
        data = _check_packet(pyexiv2, data, uri, what, writing=writing)
    try:
        img = pyexiv2.ImageData(data)
    except (RuntimeError, ValueError) as e:
        raise DataError(f"not {what} ({str(e).strip()}); left as it is", source=uri) from e
    finally:
        for namespace, prefix in _OWN_NAMESPACES:
            pyexiv2.registerNs(namespace, prefix)
    try:
        if img.get_mime_type() != mime:
            raise DataError(
                f"is a {img.get_mime_type()} file, not {what}; left as it is", source=uri
            )
        fields: dict[str, XmpValue] = img.read_xmp()
        # exiv2 only warns when a packet does not parse and then reads it as empty; writing
        # that back would wipe a sidecar some other tool half-wrote or we cannot read. (An
        # image file is not XML: one without XMP reads as empty, rightly.)
        if not fields and mime == _XMP_MIME and data.strip() and _has_properties(data):
            raise DataError("XMP that exiv2 cannot parse; left as it is", source=uri)
    except BaseException:
        img.close()
        raise
    return img, fields


def write_sidecar(
    sidecar_uri: str,
    *,
    rating: int,
    label: str | None,
    keeper_fields: Mapping[str, str] | None = None,
    durable: bool = True,
    overwrite_ratings: bool = False,
) -> SidecarWrite:
    """Write or merge one XMP sidecar: rating, colour label and keeper's own fields.

    A sidecar already there keeps every other field (keywords, titles, other namespaces, a
    darktable history, camera EXIF). keeper owns its own namespace: keeper fields not in
    ``keeper_fields`` are removed, so it says what this run decided whatever an earlier run
    wrote. ``xmp:Rating`` and ``xmp:Label`` (``label=None``: no label) are keeper's only where
    it set them: ``keeper:xmp`` records the rating and label keeper last set them to, and a
    sidecar holding other values holds a person's (stars or a colour given in Lightroom after,
    or before, keeper ran; a removed one too), which stay unless ``overwrite_ratings``. A sidecar
    without that record takes keeper's values where it has none of its own; one an older keeper
    wrote (its fields, no record) counts as keeper's. Where a person's value stays, the record
    keeps what keeper set there before (an empty part: nothing), not this run's choice: else a
    run whose choice happened to equal the person's value would make it keeper's, and the next
    run would replace it. A person who puts keeper's value back hands the field back.
    Writing the same values again leaves the file as it is (same bytes, same mtime). A local
    sidecar that is a symlink is written through to its target; a rewritten one keeps its
    permissions (and, run as root, its owner); a read-only one is refused.

    Args:
        sidecar_uri: a local path or ``s3://`` URI ending in ``.xmp``.
        rating: -1 (rejected) to 5, as ``xmp:Rating``.
        label: the colour label (``xmp:Label``, e.g. ``"Green"``), or None for none.
        keeper_fields: ``keeper:<name>`` values, e.g. ``{"group": "g000003", "rank": "1"}``.
        durable: fsync before the rename (``storage.write_bytes``). Keep it for sidecars beside
            originals (they may hold a user's edits); a mirror keeper rebuilds can skip it.
        overwrite_ratings: set ``xmp:Rating`` and ``xmp:Label`` whoever set them before.

    Returns:
        Whether the sidecar was written (False: it already held exactly this content), and
        which of a person's values (rating, label) it kept.

    Raises:
        ConfigError: a rating outside -1..5, a bad label, field name or value, or a URI that
            does not end in ``.xmp``.
        DataError: a file is at ``sidecar_uri`` that is not XMP exiv2 can parse, is read-only,
            is not a regular file or is a dangling symlink (it is left untouched).
        StorageError: reading or writing the sidecar failed.
    """
    if not sidecar_uri.lower().endswith(".xmp"):
        raise ConfigError(f"sidecar_uri must end in .xmp: {sidecar_uri!r}")
    choice = KeeperXmp(rating, label, keeper_fields or {})
    target, st = _local_target(sidecar_uri)
    # One request on S3 where exists-then-read was two: a mirror of a million photos is that
    # many requests fewer.
    old = storage.read_if_exists(target) or b""
    merge = merge_packet(old, choice, source=sidecar_uri, overwrite_ratings=overwrite_ratings)
    if merge.packet == old:
        return SidecarWrite(False, merge.kept)
    storage.write_bytes(target, merge.packet, durable=durable)
    if st is not None:
        restore_owner_and_mode(target, st)
    return SidecarWrite(True, merge.kept)


@dataclass(frozen=True)
class KeeperXmp:
    """What keeper writes into one photo's XMP, checked at construction.

    Attributes:
        rating: -1 (rejected) to 5, as ``xmp:Rating``.
        label: the colour label (``xmp:Label``, e.g. ``"Green"``), or None for none.
        fields: ``keeper:<name>`` values, e.g. ``{"group": "g000003", "rank": "1"}``.

    Raises:
        ConfigError: a rating outside -1..5, a bad label, field name or value.
    """

    rating: int
    label: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rating = self.rating
        # Integral, so a numpy integer from a picks frame is fine; bool is Integral but no rating.
        if isinstance(rating, bool) or not isinstance(rating, Integral) or not -1 <= rating <= 5:
            raise ConfigError(f"rating must be an int in -1..5, got {rating!r}")
        if self.label is not None and not _check_text("label", self.label):
            raise ConfigError("label must be a non-empty string or None, got ''")
        for name, value in self.fields.items():
            if not isinstance(name, str) or not _FIELD_NAME.match(name):
                raise ConfigError(
                    f"keeper field name {name!r} is not an XML name ([A-Za-z_][\\w-]*)"
                )
            _check_text(f"keeper field {name!r}", value)
        object.__setattr__(self, "rating", int(rating))
        object.__setattr__(self, "fields", dict(self.fields))


class PacketMerge(NamedTuple):
    """What :func:`merge_packet` made of one packet."""

    packet: bytes  # the packet to write: ``old`` itself when it already held exactly this
    #: ``"rating"`` / ``"label"``: a person's value the packet holds, left in place of keeper's
    kept: tuple[str, ...] = ()


def merge_packet(
    old: bytes,
    choice: KeeperXmp,
    *,
    source: str,
    overwrite_ratings: bool = False,
    what: str = "an XMP sidecar",
) -> PacketMerge:
    """keeper's rating, label and fields merged into one XMP packet, by :func:`write_sidecar`'s
    rules: the one merge of a sidecar's packet and of the packet inside a JPEG
    (:mod:`keeper_core.jpeg_xmp`).

    keeper's namespace is replaced by ``choice.fields``; ``xmp:Rating`` and ``xmp:Label`` change
    only where keeper owns them (:func:`keeper_owns`), or everywhere with ``overwrite_ratings``;
    ``keeper:xmp`` records what keeper set each of them to (:func:`write_sidecar`); every other
    field stays. The result is exiv2's layout of the packet; a packet that already holds every
    field the merge would set (in any tool's layout, keeper's reasons aside) is ``old`` itself,
    so merging the result again gives the same bytes, and exiv2's writer runs only where
    something changes. A new packet (``old`` empty) is written from exiv2's layout without
    exiv2 (:func:`fresh_packet`): the same bytes.

    Args:
        old: the packet now (empty: none yet).
        choice: what keeper writes.
        source: where the packet is, for errors.
        overwrite_ratings: set ``xmp:Rating`` and ``xmp:Label`` whoever set them before.
        what: what the packet is, as errors name it.

    Raises:
        DataError: ``old`` is not XMP exiv2 can parse, or exiv2 cannot update it.
    """
    if not old.strip():
        fresh = fresh_packet(choice)
        if fresh is not None:
            return PacketMerge(fresh)
    return _merge_with_exiv2(old, choice, source, overwrite_ratings, what)


def _merge_with_exiv2(
    old: bytes, choice: KeeperXmp, source: str, overwrite_ratings: bool, what: str
) -> PacketMerge:
    """:func:`merge_packet` by exiv2 (parse, modify, write)."""
    with _exiv2() as pyexiv2:
        packet = old if old.strip() else _EMPTY_PACKET
        fields = _fields(pyexiv2, packet, source, what)
        values = _xmp_values(fields, choice.rating, choice.label, overwrite_ratings)
        kept = tuple(
            name
            for name, key in (("rating", RATING_KEY), ("label", LABEL_KEY))
            if key not in values
        )
        if old.strip() and _same_but_reasons(
            _applied(fields, _changes(fields, values, choice)), fields
        ):
            # It holds what the merge would set already: a re-run, the same fields in another
            # tool's layout (Lightroom or exiv2 saving a person's stars, darktable's elements),
            # or keeper's reasons alone moved (adding photos to a library moves every group's
            # figures a little). Nothing is rewritten: a newer mtime makes a photo tool flag the
            # file as changed on disk, and exiv2's writer costs seconds on a darktable history of
            # hundreds of items.
            return PacketMerge(old, kept)
        new = _rewritten(pyexiv2, packet, source, lambda f: _changes(f, values, choice), what)
        # The same for what exiv2 reads back as the packet's own fields, but for how the merge
        # wrote a value (a representation exiv2 normalises): not rewritten either.
        if old.strip() and _same_but_reasons(_fields(pyexiv2, new, source, what), fields):
            new = old
    return PacketMerge(old if new == old else new, kept)


class PacketRemoval(NamedTuple):
    """What :func:`remove_from_packet` made of one packet."""

    #: the packet without keeper's fields (``old`` itself where it held none), or None where
    #: nothing is left in it, no field of anyone's: the sidecar, or the JPEG's XMP segment, can go
    packet: bytes | None
    changed: bool  # keeper's fields were there, and are not in ``packet``
    #: ``"rating"`` / ``"label"``: a person's value the packet holds, left as it is
    kept: tuple[str, ...] = ()


def remove_from_packet(old: bytes, *, source: str, what: str = "an XMP sidecar") -> PacketRemoval:
    """keeper's fields taken out of one XMP packet: what ``keeper unpick`` does to a sidecar and
    to the packet inside a JPEG, the reverse of :func:`merge_packet`.

    keeper's namespace goes whole (group, rank, decision, reasons, its record ``keeper:xmp``);
    ``xmp:Rating`` and ``xmp:Label`` go where keeper owns them (:func:`keeper_owns`: they still
    hold what keeper set), and a person's stay; every other field stays. keeper sets a rating or
    label only where the packet had none (or held keeper's own), so taking keeper's out gives
    back what the packet held before keeper ran, field for field, plus what tools added since.
    A packet without keeper's namespace is not keeper's to change: ``old`` itself, unchanged,
    whatever rating it holds. The result is exiv2's layout of the packet, written by the same
    exiv2 rewrite as a merge's (URI values kept as links).

    Raises:
        DataError: ``old`` is not XMP exiv2 can parse, or exiv2 cannot update it.
    """
    if not old.strip():
        return PacketRemoval(old, False)
    with _exiv2() as pyexiv2:
        fields = _fields(pyexiv2, old, source, what)
        changes = _removals(fields)
        if not changes:
            return PacketRemoval(old, False)
        kept = tuple(
            name
            for name, key in (("rating", RATING_KEY), ("label", LABEL_KEY))
            if key in fields and key not in changes
        )
        if not _applied(fields, changes):
            return PacketRemoval(None, True, kept)
        return PacketRemoval(_rewritten(pyexiv2, old, source, _removals, what), True, kept)


def _removals(fields: Mapping[str, XmpValue]) -> dict[str, str | None]:
    """What :func:`remove_from_packet` removes from a packet with ``fields`` (every value None):
    keeper's namespace, and the rating and label where keeper owns them; nothing from a packet
    keeper never wrote."""
    if not holds_keepers_fields(fields):
        return {}
    out: dict[str, str | None] = {k: None for k in fields if _OWN_KEY.match(k)}
    for key in (RATING_KEY, LABEL_KEY):
        if key in fields and keeper_owns(fields, key):
            out[key] = None
    return out


class XmpRemoval(NamedTuple):
    """What :func:`remove_from_sidecar` did to one sidecar (or ``jpeg_xmp.remove_jpeg_xmp`` to
    the XMP inside one JPEG); with ``dry_run``, what it would do."""

    #: ``cleaned``: keeper's fields removed, the rest written back; ``deleted``: nothing else
    #: was in it, so the sidecar is gone (a JPEG: its XMP segment); ``untouched``: it holds none
    #: of keeper's fields; ``absent``: there is no sidecar (no file, or a JPEG without XMP)
    outcome: Literal["cleaned", "deleted", "untouched", "absent"]
    #: ``"rating"`` / ``"label"``: a person's value left in place of keeper's
    kept: tuple[str, ...] = ()
    #: a JPEG rewritten: its new stamp, and the content digest of its pixels and other
    #: metadata (``embedded_xmp.content_digest``, the same before and after)
    stamp: storage.Stamp | None = None
    content_id: str | None = None


def remove_from_sidecar(
    sidecar_uri: str, *, durable: bool = True, dry_run: bool = False
) -> XmpRemoval:
    """Take keeper's fields out of one XMP sidecar (:func:`remove_from_packet`), deleting it
    where nothing else is left in it: the sidecar keeper made for a photo that had none is gone,
    one it merged into holds what it held before, plus what tools added since.

    A sidecar that is a symlink is written through to its target, and emptied rather than
    deleted (removing the link or its target would leave the other half behind); a rewritten
    one keeps its permissions; a read-only one is refused, as by :func:`write_sidecar`. A
    sidecar changed between keeper's read and its delete is left as it is (refused).

    Args:
        sidecar_uri: a local path or ``s3://`` URI ending in ``.xmp``.
        durable: fsync a rewritten sidecar before the rename (:func:`write_sidecar`).
        dry_run: change nothing; the outcome says what would happen.

    Raises:
        ConfigError: the URI does not end in ``.xmp``.
        DataError: the sidecar is not XMP exiv2 can parse, is read-only, is not a regular
            file, or changed while it was read (it is left untouched).
        StorageError: reading, writing or deleting it failed.
    """
    if not sidecar_uri.lower().endswith(".xmp"):
        raise ConfigError(f"sidecar_uri must end in .xmp: {sidecar_uri!r}")
    old = storage.read_if_exists(sidecar_uri)
    if old is None:
        return XmpRemoval("absent")
    removal = remove_from_packet(old, source=sidecar_uri)
    if not removal.changed:
        return XmpRemoval("untouched")
    target, st = _local_target(sidecar_uri)
    packet = removal.packet
    if packet is None and not storage.is_s3(sidecar_uri) and _local(sidecar_uri).is_symlink():
        packet = _EMPTY_PACKET
    outcome: Literal["cleaned", "deleted"] = "deleted" if packet is None else "cleaned"
    if dry_run:
        return XmpRemoval(outcome, removal.kept)
    if packet is None:
        if storage.read_if_exists(target) != old:
            raise DataError("changed while keeper read it; left as it is", source=sidecar_uri)
        storage.delete(target)
    else:
        storage.write_bytes(target, packet, durable=durable)
        if st is not None:
            restore_owner_and_mode(target, st)
    return XmpRemoval(outcome, removal.kept)


# exiv2's layout of a packet holding keeper's fields alone (:func:`fresh_packet`), and the
# characters it writes as references inside an attribute value.
_FRESH_HEAD = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">\n'
    ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    '  <rdf:Description rdf:about=""\n'
    f'    xmlns:{KEEPER_PREFIX}="{KEEPER_NS}"\n'
    '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
)
_FRESH_TAIL = '/>\n </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end="w"?>'
_ATTRIBUTE_REFS = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&quot;",
    "\t": "&#x9;",
    "\n": "&#xA;",
    "\r": "&#xD;",
}
_NEEDS_REF = re.compile('[&<>"\t\n\r]')
# The choices fresh_packet's layout is checked on against exiv2's, once a process: every
# character it writes as a reference, text beyond ASCII and the BMP, a label and none.
_FRESH_PROBES = (
    KeeperXmp(5, "Green", {"group": "g000001", "reasons": "a & b < c > d \"e\" 'f'\t\n\r é 日 😀"}),
    KeeperXmp(-1, None, {}),
)


def fresh_packet(choice: KeeperXmp) -> bytes | None:
    """The packet :func:`merge_packet` makes of ``choice`` and no packet, as exiv2 writes it,
    built without exiv2; None where it cannot be (the caller then asks exiv2).

    A new sidecar is most of what ``keeper pick`` writes, and exiv2's parse-modify-write of one
    costs more than the rest of writing it. Nothing is merged into a new packet, so its layout
    is fixed: keeper's fields in ``choice`` order, its record, ``xmp:Rating``, ``xmp:Label``, as
    attributes of one description. The first call checks that layout against exiv2's own
    output for :data:`_FRESH_PROBES` (an exiv2 that writes otherwise turns this off for the
    process). Not built here: a field named ``xmp`` (it is keeper's record's name) and DEL
    (exiv2 writes a space for it).
    """
    if RECORD_KEY.rsplit(".", 1)[1] in choice.fields or not _fresh_layout_holds():
        return None
    return _fresh_layout(choice)


def _fresh_layout(choice: KeeperXmp) -> bytes | None:
    label = choice.label
    attributes = [(f"{KEEPER_PREFIX}:{k}", v) for k, v in choice.fields.items()]
    attributes.append((f"{KEEPER_PREFIX}:xmp", f"{choice.rating}|{label or ''}"))
    attributes.append(("xmp:Rating", str(choice.rating)))
    if label is not None:
        attributes.append(("xmp:Label", label))
    if any("\x7f" in value for _, value in attributes):
        return None
    lines = "\n".join(
        f'   {name}="{_NEEDS_REF.sub(lambda m: _ATTRIBUTE_REFS[m.group()], value)}"'
        for name, value in attributes
    )
    return (_FRESH_HEAD + lines + _FRESH_TAIL).encode("utf-8")


@functools.cache
def _fresh_layout_holds() -> bool:
    """Whether :func:`_fresh_layout` writes exiv2's bytes for every probe (once a process)."""
    for probe in _FRESH_PROBES:
        ours = _fresh_layout(probe)
        exiv2s = _merge_with_exiv2(b"", probe, "(a probe)", False, "an XMP packet").packet
        if ours != exiv2s:
            log.info(
                "this exiv2 (pyexiv2 %s) lays new XMP packets out otherwise: each is written "
                "by exiv2",
                getattr(sys.modules.get("pyexiv2"), "__version__", "?"),
            )
            return False
    return True


def _same_but_reasons(a: Mapping[str, XmpValue], b: Mapping[str, XmpValue]) -> bool:
    """Whether two packets' fields are the same but for the figures in keeper's reasons."""
    return {k: v for k, v in a.items() if k != REASONS_KEY} == {
        k: v for k, v in b.items() if k != REASONS_KEY
    } and ((REASONS_KEY in a) == (REASONS_KEY in b))


def _changes(
    fields: Mapping[str, XmpValue], values: Mapping[str, str | None], choice: KeeperXmp
) -> dict[str, str | None]:
    """What a merge sets in a packet with ``fields`` (None: removes): keeper's namespace
    replaced by ``choice.fields``, and ``values`` (:func:`_xmp_values`)."""
    changes: dict[str, str | None] = {k: None for k in fields if _OWN_KEY.match(k)}
    changes.update({f"Xmp.{KEEPER_PREFIX}.{k}": v for k, v in choice.fields.items()})
    changes.update(values)
    return changes


def _applied(
    fields: Mapping[str, XmpValue], changes: Mapping[str, str | None]
) -> dict[str, XmpValue]:
    out = dict(fields)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _xmp_values(
    fields: Mapping[str, XmpValue], rating: int, label: str | None, overwrite: bool
) -> dict[str, str | None]:
    """keeper's changes to ``xmp:Rating`` / ``xmp:Label`` and its record (None removes a field):
    each field keeper owns (:func:`keeper_owns`), or every one when ``overwrite``. A field left
    out of the result is a person's, and stays."""
    prior = _record(fields)
    out: dict[str, str | None] = {RECORD_KEY: None}
    record: list[str] = []
    for i, (key, value) in enumerate(((RATING_KEY, str(int(rating))), (LABEL_KEY, label))):
        if overwrite or keeper_owns(fields, key):
            out[key] = value
            record.append(value or "")
        else:
            # A person's value stays, and the record keeps what keeper last set the field to
            # (nothing, if it never did): recording this run's choice instead would make the
            # person's value keeper's the day the two agree, and the next run would replace it.
            record.append(prior[i] if prior is not None else "")
    out[RECORD_KEY] = "|".join(record)
    return out


def _record(fields: Mapping[str, XmpValue]) -> tuple[str, str] | None:
    """The rating and label keeper last set (``keeper:xmp``, ``"RATING|LABEL"``; an empty part:
    keeper set none there), or None where there is no readable record."""
    record = fields.get(RECORD_KEY)
    if isinstance(record, str) and "|" in record:
        rating, _, label = record.partition("|")
        return rating, label
    return None


def keeper_owns(fields: Mapping[str, XmpValue], key: str) -> bool:
    """Whether a sidecar's ``xmp:Rating`` or ``xmp:Label`` (``key``) holds keeper's value, not a
    person's.

    With keeper's record (``keeper:xmp``): the field still holds the value recorded there
    (absent = no label); an unreadable record owns only an absent field. Without one: the field
    is absent, or keeper's namespace is there (an older keeper wrote the sidecar before it kept
    a record). Anything else a person set, in a photo tool, before keeper ran or since.
    """
    now = fields.get(key)
    record = _record(fields)
    if record is not None:
        rating, label = record
        text = now if isinstance(now, str) else ""
        if key == RATING_KEY:
            return _same_number(text, rating)  # a tool that rewrote "3" as "3.0" changed nothing
        return text == label
    if fields.get(RECORD_KEY) is not None:
        return now is None
    return now is None or holds_keepers_fields(fields)


def holds_keepers_fields(fields: Mapping[str, XmpValue]) -> bool:
    """Whether a packet's fields (:func:`read_sidecar`) hold keeper's namespace: keeper wrote it."""
    return any(_OWN_KEY.match(k) for k in fields)


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def _local_target(sidecar_uri: str) -> tuple[str, os.stat_result | None]:
    """The file to write for ``sidecar_uri`` and the stat of a local sidecar already there.

    A symlinked sidecar is written through to its target (replacing the link by a file would
    leave the linked copy stale); a read-only one or a dangling link is refused.
    """
    if storage.is_s3(sidecar_uri):
        return sidecar_uri, None
    path = _local(sidecar_uri)
    try:
        if path.is_symlink():
            if not path.exists():
                raise DataError("a dangling symlink; left as it is", source=sidecar_uri)
            path = Path(os.path.realpath(path))
        if not path.exists():
            return sidecar_uri, None
        st = path.stat()
    except OSError as e:
        raise StorageError(sidecar_uri, f"cannot inspect the sidecar: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise DataError("not a regular file; left as it is", source=sidecar_uri)
    if not st.st_mode & stat.S_IWUSR:
        raise DataError("read-only (its owner cannot write it); left as it is", source=sidecar_uri)
    return str(path), st


def restore_owner_and_mode(path: str, st: os.stat_result) -> None:
    """Give a rewritten file (a sidecar; a JPEG's new copy) the permissions (and, where
    allowed, the owner) ``st`` records.

    Raises:
        StorageError: the permissions cannot be set.
    """
    with contextlib.suppress(OSError):
        os.chown(path, st.st_uid, st.st_gid)  # only root may: elsewhere the writer owns it
    try:
        os.chmod(path, stat.S_IMODE(st.st_mode))
    except OSError as e:
        raise StorageError(path, f"written, but its permissions not restored: {e}") from e


def _rewritten(
    pyexiv2: Any,
    data: bytes,
    source: str,
    changes_of: Callable[[Mapping[str, XmpValue]], Mapping[str, str | None]],
    what: str,
) -> bytes:
    """``data`` (an XMP packet) written again by exiv2 with ``changes_of(its fields)`` made
    (None removes a field: :func:`_changes`, :func:`_removals`); the caller holds the exiv2
    lock."""
    img, fields = _parse(pyexiv2, data, source, what, writing=True)
    try:
        changes = changes_of(fields)
        # On write exiv2 re-derives Xmp.exif.* / Xmp.iptc* from the EXIF and IPTC it read out
        # of the XMP, which rewrites GPS coordinates and drops all but one language of
        # exif:UserComment. A sidecar has no EXIF or IPTC of its own: dropping them makes the
        # write a pure XMP edit.
        img.clear_exif()
        img.clear_iptc()
        img.modify_xmp(changes)
        out: bytes = img.get_bytes()
    except RuntimeError as e:
        raise DataError(f"exiv2 could not update {what}: {str(e).strip()}", source=source) from e
    finally:
        img.close()
    # exiv2 writes a URI value (rdf:resource: a licence link) back as a plain string
    restored = restore_resources(data, out)
    if restored is not out:
        try:
            same = _fields(pyexiv2, restored, source, what) == _fields(pyexiv2, out, source, what)
        except DataError:
            same = False
        if same:
            return restored
        log.warning("%s: URI values left as exiv2 wrote them (as strings)", source)
    return out


def _fields(pyexiv2: Any, data: bytes, source: str, what: str) -> dict[str, XmpValue]:
    """The fields of a packet to merge (:func:`_parse`); the caller holds the exiv2 lock."""
    img, fields = _parse(pyexiv2, data, source, what, writing=True)
    img.close()
    return fields


def read_sidecar(sidecar_uri: str) -> dict[str, XmpValue]:
    """Every XMP field of a sidecar, as pyexiv2 reads it (``{"Xmp.xmp.Rating": "5", ...}``).

    Arrays (``Xmp.dc.subject``) come as lists, language alternatives as dicts; structs as
    their flattened paths (``Xmp.darktable.history[1]/darktable:operation``).

    Raises:
        StorageError: the sidecar cannot be read.
        DataError: it is not XMP that exiv2 can parse.
    """
    return parse_xmp_packet(storage.read_bytes(sidecar_uri), sidecar_uri)


def parse_xmp_packet(
    data: bytes, source: str, *, what: str = "an XMP sidecar"
) -> dict[str, XmpValue]:
    """Every XMP field of one XMP packet (a sidecar's bytes, or a packet embedded in an image
    file), as :func:`read_sidecar` gives them.

    Args:
        data: the packet, starting with ``<?xpacket``, ``<?xml`` or ``<x:xmpmeta``.
        source: where it came from, for the error.
        what: what the packet is, as the error names it ("not an XMP sidecar").

    Raises:
        DataError: it is not XMP that exiv2 can parse.
    """
    with _exiv2() as pyexiv2:
        img, fields = _parse(pyexiv2, data, source, what)
        img.close()
    return fields


def parse_image_xmp(data: bytes, source: str, *, mime: str) -> dict[str, XmpValue]:
    """Every XMP field exiv2 finds in a whole image file's bytes: a reader of its own, beside
    :mod:`keeper_core.embedded_xmp`'s walk, for checking a file keeper wrote
    (:mod:`keeper_core.jpeg_xmp`).

    Args:
        data: the file's bytes.
        source: where they came from, for the error.
        mime: the type exiv2 must find them to be, e.g. ``image/jpeg``.

    Raises:
        DataError: exiv2 cannot read them, or finds another type of file.
    """
    # Muted: at the "error" level exiv2's complaint about a damaged maker note (another
    # segment's business) raises and loses the XMP too; a packet it cannot parse reads as
    # none, which a caller comparing fields sees.
    with _exiv2("mute") as pyexiv2:
        img, fields = _parse(pyexiv2, data, source, f"a {mime} file exiv2 can read", mime)
        img.close()
    return fields


# ---------------------------------------------------------------------------------------------
# Keeper export


class _Refused(Exception):
    """An image that cannot be exported; the message is the reason."""


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _copy_local(src: Path, dst: Path) -> str:
    """Copies ``src`` to ``dst`` (replacing what is there); the sha256 of what was written."""
    # A temporary name in the target folder, renamed into place: a killed run leaves no
    # half-copied image under the keeper's name (the ".tmp" suffix keeps it out of listings).
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        # Hashed as it is copied: what is at dst (src may change meanwhile), in one pass.
        digest = hashlib.sha256()
        with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
            while chunk := f.read(_COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        # The original's mode and mtime (tools sort by it) only now: a read-only original's
        # mode would make the copy unopenable for the fsync.
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


_COPY_CHUNK = 1 << 20


class _Exported(NamedTuple):
    """One image's export: ``exported``, ``already`` (the same file there) or ``updated``
    (keeper's own earlier copy replaced), the sha256 of the copy now there (None: a link), and
    its ETag where it is on S3 (what the record keeps to tell it later without a download)."""

    outcome: Literal["exported", "already", "updated"]
    digest: str | None
    etag: str | None = None


def _different(dst: str, recorded: str | None) -> _Refused:
    if recorded is None:
        return _Refused(f"a different file is already at {dst}; not overwritten")
    return _Refused(
        f"a different file is already at {dst}, changed since keeper copied it there; "
        "not overwritten"
    )


def _export_local(src: Path, dst: Path, mode: str, recorded: str | None) -> _Exported:
    """Export one local file. ``recorded``: the sha256 of the copy an earlier run left at
    ``dst`` (``copy`` only), which may be replaced while it is still that copy."""
    if not src.is_file():
        raise _Refused(f"original missing or not a file: {src}")
    if dst.is_symlink() or dst.exists():
        if not dst.exists():
            raise _Refused(f"a broken symlink is already at {dst}; not replaced")
        if not dst.is_file():
            raise _different(str(dst), None)
        if os.path.samefile(src, dst):
            return _Exported("already", None)
        same_size = dst.stat().st_size == src.stat().st_size
        # Hashed only where it can tell: a file of another size is no copy of src, and only
        # keeper's own copy (a record) may be replaced.
        there = _sha256(dst) if same_size or (mode == "copy" and recorded) else None
        if same_size and there == _sha256(src):
            return _Exported("already", there if mode == "copy" else None)
        if mode != "copy" or there is None or there != recorded:
            raise _different(str(dst), recorded)
        return _Exported("updated", _copy_local(src, dst))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        return _Exported("exported", _copy_local(src, dst))
    if mode == "symlink":
        os.symlink(os.path.abspath(src), dst)  # absolute: valid wherever dest is read from
    else:
        try:
            os.link(src, dst)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise _Refused(
                    f"cannot hard-link {src} into {dst.parent}: another filesystem "
                    "(use copy or symlink)"
                ) from e
            raise _Refused(f"cannot hard-link {src} to {dst}: {e.strerror or e}") from e
    return _Exported("exported", None)


#: Exports through S3 at once (``export_keepers`` on threads): each holds one image in memory, two
#: where a copy is already there, so a 60 MB RAW takes at most ~1 GB across them.
_S3_EXPORTS_AT_ONCE = 8


def _export_s3(src: str, dst: str, recorded: str | None) -> _Exported:
    """Copy one image where the original or the destination is on S3 (whole-object puts).

    A copy already there is told without downloading it where an ETag can say so: both on S3
    with one ETag (and keeper's record of the copy: no download at all), or one side read (the
    local one, else the original) whose MD5 is the other's plain ETag (a single-part,
    unencrypted object's; a multipart or SSE-KMS ETag is no MD5, and both are then read)."""
    there = storage.object_info_if_exists(dst)
    if there is None:
        data = storage.read_bytes(src)
        etag = storage.write_bytes(dst, data)
        return _Exported("exported", hashlib.sha256(data).hexdigest(), etag)
    mine = storage.object_info(src)
    kept_etag = there.etag if storage.is_s3(dst) else None
    read: dict[str, bytes] = {}

    def content(uri: str) -> bytes:
        if uri not in read:
            read[uri] = storage.read_bytes(uri)
        return read[uri]

    if there.size == mine.size:
        if storage.is_s3(src) and storage.is_s3(dst) and there.etag == mine.etag and recorded:
            return _Exported("already", recorded, kept_etag)
        near, far = (dst, mine) if not storage.is_s3(dst) else (src, there)
        if _md5_is(far.etag, content(near)):
            return _Exported("already", hashlib.sha256(content(near)).hexdigest(), kept_etag)
    elif recorded is None:  # another size and no record of keeper's copy: refused unread
        raise _different(dst, None)
    data, old = content(src), content(dst)
    if old == data:
        return _Exported("already", hashlib.sha256(old).hexdigest(), kept_etag)
    if hashlib.sha256(old).hexdigest() != recorded:
        raise _different(dst, recorded)
    etag = storage.write_bytes(dst, data)
    return _Exported("updated", hashlib.sha256(data).hexdigest(), etag)


def _md5_is(etag: str, data: bytes) -> bool:
    """Whether ``etag`` is a plain MD5 (32 hex digits) and that of ``data``."""
    plain = re.fullmatch(r"[0-9a-f]{32}", etag) is not None
    return plain and hashlib.md5(data, usedforsecurity=False).hexdigest() == etag


#: In a ``copy`` export's folder: each copy keeper put there, by its path under the folder, with
#: the sha256 of what it wrote. A re-run tells its own copy, still as it left it, from a file a
#: person changed or put there: the first is replaced when the original changed since (a JPEG's
#: XMP rewritten by ``keeper pick --xmp embed`` as groups renumber, or by Lightroom), the
#: second never overwritten. Links need none: they are the original. On S3 it also keeps each
#: copy's ETag (``etags``), so a copy still as keeper wrote it is told by a HEAD, not a download
#: (an ETag changes whenever the object is written again; where it differs, as SSE-KMS ETags of
#: the same bytes do, the copy is read and hashed). Records without ``etags`` (keeper before
#: 2026-12-07, or a local folder) are read and hashed, as before.
EXPORT_RECORD = ".keeper-export.json"


@dataclass
class _Record:
    """An export folder's record: each copy's sha256 and, on S3, its ETag, by relative path."""

    files: dict[str, str] = field(default_factory=dict)
    etags: dict[str, str] = field(default_factory=dict)

    def document(self) -> bytes:
        doc: dict[str, Any] = {"version": 1, "files": dict(sorted(self.files.items()))}
        etags = {rel: e for rel, e in sorted(self.etags.items()) if rel in self.files}
        if etags:
            doc["etags"] = etags
        return json.dumps(doc).encode()


def _read_export_record(dest: str) -> tuple[_Record, str | None]:
    """The record in ``dest`` (empty when there is none), and a problem reading it: a record
    that cannot be read lets nothing be replaced (it is then written anew). ETags that are not
    a map of strings are dropped (the copies are then hashed), which is no problem."""
    uri = storage.join(dest, EXPORT_RECORD)
    try:
        if not storage.exists(uri):
            return _Record(), None
        doc = json.loads(storage.read_bytes(uri, max_bytes=_EXPORT_RECORD_MAX))
        files = doc["files"] if isinstance(doc, dict) and doc.get("version") == 1 else None
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v)
            for k, v in files.items()
        ):
            return _Record(), (
                f"{uri} is not keeper's export record; no earlier copy will be replaced"
            )
        etags = doc.get("etags")
        if not isinstance(etags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k in files for k, v in etags.items()
        ):
            etags = {}
        return _Record(dict(files), dict(etags)), None
    except (StorageError, ValueError) as e:
        return _Record(), f"{uri} cannot be read ({e}); no earlier copy will be replaced"


_EXPORT_RECORD_MAX = 1 << 30  # ~100 bytes a copy: ten million keepers
_HEX64 = re.compile(r"[0-9a-f]{64}")


def export_keepers(
    image_uris: Sequence[str],
    *,
    input_root: str,
    dest: str,
    mode: Literal["copy", "hardlink", "symlink"],
    io_threads: int = 1,
) -> ExportResult:
    """Copy or link images under ``dest`` at their paths relative to ``input_root``.

    Originals are only ever read. A file already at the target with the same bytes (or the
    same file, a link made by an earlier run) counts as ``already_there``, so re-runs are
    idempotent. A different file there is never overwritten (a failure naming it), but for
    keeper's own copy from an earlier run, still byte for byte what it wrote there
    (:data:`EXPORT_RECORD`), of an original that changed since: that copy is replaced
    (``updated``). Nothing is removed: keeper's copies of images not among ``image_uris`` (no
    longer kept) stay, listed in ``not_kept``. Copies go to a temporary file renamed into
    place, with the original's mtime. A hard link shares the original's inode: editing the
    exported file in place edits the original too.

    Args:
        image_uris: the keepers (local paths or ``s3://`` URIs).
        input_root: the folder or prefix the images are under.
        dest: the folder or ``s3://`` prefix to export into.
        mode: ``copy``, ``hardlink`` (same filesystem only: no silent copy instead) or
            ``symlink`` (absolute targets). Links are local only.
        io_threads: images exported at once where an original or ``dest`` is on S3 or a network
            file system (``storage.io_threads_for``; on local disks one at a time), each a few
            requests of tens of ms there; the outcome is the same as one at a time (two images
            whose targets differ only in case are exported one at a time).

    Returns:
        Counts, and a reason for each image that failed (a missing original, a different file
        in the way, a hard link across filesystems, an S3 error).

    Raises:
        ConfigError: an unknown mode, a link mode with S3 on either side, or an image outside
            ``input_root`` (checked before anything is exported).
    """
    if mode not in ("copy", "hardlink", "symlink"):
        raise ConfigError(f"mode must be 'copy', 'hardlink' or 'symlink', got {mode!r}")
    on_s3 = storage.is_s3(dest) or any(storage.is_s3(u) for u in image_uris)
    if mode != "copy" and on_s3:
        raise ConfigError(f"mode={mode!r} links files on a local disk; S3 supports copy only")
    rels = _relatives(image_uris, input_root)
    record, problem = _read_export_record(dest) if mode == "copy" else (_Record(), None)
    copies = _Record(dict(record.files), dict(record.etags))
    outcomes = {"exported": 0, "already": 0, "updated": 0}
    failed: list[ExportFailure] = []
    s3_at_once = threading.BoundedSemaphore(_S3_EXPORTS_AT_ONCE)

    def export(item: tuple[str, str]) -> _Exported | ExportFailure:
        uri, rel = item
        target = storage.join(dest, rel)
        try:
            if storage.is_s3(uri) or storage.is_s3(target):
                with s3_at_once:
                    return _export_s3(uri, target, record.files.get(rel))
            return _export_local(_local(uri), _local(target), mode, record.files.get(rel))
        except (_Refused, StorageError) as e:
            return ExportFailure(uri, str(e))
        except OSError as e:
            return ExportFailure(uri, f"{type(e).__name__}: {e}")

    threads = storage.io_threads_for([*image_uris, storage.join(dest, "x")], io_threads)
    if threads > 1 and len({name_key(r) for r in rels}) < len(rels):
        threads = 1  # two targets one file on a case-insensitive disk: in order, as one at a time
    progress = Progress("keepers exported", len(rels), log)
    items = list(zip(image_uris, rels, strict=True))
    for (_, rel), done in zip(items, storage.map_in_threads(export, items, threads), strict=True):
        progress.step()
        if isinstance(done, ExportFailure):
            failed.append(done)
            continue
        if done.digest is not None:
            copies.files[rel] = done.digest
            if done.etag is not None:
                copies.etags[rel] = done.etag
            else:
                copies.etags.pop(rel, None)
        outcomes[done.outcome] += 1
    progress.done()
    exported_now = set(rels)
    not_kept = [
        storage.join(dest, rel)
        for rel in sorted(record.files)
        if rel not in exported_now
        and _still_keepers_copy(storage.join(dest, rel), record.files[rel], record.etags.get(rel))
    ]
    if mode == "copy" and (copies != record or problem):
        try:
            storage.write_bytes(storage.join(dest, EXPORT_RECORD), copies.document())
        except StorageError as e:
            problem = (
                f"{storage.join(dest, EXPORT_RECORD)} not written ({e}): the next run will not "
                "replace these copies when their originals change"
            )
    return ExportResult(
        exported=outcomes["exported"],
        already_there=outcomes["already"],
        updated=outcomes["updated"],
        failed=failed,
        record_problem=problem,
        not_kept=not_kept,
    )


@dataclass(frozen=True)
class KeepersRemoval:
    """What :func:`remove_keepers_export` did (or, with ``dry_run``, would do)."""

    removed: int = 0  # keeper's copies and links, removed
    absent: int = 0  # recorded or kept, and not there
    #: (path, why) of files left in place: a copy changed since keeper made it, a file or link
    #: keeper did not make, one that could not be removed
    left: list[tuple[str, str]] = field(default_factory=list)
    folders_removed: int = 0  # folders the removals left empty, removed (``dest`` included)
    #: why the copies' record could not be read: then no copy is removed
    record_problem: str | None = None
    #: originals whose hard link in ``dest`` was removed (or, dry, would be)
    unlinked: list[str] = field(default_factory=list)


def remove_keepers_export(
    dest: str,
    keepers: Sequence[str],
    *,
    input_root: str,
    dry_run: bool = False,
    io_threads: int = 1,
) -> KeepersRemoval:
    """Take back what :func:`export_keepers` put in ``dest``: every copy its record names that
    is still byte for byte what keeper wrote (from any run), and every link to an original at
    its own path under ``input_root`` (a symlink to it, or a hard link that is its file: what
    any run's export made there, no record needed; removing a link loses no photo), then the
    folders that leaves empty. A copy changed since, and any file keeper did not make, stay
    (listed in ``left``); the record keeps the copies left (not those already gone) and goes
    when none are.

    Args:
        dest: the ``--copy-keepers`` / ``--link-keepers`` folder (local or ``s3://``).
        keepers: the originals of the run's keepers: a link of theirs not there counts as
            ``absent``, a file in its place that is not one as ``left``.
        input_root: the folder their paths under ``dest`` are relative to, as pick exported.
        dry_run: change nothing; the result says what would happen.
        io_threads: copies looked at and removed at once where ``dest`` is on S3 or a network
            file system (``storage.io_threads_for``): a HEAD and a DELETE each on S3.

    Raises:
        ConfigError: a keeper outside ``input_root``.
    """
    record, problem = _read_export_record(dest)
    targets: dict[str, tuple[str, str]] = {rel: ("copy", d) for rel, d in record.files.items()}
    if not storage.is_s3(dest) and not any(storage.is_s3(u) for u in keepers):  # links: local
        for uri, rel in zip(keepers, _relatives(keepers, input_root), strict=True):
            targets.setdefault(rel, ("link", uri))
        if not storage.is_s3(input_root):  # earlier runs' links: keepers then, not now
            for rel in _links_to_originals(_local(dest), _local(input_root)):
                targets.setdefault(rel, ("link", str(_local(input_root) / rel)))

    def take(item: tuple[str, tuple[str, str]]) -> tuple[str, str]:
        """One target's fate: ``removed`` or ``unlinked`` (a hard link removed), else as
        ``_keepers_file`` says (``absent``, ``left``), with why."""
        rel, (kind, value) = item
        path = storage.join(dest, rel)
        try:
            verdict, why = _keepers_file(path, kind, value, record.etags.get(rel))
        except (StorageError, OSError) as e:
            return "left", f"cannot be looked at: {e}"
        if verdict != "keepers":
            return verdict, why
        hard_link = kind == "link" and not _local(path).is_symlink()
        if not dry_run:
            try:
                storage.delete(path)
            except StorageError as e:
                return "left", f"cannot be removed: {e}"
        return ("unlinked" if hard_link else "removed"), ""

    removed, absent = 0, 0
    left: list[tuple[str, str]] = []
    gone: list[str] = []
    unlinked: list[str] = []
    missing: list[str] = []
    items = sorted(targets.items())
    threads = storage.io_threads_for([storage.join(dest, "x")], io_threads)
    for (rel, (_, value)), (fate, why) in zip(
        items, storage.map_in_threads(take, items, threads), strict=True
    ):
        if fate == "absent":
            absent += 1
            missing.append(rel)
        elif fate == "left":
            left.append((storage.join(dest, rel), why))
        else:
            removed += 1
            gone.append(rel)
            if fate == "unlinked":
                unlinked.append(value)
    folders = 0
    if not dry_run:
        out = {*gone, *missing}
        keep = _Record({rel: d for rel, d in record.files.items() if rel not in out}, record.etags)
        if record.files and keep.files != record.files:
            uri = storage.join(dest, EXPORT_RECORD)
            if keep.files:
                storage.write_bytes(uri, keep.document())
            else:
                storage.delete(uri)
        if not storage.is_s3(dest):
            folders = _remove_emptied_folders(_local(dest), gone)
    return KeepersRemoval(removed, absent, left, folders, problem, unlinked)


def _links_to_originals(dest: Path, root: Path) -> Iterator[str]:
    """The paths under ``dest`` (relative, POSIX) that are links to the file at the same path
    under ``root``: what :func:`export_keepers` links there, whichever run it was."""
    for folder, _, names in os.walk(dest):
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(dest).as_posix()
            if rel == EXPORT_RECORD:
                continue
            with contextlib.suppress(OSError):
                if _keepers_file(str(path), "link", str(root / rel))[0] == "keepers":
                    yield rel


def _keepers_file(
    path: str, kind: str, value: str, etag: str | None = None
) -> tuple[Literal["keepers", "absent", "left"], str]:
    """Whether ``path`` is keeper's copy (``kind="copy"``, ``value`` its sha256, ``etag`` its
    recorded ETag if any) or link (``kind="link"``, ``value`` the original) as it made it, is
    not there, or is left (why)."""
    if kind == "copy":
        state = _copy_state(path, value, etag)
        if state == "changed":
            return "left", "changed since keeper copied it (or not a file): left"
        return state, ""
    p, original = _local(path), _local(value)
    if not os.path.lexists(p):
        return "absent", ""
    if p.is_symlink():
        if os.path.realpath(p) == os.path.realpath(original):
            return "keepers", ""
        return "left", "a symlink to another file: not keeper's link, left"
    if p.is_file() and original.exists() and os.path.samefile(p, original):
        return "keepers", ""  # a hard link: the original keeps its own name
    return "left", "not a link to the original: keeper did not put it there, left"


def _remove_emptied_folders(dest: Path, removed: Sequence[str]) -> int:
    """Remove the folders under ``dest`` (and ``dest``) that removing ``removed`` left empty."""
    folders = {dest}
    for rel in removed:
        parent = (dest / rel).parent
        while parent != dest and dest in parent.parents:
            folders.add(parent)
            parent = parent.parent
    n = 0
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        try:
            folder.rmdir()
            n += 1
        except OSError:
            continue  # not empty: something else is there
    return n


def _copy_state(
    uri: str, digest: str, etag: str | None = None
) -> Literal["keepers", "absent", "changed"]:
    """Whether ``uri`` still holds the copy keeper recorded (``digest``, its sha256), is not
    there, or holds something else. On S3 with the ``etag`` keeper recorded, a HEAD: the same
    ETag is the same object; another one (SSE-KMS gives the same bytes another) or none recorded,
    the object is read whole and hashed, as a local file always is.

    Raises:
        StorageError, OSError: it cannot be looked at.
    """
    if storage.is_s3(uri):
        if etag is not None:
            info = storage.object_info_if_exists(uri)
            if info is None:
                return "absent"
            if info.etag == etag:
                return "keepers"
        data = storage.read_if_exists(uri)
        if data is None:
            return "absent"
        return "keepers" if hashlib.sha256(data).hexdigest() == digest else "changed"
    path = _local(uri)
    if not os.path.lexists(path):
        return "absent"
    if path.is_symlink() or not path.is_file():
        return "changed"
    return "keepers" if _sha256(path) == digest else "changed"


def _still_keepers_copy(uri: str, digest: str, etag: str | None) -> bool:
    """:func:`_copy_state` is ``keepers``; one that cannot be looked at is not."""
    try:
        return _copy_state(uri, digest, etag) == "keepers"
    except (StorageError, OSError):
        return False
