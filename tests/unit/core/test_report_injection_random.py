"""keeper's HTML pages against hostile strings: seeded random pages, parsed, beside a clean twin.

The pages people open in a browser: ``keeper_core.report.series_report_html`` (keeper evaluate's
ranker report, the demo's best-of-series report), ``keeper_core.contact_sheet.write_contact_sheet``
(keeper pick and keeper dedup: ``index.html`` and ``pages/``) and keeper select's ``index.html``
(``keeper_train.jobs.select.finish_query``, as the job calls it; importing the job needs no Ray).
keeper ab-report prints text, and the serve review page (``keeper_serve/ui``) is a static file
whose data arrives as JSON and reaches the DOM through ``textContent``: neither renders data
into HTML, so neither is here.

Seeded cases (``KEEPER_HISTORIES=3000`` runs more; a failure names its seed, and the node id,
``...::test_the_contact_sheet_shows_hostile_strings_as_text[SEED]``, replays it) fill every string that reaches a page (titles, series ids, image URIs and file names,
cameras, capture times, reasons, notes, warnings, method and metric names, stage names, model
specs, VLM sources and descriptions, prompts, the judge's error messages, failed files' errors)
with a value from ``HOSTILE`` or a random mix of its entries and ``CHARS``: markup, quotes and
backticks, ``</script>``, comment and CDATA openers, ``javascript:`` and ``data:text/html`` URIs,
entities that must stay text, U+2028/U+2029, NUL, the RTL override, template syntax, CSS
breakouts, strings of thousands of characters, and lone surrogates where the API takes and
returns ``str`` (the report). Each page is rendered twice: hostile, and as its clean twin, where
every string is replaced by one of the same length, whitespace and ``/`` kept where they are
(they decide trimming, folders and file names) and every other character mapped one-to-one onto
a private-use character (equal strings stay equal, distinct ones distinct). Properties:

- the hostile page parses (``html.parser``; html5lib is not installed) into the twin's elements,
  attributes, comments and declarations in the twin's order, its start and end tags balanced,
  with the twin's ``<script>`` and ``<style>`` contents: no element, attribute, ``on*`` handler
  or script came from the data;
- ``<``, ``>``, ``"`` and ``'`` occur in the hostile page exactly as often as in the twin, and so
  do ``<script`` and ``</script``: a check that does not trust the parser (no byte of the data
  is markup, so no browser leaves a tag, an attribute or a ``<script>`` early);
- every attribute value but ``title`` and ``alt`` is the twin's (ids, classes, ``href``,
  ``src``: none carries data), and no ``href`` or ``src`` starts with ``javascript:`` or
  ``data:`` but the report's own ``data:image/...;base64`` thumbnails; a thumbnail that is
  anything else is not shown;
- every string is shown as text where the page shows it (a text node, a ``title`` or ``alt``),
  unescaped exactly once: ``&amp;`` reads ``&amp;``; a bidirectional control (the RTL override)
  reads ``<U+202E>``, so that it cannot reorder what a name shows. The contact sheet shortens strings over 300
  characters with an ellipsis, keeper select strips prompts and the table path: shown so.

No page embeds data in a ``<script>`` (the contact sheet's one script is a constant), so there is
no JSON in a script to parse: the script-content check stands for it.

The tests at the end pin the bug found here, fixed since: keeper select, dedup and evaluate
took a path (or prompt) that is not UTF-8 and died encoding their page after all their work;
their configs now refuse it before any work.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from keeper_core.contact_sheet import SheetSummary, write_contact_sheet
from keeper_core.report import SeriesView, ShotView, series_report_html
from keeper_core.vlm import VlmConfig
from keeper_train.jobs import select as S

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "30"))
SHEET_SEEDS = max(SEEDS // 2, 1)  # a sheet writes its pages, each fsynced
SELECT_SEEDS = max(SEEDS // 3, 1)

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'><svg onload=alert(1)>",
    "' onmouseover='alert(1)",
    "'",
    '"',
    "`",
    "`${alert(1)}`",
    "</script>",
    "</script><script>alert(1)</script>",
    "</SCRIPT ><script>",
    "<!--",
    "-->",
    "<!-- <script>",
    "<![CDATA[",
    "]]>",
    "<?xml version='1.0'?>",
    "<!doctype html>",
    "javascript:alert(1)",
    " JaVaScRiPt:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "&amp;",
    "&lt;b&gt;",
    "&#39;&#x27;&quot;",
    "&copy",
    "&",
    "\u2028",
    "\u2029",
    "\x00",
    "\u202e",
    "\ufeff",
    "{{7*7}}",
    "${7*7}",
    "#{7*7}",
    "</style><script>alert(1)</script>",
    "</title><script>alert(1)</script>",
    "</textarea><script>alert(1)</script>",
    "expression(alert(1))",
    "<style>*{width:expression(alert(1))}</style>",
    "<a href='javascript:alert(1)'>x</a>",
    "<base href='//evil.example/'>",
    "<meta http-equiv='refresh' content='0;url=javascript:alert(1)'>",
    "<iframe srcdoc='<script>alert(1)</script>'></iframe>",
    "<plaintext>",
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
    "\r\n",
    "\t",
    "\\",
    "\x1b[31m",
    "s3://b/<x>/IMG'\"`.jpg",
    "/photos/a/",
    "caf\u00e9 \u4e2d\u6587 \U0001f600.jpg",
    "x" * 4000,
]
CHARS = [
    *"<>&\"'`/\\=;:!-[]{}$#%()*+,.?@^|~ aZT09",
    "\x00",
    "\x0c",
    "\x1f",
    "\x7f",
    "\x85",
    "\xa0",
    "\u00e9",
    "\u4e2d",
    "\U0001f600",
    "\u2028",
    "\u2029",
    "\u202e",
    "\ufeff",
    "\r",
    "\n",
    "\t",
]
SURROGATES = ["\ud800", "\udfff", "caf\udce9.jpg", "\udc80<script>alert(1)</script>"]
# Private use: never drawn (CHARS and HOSTILE hold none), harmless anywhere in HTML.
TWIN_BASE = 0xE000
# Twins keep these: they decide str.strip(), folders and file names.
KEPT = "/"
CLIP = 300  # keeper_core.contact_sheet._CLIP
IMAGE_DATA_URI = re.compile(r"data:image/(?:jpeg|png|webp|gif);base64,[A-Za-z0-9+/]*={0,2}")
# The attributes that show data (a tooltip, an image's text); every other value is the page's own.
DATA_ATTRS = frozenset({"title", "alt"})
VOID = frozenset({"meta", "img", "br", "input", "link", "hr", "wbr", "source", "area", "col"})


def pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def nonblank(s: str) -> bool:
    return bool(s.strip())


def clip(s: str) -> str:
    return s if len(s) <= CLIP else s[: CLIP - 1] + "\u2026"


# Unicode's bidirectional controls (UAX #9: embeddings and overrides, isolates, LRM, RLM, ALM),
# which every page shows as <U+XXXX> (an RTL override would make "IMG_\u202egpj.exe" read
# "IMG_exe.jpg"); written out here apart from keeper_core.htmltext.
BIDI = {chr(c) for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def visible(s: str) -> str:
    return "".join(f"<U+{ord(c):04X}>" if c in BIDI else c for c in s)


# ---------------------------------------------------------------------------------------------
# Strings: drawn hostile, replayed as their twins


def anything(s: str) -> bool:
    return True


class Text(Protocol):
    """Where a page's strings come from: a Hostile, or the Replay of its twins."""

    def __call__(self, ok: Callable[[str], bool] = anything) -> str: ...

    def of(self, options: list[str]) -> str: ...


