"""URI values in XMP (``rdf:resource``), kept through exiv2's rewrite of a packet.

XMP writes a value of type URI as an empty property element, ``<cc:license
rdf:resource="https://creativecommons.org/licenses/by/4.0/"/>``: RDF then reads it as a link to
a resource, not as a string. exiv2 reads the value and forgets that it was a URI, so a packet it
writes back holds ``cc:license="https://..."``, a plain string: merging keeper's rating into a
photo's XMP (a sidecar, or the packet inside a JPEG with ``--xmp embed``) quietly retyped the
licence links Creative Commons, Flickr and Wikimedia put there. :func:`restore_resources` puts
them back: every URI value of the packet before the rewrite that the rewrite holds as the same
string, at the same place, is written as ``rdf:resource`` again.

    after = restore_resources(before, exiv2_output)

A place is the value's path in XMP's data model (property, struct field, array item, by
namespace and index), so it does not depend on either packet's prefixes or layout. The text is
edited in place (exiv2's layout, one element per changed value), so a packet exiv2 wrote and this
restored is its own fixed point: exiv2 drops the URIs again, and they are restored the same way.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple
from xml.parsers import expat
from xml.sax.saxutils import quoteattr

__all__ = ["resource_values", "restore_resources"]

_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_XML = "http://www.w3.org/XML/1998/namespace"
_META = "adobe:ns:meta/"
_ARRAYS = frozenset({"Bag", "Seq", "Alt"})
# A start or end tag from '<' on, its quoted attribute values whole (they may hold '>').
_TAG = re.compile(rb"<(?:[^>\"']|\"[^\"]*\"|'[^']*')*>")
_INDENT = re.compile(rb"[ \t]*\Z")

#: One step of a value's path: a property or field (namespace, name), or an array item (1-based).
Step = tuple[str, str] | int
Path = tuple[Step, ...]


class _Element:
    """One element of a packet, with where its text is."""

    __slots__ = ("attrs", "children", "end", "path", "qname", "role", "start", "tag_end", "text")

    def __init__(self, qname: str, role: str, path: Path, start: int, tag_end: int) -> None:
        self.qname = qname  # as written, prefix:name
        self.role = role  # "container", "description", "array", "property"
        self.path = path
        self.start, self.tag_end, self.end = start, tag_end, tag_end
        self.children = 0
        self.text: list[str] = []
        # (namespace, name, prefix) of each attribute, and its value
        self.attrs: list[tuple[tuple[str, str, str], str]] = []


class _Leaf(NamedTuple):
    kind: Literal["resource", "attribute", "text"]
    value: str
    element: _Element  # the element holding it (an attribute's: the element it is written on)
    name: tuple[str, str, str] | None  # an attribute's (namespace, name, prefix)


class _Packet(NamedTuple):
    leaves: dict[Path, _Leaf]
    rdf_prefix: str


def _split(name: str) -> tuple[str, str, str]:
    parts = name.split(" ")
    if len(parts) == 1:
        return "", parts[0], ""
    return parts[0], parts[1], parts[2] if len(parts) > 2 else ""


def _qname(ns_name_prefix: tuple[str, str, str]) -> str:
    _, name, prefix = ns_name_prefix
    return f"{prefix}:{name}" if prefix else name


def _walk(data: bytes) -> _Packet | None:
    """Every simple value of an XMP packet by its path; None when it is not XML."""
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.namespace_prefixes = True
    parser.buffer_text = True
    stack: list[_Element] = []
    counters: list[int] = []
    leaves: dict[Path, _Leaf] = {}
    rdf_prefix = ["rdf"]

    def start(name: str, attrs: dict[str, str]) -> None:
        ns, local, prefix = _split(name)
        at = parser.CurrentByteIndex
        tag = _TAG.match(data, at)
        tag_end = tag.end() if tag else at
        parent = stack[-1] if stack else None
        base: Path = parent.path if parent else ()
        if parent is not None:
            parent.children += 1
        if ns == _RDF:
            rdf_prefix[0] = prefix or rdf_prefix[0]
        if (ns, local) in ((_META, "xmpmeta"), (_RDF, "RDF")) or parent is None:
            role, path = "container", base
        elif ns == _RDF and local == "Description":
            role, path = "description", base
        elif ns == _RDF and local in _ARRAYS:
            role, path = "array", base
        elif ns == _RDF and local == "li":
            counters[-1] += 1
            role, path = "property", (*base, counters[-1])
        else:
            role, path = "property", (*base, (ns, local))
        if parent is not None and parent.role == "container" and role == "property":
            role = "container"  # not in a description: not XMP's
        element = _Element(_qname((ns, local, prefix)), role, path, at, tag_end)
        for key, value in attrs.items():
            attr = _split(key)
            element.attrs.append((attr, value))
            if role == "property" and attr[:2] == (_RDF, "resource"):
                leaves[path] = _Leaf("resource", value, element, attr)
            elif role in ("description", "property") and attr[0] not in ("", _RDF, _XML):
                leaves[(*path, attr[:2])] = _Leaf("attribute", value, element, attr)
        stack.append(element)
        counters.append(0)

    def end(name: str) -> None:
        element = stack.pop()
        counters.pop()
        at = parser.CurrentByteIndex
        if data[element.tag_end - 2 : element.tag_end] == b"/>":
            element.end = element.tag_end
        else:
            close = _TAG.match(data, at)
            element.end = close.end() if close else at
        plain = all(a[0] in (_XML,) for a, _ in element.attrs)
        if element.role == "property" and not element.children and plain:
            leaves[element.path] = _Leaf("text", "".join(element.text), element, None)

    def text(chars: str) -> None:
        if stack:
            stack[-1].text.append(chars)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(data, True)
    except expat.ExpatError:
        return None
    return _Packet(leaves, rdf_prefix[0])


def resource_values(packet: bytes) -> dict[Path, str]:
    """The URI values (``rdf:resource``) of an XMP packet by their paths; none for a packet
    that is not XML."""
    if b"resource" not in packet:
        return {}
    walked = _walk(packet)
    if walked is None:
        return {}
    return {path: leaf.value for path, leaf in walked.leaves.items() if leaf.kind == "resource"}


def _indent(data: bytes, at: int) -> bytes:
    m = _INDENT.search(data, 0, at)
    return m.group() if m else b""


def _attr(name: str, value: str) -> bytes:
    return f" {name}={quoteattr(value)}".encode()


def restore_resources(before: bytes, after: bytes) -> bytes:
    """``after`` (exiv2's rewrite of ``before``) with each URI value of ``before`` written as
    ``rdf:resource`` again where ``after`` holds the same string at the same path.

    ``after`` itself (the same object) when there is nothing to restore: ``before`` has no URI
    values, either packet is not XML, or the value moved or changed. A value written as an
    attribute of an element that is not an ``rdf:Description`` (a struct in shorthand,
    ``<cc:license cc:permits="..."/>``) is moved into a nested ``rdf:Description``, the form a
    struct with element fields takes.
    """
    wanted = resource_values(before)
    if not wanted:
        return after
    walked = _walk(after)
    if walked is None:
        return after
    rdf = walked.rdf_prefix
    resource = f"{rdf}:resource"
    # edits by the element they rewrite: its text span and its new text
    moved: dict[int, tuple[_Element, list[_Leaf]]] = {}
    edits: list[tuple[int, int, bytes]] = []
    for path, uri in wanted.items():
        leaf = walked.leaves.get(path)
        if leaf is None or leaf.value != uri:
            continue
        element = leaf.element
        if leaf.kind == "text":
            tag = after[element.start : element.tag_end]
            tag = (tag[:-2] if tag.endswith(b"/>") else tag[:-1]).rstrip()
            edits.append((element.start, element.end, tag + _attr(resource, uri) + b"/>"))
        elif leaf.kind == "attribute":
            moved.setdefault(element.start, (element, []))[1].append(leaf)
    for element, leaves in moved.values():
        edit = _move_attributes(after, element, leaves, rdf, resource)
        if edit is not None:
            edits.append(edit)
    if not edits:
        return after
    out = after
    for start, end, text in sorted(edits, reverse=True):
        out = out[:start] + text + out[end:]
    return out


def _move_attributes(
    data: bytes, element: _Element, leaves: list[_Leaf], rdf: str, resource: str
) -> tuple[int, int, bytes] | None:
    """The edit that writes ``leaves`` (attributes of ``element``) as ``rdf:resource``
    children; None where the element's form cannot take them."""
    indent = _indent(data, element.start)
    self_closing = element.end == element.tag_end
    names = {leaf.name for leaf in leaves if leaf.name is not None}

    def children(step: bytes) -> bytes:
        return b"".join(
            b"\n"
            + indent
            + step
            + f"<{_qname(name)}".encode()
            + _attr(resource, leaf.value)
            + b"/>"
            for leaf in leaves
            if (name := leaf.name) is not None
        )

    def close(step: bytes, qname: str) -> bytes:
        return b"\n" + indent + step + f"</{qname}>".encode()

    if element.role == "description":
        # the start tag's own text (its layout, its xmlns declarations) less the moved values
        tag = data[element.start : element.tag_end]
        for name in names:
            value = rb"\s*=\s*(\"[^\"]*\"|'[^']*')"
            tag, n = re.subn(rb"\s+" + re.escape(_qname(name).encode()) + value, b"", tag, count=1)
            if n != 1:
                return None
        if not self_closing:
            return element.start, element.tag_end, tag + children(b" ")
        tag = tag[:-2].rstrip() + b">"
        return element.start, element.end, tag + children(b" ") + close(b"", element.qname)
    if not self_closing or b"xmlns" in data[element.start : element.tag_end]:
        # fields in shorthand beside element children (not a form exiv2 writes), or an
        # element that declares namespaces itself: left as it is
        return None
    # a struct in shorthand: its fields into a nested description, the URIs as its elements
    kept = [(a, v) for a, v in element.attrs if a not in names]
    outer = [(a, v) for a, v in kept if a[0] in (_RDF, _XML)]
    fields = [(a, v) for a, v in kept if a[0] not in (_RDF, _XML)]
    if any(not a[0] for a, _ in fields):
        return None
    head = f"<{element.qname}".encode() + b"".join(_attr(_qname(a), v) for a, v in outer) + b">"
    desc = b"\n" + indent + b" " + f"<{rdf}:Description".encode()
    desc += b"".join(_attr(_qname(a), v) for a, v in fields) + b">"
    tail = close(b" ", f"{rdf}:Description") + close(b"", element.qname)
    return element.start, element.end, head + desc + children(b"  ") + tail