class Hostile:
    """Draws hostile strings from its own generator and records each, for the twin's replay."""

    def __init__(self, seed: int, *, surrogates: bool = False) -> None:
        self.rng = np.random.default_rng([seed, 7919])
        self.surrogates = surrogates
        self.drawn: list[str] = []

    def _one(self) -> str:
        r = self.rng.random()
        if r < 0.3:
            return str(pick(self.rng, HOSTILE))
        if r < 0.85:
            pieces = [
                pick(self.rng, HOSTILE) if self.rng.random() < 0.4 else pick(self.rng, CHARS)
                for _ in range(int(self.rng.integers(2, 8)))
            ]
            return "".join(pieces)
        if r < 0.95:
            unit = pick(self.rng, HOSTILE[:-1])
            return str(unit * (int(self.rng.integers(300, 3000)) // len(unit) + 1))
        if self.surrogates:
            return str(pick(self.rng, SURROGATES)) + str(pick(self.rng, HOSTILE[:-1]))
        return ""

    def __call__(self, ok: Callable[[str], bool] = anything) -> str:
        s = self._one()
        while not ok(s):
            s = self._one()
        self.drawn.append(s)
        return s

    def of(self, options: list[str]) -> str:
        """One of ``options`` (recorded, so that the twin is that option's twin)."""
        s = str(pick(self.rng, options))
        self.drawn.append(s)
        return s


class Twin:
    """Same-length harmless strings: whitespace and ``/`` kept, every other character mapped
    one-to-one onto a private-use character (one mapping per case)."""

    def __init__(self) -> None:
        self.table: dict[str, str] = {}

    def __call__(self, s: str) -> str:
        out = []
        for c in s:
            if c.isspace() or c in KEPT:
                out.append(c)
                continue
            if c not in self.table:
                self.table[c] = chr(TWIN_BASE + len(self.table))
            out.append(self.table[c])
        return "".join(out)


class Replay:
    """Returns the twins of what a Hostile drew, in the order it drew them."""

    def __init__(self, drawn: list[str]) -> None:
        twin = Twin()
        self.values = iter([twin(s) for s in drawn])

    def __call__(self, ok: Callable[[str], bool] = anything) -> str:
        s = next(self.values)
        assert ok(s), f"the twin {s!r} breaks a constraint its original met"
        return s

    def of(self, options: list[str]) -> str:
        return next(self.values)


# ---------------------------------------------------------------------------------------------
# Reading a page


@dataclass
class Page:
    """A page as html.parser reads it: its markup, text and attribute values."""

    events: list[tuple[Any, ...]] = field(default_factory=list)  # markup only, in order
    text: list[str] = field(default_factory=list)  # text nodes outside <script> and <style>
    attrs: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    scripts: list[str] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self.raw: str | None = None  # inside <script> or <style>

    def _tag(self, kind: str, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.page.events.append((kind, tag, tuple(n for n, _ in attrs)))
        for n, v in attrs:
            self.page.attrs[n].append(v or "")
        if kind == "start" and tag in ("script", "style"):
            self.raw = tag
            (self.page.scripts if tag == "script" else self.page.styles).append("")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag("start", tag, attrs)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag("startend", tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        self.page.events.append(("end", tag))
        if tag == self.raw:
            self.raw = None

    def handle_data(self, data: str) -> None:
        if self.raw == "script":
            self.page.scripts[-1] += data
        elif self.raw == "style":
            self.page.styles[-1] += data
        else:
            self.page.text.append(data)

    def handle_comment(self, data: str) -> None:
        self.page.events.append(("comment", data))

    def handle_decl(self, decl: str) -> None:
        self.page.events.append(("decl", decl))

    def handle_pi(self, data: str) -> None:
        self.page.events.append(("pi", data))

    def unknown_decl(self, data: str) -> None:
        self.page.events.append(("unknown_decl", data))


def read(doc: str) -> Page:
    reader = _Reader()
    reader.feed(doc)
    reader.close()
    return reader.page


def merge(pages: list[Page]) -> Page:
    out = Page()
    for p in pages:
        out.text += p.text
        for k, v in p.attrs.items():
            out.attrs[k] += v
    return out


def safe_uri(value: str) -> bool:
    """Not a script URI, and a data: URI only as an image (browsers drop these before a scheme)."""
    u = re.sub(r"[\x00-\x20\x7f]", "", value).lower()
    if u.startswith(("javascript:", "vbscript:")):
        return False
    return not u.startswith("data:") or bool(IMAGE_DATA_URI.fullmatch(value))


def check_page(hostile: str, twin: str, where: str) -> Page:
    """The hostile page has the twin's markup, scripts, styles and links; returns it read."""
    h, t = read(hostile), read(twin)
    assert h.events == t.events, f"{where}: markup differs from the clean twin's" + _diff(h, t)
    stack: list[str] = []
    for e in h.events:
        if e[0] == "start" and e[1] not in VOID:
            stack.append(e[1])
        elif e[0] == "end":
            assert stack, f"{where}: </{e[1]}> closes nothing"
            assert stack[-1] == e[1], f"{where}: </{e[1]}> closes <{stack[-1]}>"
            stack.pop()
    assert not stack, f"{where}: unclosed {stack}"
    assert h.scripts == t.scripts, f"{where}: script content differs"
    assert h.styles == t.styles, f"{where}: style content differs"
    for s in ("<", ">", '"', "'"):
        assert hostile.count(s) == twin.count(s), f"{where}: {s!r} in the data reached the page"
    low_h, low_t = hostile.lower(), twin.lower()
    for s in ("<script", "</script"):
        assert low_h.count(s) == low_t.count(s), f"{where}: {s} count differs"
    assert not [n for n in h.attrs if n.startswith("on")], f"{where}: event handler attribute"
    for name, values in h.attrs.items():  # ids, classes, hrefs, srcs: none carries data
        if name not in DATA_ATTRS:
            assert values == t.attrs[name], f"{where}: a {name} attribute carries data"
    bad = [v for n in ("href", "src") for v in h.attrs.get(n, []) if not safe_uri(v)]
    assert not bad, f"{where}: unsafe URIs {bad[:3]}"
    return h


def _diff(h: Page, t: Page) -> str:
    for i, (a, b) in enumerate(zip(h.events, t.events, strict=False)):
        if a != b:
            return f" at event {i}: {a!r} vs the twin's {b!r}"
    return f": {len(h.events)} events vs the twin's {len(t.events)}"


@dataclass
class Shown:
    """Strings a page must show: (where, options), any option found counts."""

    items: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def add(self, where: str, *options: str) -> None:
        self.items.append((where, tuple(visible(o) for o in options)))

    def check(self, page: Page, label: str) -> None:
        for where, options in self.items:
            pool = page.text if where == "text" else page.attrs.get(where, [])
            assert any(o in v for o in options for v in pool), (
                f"{label}: {options[0]!r} is not shown in {where} (lost, or escaped twice)"
            )


# ---------------------------------------------------------------------------------------------
# keeper_core.report.series_report_html


def _data_uri(rng: np.random.Generator) -> str:
    raw = rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8).tobytes()
    kind = pick(rng, ["jpeg", "png", "webp", "gif"])
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode("ascii")


BAD_THUMBS = [
    "javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+",
    "data:image/jpeg;base64,AAAA' onerror='alert(1)",
    "data:image/jpeg;base64,AAAA\n",
    " data:image/png;base64,AAAA",
    "https://evil.example/x.jpg",
]


def report_page(seed: int, text: Text, shown: Shown) -> str:
    rng = np.random.default_rng(seed)
    with_metrics = bool(rng.random() < 0.8)
    # Names are dict keys: a repeated one is one method.
    methods = list(dict.fromkeys(text() for _ in range(int(rng.integers(1, 4)))))
    metrics = list(dict.fromkeys(text() for _ in range(int(rng.integers(0, 3)))))
    rows: dict[str, dict[str, Any]] = {}
    for m in methods:
        rows[m] = {c: pick(rng, [0.5, 12_000, float("nan")]) for c in metrics}
        if metrics and rng.random() < 0.3:
            rows[m][metrics[0]] = text()  # not a number: shown as it is
        if with_metrics:
            shown.add("text", m)
            shown.items += [("text", (visible(v),)) for v in rows[m].values() if isinstance(v, str)]
    for c in metrics if with_metrics else []:
        shown.add("text", c)
    series: list[SeriesView] = []
    for _ in range(int(rng.integers(0, 4))):
        sid = text()
        shown.add("text", f"series {sid}")
        shots = []
        n = int(rng.integers(1, 5))
        for _ in range(n):
            uri = text()
            kind = pick(rng, ["ok", "ok", "none", "text", "bad"])
            thumb = _data_uri(rng) if kind == "ok" else None
            if kind == "text":
                thumb = text()
            elif kind == "bad":
                thumb = text.of(BAD_THUMBS)
            note = text() if rng.random() < 0.5 else ""
            scores = {m: float(rng.random()) for m in methods if rng.random() < 0.7}
            shots.append(ShotView(uri, thumb, bool(rng.random() < 0.3), scores, note))
            shown.add("title", uri)
            if kind == "ok":
                shown.add("alt", uri)
            if note:
                shown.add("text", note)
            for m, v in scores.items():
                shown.add("text", f"{m} {v:.3f}")
        picks = {m: int(rng.integers(n)) for m in methods if rng.random() < 0.8}
        for m in picks:
            shown.add("text", m)
        series.append(SeriesView(sid, shots, picks, omitted=int(rng.integers(0, 3))))
    title = text()
    warnings = [text() for _ in range(int(rng.integers(0, 3)))]
    notes = [text() for _ in range(int(rng.integers(0, 3)))]
    order = text() if rng.random() < 0.7 else ""
    for s in [title, *warnings, *notes, *([order] if order else [])]:
        shown.add("text", s)
    return series_report_html(
        title,
        series,
        metrics_rows=rows if with_metrics else None,
        warnings=warnings,
        notes=notes,
        total_series=None if rng.random() < 0.5 else len(series) + int(rng.integers(0, 5)),
        total_images=None if rng.random() < 0.5 else int(rng.integers(0, 10_000)),
        shown_order=order,
    )


@pytest.mark.parametrize("seed", range(SEEDS))
def test_the_series_report_shows_hostile_strings_as_text(seed: int) -> None:
    hostile = Hostile(seed, surrogates=True)
    shown = Shown()
    page = report_page(seed, hostile, shown)
    twin = report_page(seed, Replay(hostile.drawn), Shown())
    read_page = check_page(page, twin, f"seed {seed} report")
    shown.check(read_page, f"seed {seed} report")
    srcs = read_page.attrs.get("src", [])
    assert all(IMAGE_DATA_URI.fullmatch(s) for s in srcs), f"seed {seed}: a src not an image"


# ---------------------------------------------------------------------------------------------
# keeper_core.contact_sheet.write_contact_sheet


def _basename(uri: str) -> str:
    return uri.rstrip("/").rpartition("/")[2] or uri


def sheet_pages(seed: int, text: Text, shown: Shown, out: Path) -> list[str]:
    """Writes a random sheet under ``out``; returns its pages, index first."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for g in range(int(rng.integers(1, 5))):
        size = int(rng.integers(1, 6))
        folder = text() if rng.random() < 0.6 else None  # the group's folder, or one per image
        camera = text() if rng.random() < 0.6 else None  # the group's camera, or one per image
        per_row_camera = camera is None and rng.random() < 0.5
        for k in range(size):
            name = text()
            uri = name if folder is None else f"{folder}/{name}"
            cam = text() if per_row_camera else camera
            rows.append(
                {
                    "image_uri": uri,
                    "image_id": hashlib.sha256(f"{seed}/{len(rows)}".encode()).hexdigest(),
                    "group": g,
                    "group_size": size,
                    "capture_time": text() if rng.random() < 0.7 else None,
                    "camera": cam,
                    "rank": k + 1 if rng.random() < 0.9 else float("nan"),
                    "score": float(rng.random()),
                    "prob": float(rng.random()),
                    "decision": "keep" if k == 0 else pick(rng, ["alternate", "reject"]),
                    "reasons": [text() for _ in range(int(rng.integers(0, 11)))],
                    "duplicate_of": int(rng.integers(0, len(rows)))
                    if k and rng.random() < 0.4
                    else -1,
                    "duplicate_kind": pick(rng, ["exact", "near", "text", None]),
                }
            )
            if rows[-1]["duplicate_kind"] == "text":
                rows[-1]["duplicate_kind"] = text()
            if not per_row_camera and cam is not None:
                shown.add("text", clip(cam))
    for r in rows:
        name = _basename(r["image_uri"])
        shown.add("alt", clip(name))
        shown.add("text", clip(name))
        shown.add("title", clip(name), clip(r["image_uri"]))
        reasons = r["reasons"] if len(r["reasons"]) <= 8 else r["reasons"][:7]
        for why in reasons:
            shown.add("title", clip(why))
        if r["duplicate_of"] >= 0:
            kind = r["duplicate_kind"] or "near"
            target = rows[r["duplicate_of"]]["image_uri"]
            shown.add("title", clip(f"{kind} duplicate of {target}"))
    failed = pd.DataFrame(
        [
            {c: text() for c in ("image_uri", "stage", "reason", "error")}
            for _ in range(int(rng.integers(0, 5)))
        ],
        columns=["image_uri", "stage", "reason", "error"],
    )
    with_failed = bool(rng.random() < 0.8)
    for v in failed.to_numpy().ravel() if with_failed else []:
        shown.add("text", clip(v))
    seconds = {text(): float(rng.random() * 5000) for _ in range(int(rng.integers(0, 3)))}
    ranker = text()
    notes = [text() for _ in range(int(rng.integers(0, 3)))]
    warnings = [text() for _ in range(int(rng.integers(0, 3)))]
    title = text()
    for s in [*seconds, ranker, *notes, *warnings, title]:
        shown.add("text", clip(s))
    summary = SheetSummary(
        images=len(rows),
        groups=rows[-1]["group"] + 1,
        keepers=0,
        alternates=0,
        rejects=0,
        duplicates=0,
        failed=len(failed),
        seconds=seconds,
        ranker=ranker,
        notes=notes,
        warnings=warnings,
    )
    write_contact_sheet(
        str(out),
        pd.DataFrame(rows),
        summary,
        failed=failed if with_failed else None,
        groups_per_page=int(rng.integers(1, 4)),
        images_per_page=int(rng.integers(1, 8)),
        title=title,
    )
    pages = sorted((out / "pages").glob("page-*.html"))
    # Bytes, decoded: read_text would turn a \r of the data into \n.
    return [p.read_bytes().decode("utf-8") for p in [out / "index.html", *pages]]


@pytest.mark.parametrize("seed", range(SHEET_SEEDS))
def test_the_contact_sheet_shows_hostile_strings_as_text(seed: int, tmp_path: Path) -> None:
    hostile = Hostile(seed)
    shown = Shown()
    pages = sheet_pages(seed, hostile, shown, tmp_path / "hostile")
    twins = sheet_pages(seed, Replay(hostile.drawn), Shown(), tmp_path / "twin")
    assert len(pages) == len(twins)
    read_pages = [
        check_page(p, t, f"seed {seed} sheet page {i}")
        for i, (p, t) in enumerate(zip(pages, twins, strict=True))
    ]
    shown.check(merge(read_pages), f"seed {seed} sheet")
    assert all(s.startswith("../thumbs/") for p in read_pages for s in p.attrs.get("src", []))


# ---------------------------------------------------------------------------------------------
# keeper select's index.html (keeper_train.jobs.select.finish_query)


def _name(uri: str) -> str:
    return "/".join(uri.rstrip("/").split("/")[-2:])


def select_page(seed: int, text: Text, shown: Shown, out: Path) -> str:
    rng = np.random.default_rng(seed)
    positive = [text(nonblank) for _ in range(int(rng.integers(1, 3)))]
    negative = [text(nonblank) for _ in range(int(rng.integers(0, 3)))]
    vlm_query = text(bool) if rng.random() < 0.5 else None
    q = S.Query(name=f"q{seed}", positive=positive, negative=negative, vlm_query=vlm_query)
    mode = pick(rng, ["none", "beta0", "active", "active"])
    source = text(nonblank) if mode != "none" else ""
    n = int(rng.integers(4, 25))
    top_n = int(rng.integers(1, n + 1))
    table = text(lambda s: bool(s.strip().rstrip("/")))
    cfg = S.SelectJobConfig(
        table=table,
        queries=[q],
        output=str(out),
        cascade={
            "top_n": top_n,
            "top_k": int(rng.integers(1, top_n + 1)),
            "dedup_threshold": None,
            "beta": 0.5 if mode == "active" else 0.0,
        },
        vlm=None if mode == "none" else VlmConfig(source=source),
    )
    arch = text(lambda s: bool(s.strip()) and ":" not in s)
    weights = "random" if rng.random() < 0.5 else text(lambda s: s.strip() not in ("", "random"))
    spec = f"{arch}:{weights}"
    d = 8
    emb = rng.normal(size=(n, d)).astype(np.float32)
    uris = [text() for _ in range(n)]
    c = S.Candidates(
        image_id=[hashlib.sha256(f"{seed}/{i}".encode()).hexdigest() for i in range(n)],
        image_uri=uris,
        width=np.full(n, 4000.0),
        height=np.full(n, 3000.0),
        embeddings=emb / np.linalg.norm(emb, axis=1, keepdims=True),
        spec=spec,
    )
    pos = rng.normal(size=(len(q.positive), d)).astype(np.float32)
    neg = rng.normal(size=(len(q.negatives), d)).astype(np.float32)
    pq = S.PreparedQuery(
        q,
        pos / np.linalg.norm(pos, axis=1, keepdims=True),
        neg / np.linalg.norm(neg, axis=1, keepdims=True),
        np.zeros(0, np.int64),
    )
    pq.survivors = S.survivors(S.cascade_for(c, pq, cfg.cascade))
    thumbs = {int(i): _data_uri(rng) for i in pq.survivors if rng.random() < 0.8}
    answers: dict[tuple[int, int], tuple[float, str]] = {}
    for i in pq.survivors:
        err = text() if mode == "active" and rng.random() < 0.3 else ""
        answers[(0, int(i))] = (float(rng.random()), err)
        if err:
            shown.add("text", f"vlm_failed: {err}")
    info: dict[str, Any] | None = None
    if mode != "none" and rng.random() < 0.6:
        info = {
            "source": source,
            "architecture": text(),
            "parameters": int(rng.integers(0, 10**9)),
            "dtype": text(),
            "device": text(),
            "random_weights": bool(rng.random() < 0.5),
        }
        shown.items += [("text", (visible(info[k]),)) for k in ("architecture", "dtype", "device")]
    judged = S.Judged(answers, thumbs, info, len(pq.survivors), 0.25)
    plan = S.Plan(cfg, c, [pq], cfg.cascade, pick(rng, ["model", "config"]), {})
    S.finish_query(plan, 0, judged, S._vlm_note(cfg, judged), info)
    for s in [*q.positive, *q.negative, spec, table.strip().rstrip("/")]:
        shown.add("text", s)
    if cfg.vlm_active:
        shown.add("text", q.vlm_text)
    if source and (info is not None or cfg.vlm_active):
        shown.add("text", source)  # the VLM row names it, or the note of a judge never loaded
    for i in pq.survivors:
        shown.add("title", uris[int(i)])
        shown.add("text", _name(uris[int(i)]))
    return (out / q.name / S.INDEX).read_bytes().decode("utf-8")


@pytest.mark.parametrize("seed", range(SELECT_SEEDS))
def test_the_select_page_shows_hostile_strings_as_text(seed: int, tmp_path: Path) -> None:
    hostile = Hostile(seed)
    shown = Shown()
    page = select_page(seed, hostile, shown, tmp_path / "hostile")
    twin = select_page(seed, Replay(hostile.drawn), Shown(), tmp_path / "twin")
    read_page = check_page(page, twin, f"seed {seed} select")
    shown.check(read_page, f"seed {seed} select")
    assert all(IMAGE_DATA_URI.fullmatch(s) for s in read_page.attrs.get("src", []))


# ---------------------------------------------------------------------------------------------
# Found here (fixed since): a path that is not UTF-8 (a Latin-1 folder, as Python spells it from
# argv or a listing: surrogate escapes) was accepted by keeper select, dedup and evaluate, which
# name it on their page; the page could not be encoded, and the job died with a
# UnicodeEncodeError after all its work. Their configs now refuse it, as keeper pick's does
# (storage.utf8_path), and select refuses a prompt no page could hold.

LATIN1 = "/data/caf\udce9"  # b"/data/caf\xe9" as os.fsdecode gives it


@pytest.mark.parametrize(
    ("field", "table", "prompt", "vlm_query"),
    [
        ("table", f"{LATIN1}/table", "a beach", None),
        ("positive", "/t", "a\ud800", None),
        ("vlm_query", "/t", "a beach", "is it a\ud800?"),
    ],
)
def test_select_refuses_a_string_its_page_cannot_hold(
    tmp_path: Path, field: str, table: str, prompt: str, vlm_query: str | None
) -> None:
    # (pydantic's own str check refuses the lone surrogate in vlm_query: "unicode string")
    with pytest.raises(ValidationError, match=r"not valid UTF-8|unicode string") as e:
        S.SelectJobConfig(
            table=table,
            queries=[{"name": "q", "positive": [prompt], "vlm_query": vlm_query}],
            output=str(tmp_path / "out"),
        )
    assert field in str(e.value)


@pytest.mark.parametrize("field", ["table", "output", "index"])
def test_dedup_refuses_a_path_its_sheet_cannot_hold(tmp_path: Path, field: str) -> None:
    from keeper_train.jobs.dedup import DedupConfig

    given = {"table": "/data/table", "output": str(tmp_path / "out"), field: LATIN1}
    with pytest.raises(ValidationError, match="not valid UTF-8"):
        DedupConfig.model_validate(given)


@pytest.mark.parametrize("field", ["embeddings", "series", "html", "json_out"])
def test_evaluate_refuses_a_path_its_report_cannot_hold(tmp_path: Path, field: str) -> None:
    from keeper_train.jobs.evaluate import EvaluateConfig

    given = {"model": "models:/m@champion", "embeddings": "/data/table", "series": "/s.csv"}
    with pytest.raises(ValidationError, match="not valid UTF-8"):
        EvaluateConfig.model_validate({**given, field: f"{LATIN1}/x"})
